"""Every experiment file in experiments/ is a valid experiment."""
from pathlib import Path

import pytest

from orchestrator.config import load_experiment

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_file_validates(path):
    cfg = load_experiment(path)
    assert cfg.name == path.stem


def test_the_papers_recipes_are_all_there():
    names = {p.stem for p in EXPERIMENTS}
    for method in ("full", "fixed", "lorand", "e3va"):
        assert f"coco_cascade_mask_rcnn_swin_b_{method}" in names
        assert f"voc_retinanet_swin_l_{method}" in names
        assert f"voc_faster_rcnn_swin_l_{method}" in names  # LoRand's VOC detector
        assert f"ade20k_upernet_swin_l_{method}" in names
