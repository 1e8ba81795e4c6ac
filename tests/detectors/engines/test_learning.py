"""A detector on an E3VA backbone learns: box AP50 far above an untrained model's.

The backbone is a small, randomly initialised Swin (nothing can be downloaded here), so the
highway adapters, the FPN and the heads learn the synthetic shapes from scratch.
"""
import itertools

import pytest
import torch

from detectors.data import CocoDetection, build_transforms, collate_fn, make_synthetic_coco
from detectors.engines import build_detector
from detectors.training import evaluate, training_step

SMALL_IMAGES = dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=300,
                    box_batch_size_per_image=64, box_detections_per_img=50)


@pytest.mark.benchmark  # two and a half minutes on 2 cores; CI's runs learn too (test_torchvision_engine, test_segmentation)
def test_e3va_faster_rcnn_learns_the_synthetic_shapes(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=64, num_val=16, image_size=(128, 160), num_classes=3, seed=0)
    train = CocoDetection(paths["train_images"], paths["train_json"], build_transforms(True, (128,), 256))
    val = CocoDetection(paths["val_images"], paths["val_json"], build_transforms(False, test_short_edge=128,
                                                                                  max_size=256))
    torch.manual_seed(0)
    model = build_detector("torchvision", "faster_rcnn", 3, "swin_t", "e3va", detector_options=SMALL_IMAGES,
                           depths=(1, 1, 2, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
    untrained = evaluate(model, val)["bbox/AP50"]

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[60], gamma=0.1)
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate_fn,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    for images, targets in itertools.islice(itertools.cycle(loader), 80):
        training_step(model, optimizer, images, targets, clip_norm=1.0)
        scheduler.step()
    trained = evaluate(model, val)["bbox/AP50"]
    print(f"box AP50 on the synthetic validation split: untrained {untrained:.1f}, after 80 steps {trained:.1f}")
    assert trained >= 10.0 and trained > untrained + 8.0
