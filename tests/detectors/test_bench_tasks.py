"""The shared-backbone benchmark measures what it says: one frozen pass per image and fewer weights held."""
from detectors.bench_tasks import bench_tasks

TINY = dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))


def test_three_e3va_tasks_hold_the_backbone_once_and_run_it_once_per_image():
    result = bench_tasks(tasks=3, method="e3va", size=(64, 96), images=1, rounds=1,
                         backbone_kwargs=dict(TINY, detector_options=dict(box_detections_per_img=10)))
    assert result.frozen_passes_per_image == 1.0
    assert result.shared_weight_bytes < result.separate_weight_bytes
    assert result.separate_s_per_image > 0 and result.shared_s_per_image > 0
