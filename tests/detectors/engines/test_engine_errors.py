"""Engine errors that must read well whether or not the optional detectron2 is installed."""

from __future__ import annotations

import importlib.util

import pytest

from detectors.engines import ENGINES, build_detector
from detectors.errors import UserInputError

TINY = dict(backbone="swin_t", depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))


@pytest.fixture
def no_detectron2(monkeypatch):
    """Make detectron2 look absent to the availability check, installed or not."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "detectron2" or name.startswith("detectron2."):
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("detector", ["cascade_mask_rcnn", "retinanet"])
def test_detectron2_engine_without_detectron2_says_how_to_install_it(no_detectron2, detector):
    with pytest.raises(UserInputError) as info:
        build_detector("detectron2", detector, num_classes=3, **TINY)
    message = str(info.value)
    assert "detectron2" in message and "pip install" in message
    assert "\n" not in message


def test_detectron2_availability_is_checked_before_the_detector_name(no_detectron2):
    """Asking for any detector of a missing engine names the missing engine, not the detector."""
    with pytest.raises(UserInputError, match="pip install"):
        build_detector("detectron2", "mask_rcnn", num_classes=3, **TINY)


def test_the_detectron2_engine_is_registered_with_its_detectors():
    assert "detectron2" in ENGINES
    assert set(ENGINES.get("detectron2").detectors) == {"cascade_mask_rcnn", "retinanet"}


def test_unknown_engine_is_a_user_error():
    with pytest.raises(UserInputError, match="unknown detector engine 'mmdet'"):
        build_detector("mmdet", "retinanet", num_classes=3, **TINY)


def test_options_of_another_engine_are_refused_before_anything_is_built():
    with pytest.raises(UserInputError, match=r"unknown option\(s\) backbone_lr for torchvision's mask_rcnn "
                                             r"\(model.options\); valid: .*box_batch_size_per_image"):
        ENGINES.get("torchvision").check("torchvision", "mask_rcnn", {"backbone_lr": 1, "box_batch_size_per_image": 8})
    if importlib.util.find_spec("detectron2") is not None:
        with pytest.raises(UserInputError, match=r"unknown option\(s\) rpn_post_nms_top_n_train .*valid: config_file, "
                                                 r"opts"):
            ENGINES.get("detectron2").check("detectron2", "retinanet", {"rpn_post_nms_top_n_train": 300})
