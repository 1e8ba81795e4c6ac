"""The torchvision engine: Mask R-CNN, Faster R-CNN and RetinaNet on the tuned Swin + FPN.

It runs wherever torch runs, so it is the embedded default and what CI trains end to end.
Resizing is the data pipeline's job (``detectors.data.transforms``), so torchvision's own
transform only normalises and pads to a multiple of 32.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detectors.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detectors.engines.base import ENGINES, Detector, Engine
from detectors.errors import UserInputError
FPN_CHANNELS = 256


class SwinFPN(nn.Module):
    """Tuned backbone -> FPN, in the form torchvision's detectors expect (``out_channels``)."""

    def __init__(self, body: nn.Module, in_features: tuple[str, ...], extra_blocks: nn.Module):
        super().__init__()
        self.body = body
        self.in_features = in_features
        names = ("res2", "res3", "res4", "res5")
        channels = [body.out_channels[names.index(f)] for f in in_features]
        self.fpn = FeaturePyramidNetwork(channels, FPN_CHANNELS, extra_blocks=extra_blocks)
        self.out_channels = FPN_CHANNELS

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(images)
        return self.fpn(OrderedDict((name, features[name]) for name in self.in_features))


class _NormaliseAndPad(GeneralizedRCNNTransform):
    """torchvision's transform without its resize: the data pipeline already resized."""

    def __init__(self, size_divisible: int):
        super().__init__(min_size=800, max_size=1333, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                         size_divisible=size_divisible)

    #: Set by ``TorchvisionDetector.predict`` for one call: the frame to paste the predictions in.
    output_sizes: list[tuple[int, int]] | None = None

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        # torchvision's own postprocess: boxes scaled and soft masks pasted at the given sizes.
        return super().postprocess(result, image_shapes, self.output_sizes or original_image_sizes)


def _mask_rcnn(body: nn.Module, num_classes: int, **options) -> nn.Module:
    levels = ("res2", "res3", "res4", "res5")
    return MaskRCNN(SwinFPN(body, levels, LastLevelMaxPool()), num_classes=num_classes,
                    box_roi_pool=MultiScaleRoIAlign(list(levels), output_size=7, sampling_ratio=2),
                    mask_roi_pool=MultiScaleRoIAlign(list(levels), output_size=14, sampling_ratio=2), **options)


def _faster_rcnn(body: nn.Module, num_classes: int, **options) -> nn.Module:
    levels = ("res2", "res3", "res4", "res5")
    return FasterRCNN(SwinFPN(body, levels, LastLevelMaxPool()), num_classes=num_classes,
                      box_roi_pool=MultiScaleRoIAlign(list(levels), output_size=7, sampling_ratio=2), **options)


def _retinanet(body: nn.Module, num_classes: int, **options) -> nn.Module:
    # As in the RetinaNet paper: P3-P5 from the backbone, P6 and P7 from P5.
    return RetinaNet(SwinFPN(body, ("res3", "res4", "res5"), LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS)),
                     num_classes=num_classes, **options)


TORCHVISION_DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "mask_rcnn": _mask_rcnn,
    "faster_rcnn": _faster_rcnn,
    "retinanet": _retinanet,
}


class TorchvisionDetector(Detector):
    engine = "torchvision"

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        self.name = name
        self.model = model
        self.has_masks = isinstance(model, MaskRCNN)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone.body

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        return self.model(images, targets)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor],
                output_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, torch.Tensor]]:
        was_training = self.training
        self.eval()
        transform = self.model.transform
        transform.output_sizes = [tuple(map(int, size)) for size in output_sizes] if output_sizes else None
        try:
            predictions = self.model(images)
        finally:
            transform.output_sizes = None
            self.train(was_training)
        for prediction in predictions:
            if "masks" in prediction:
                # As torchvision's reference COCO evaluation binarises them (references/detection).
                prediction["masks"] = prediction["masks"] > 0.5
        return predictions


def build_torchvision_detector(detector: str, backbone: nn.Module, num_classes: int,
                               **options) -> TorchvisionDetector:
    """``num_classes`` counts the object classes; torchvision adds the background class 0.

    ``options`` go to the torchvision constructor (e.g. ``box_batch_size_per_image=128``,
    ``rpn_post_nms_top_n_train=300`` for small images).
    """
    try:
        model = TORCHVISION_DETECTORS[detector](backbone, num_classes + 1, **options)
    except TypeError as exc:
        raise UserInputError(f"option not accepted by torchvision's {detector}: {exc}") from None
    model.transform = _NormaliseAndPad(size_divisible=backbone.size_divisibility)
    return TorchvisionDetector(detector, model)


# What each builder fills in itself; the rest of the constructor's keywords are the detector's options.
_BUILT_HERE = {"self", "backbone", "num_classes", "kwargs", "mask_roi_pool", "box_roi_pool", "anchor_generator",
               "rpn", "roi_heads", "transform"}  # the last three: GeneralizedRCNN's, which the subclasses fill
_TORCHVISION_CLASSES = {"mask_rcnn": MaskRCNN, "faster_rcnn": FasterRCNN, "retinanet": RetinaNet}


def torchvision_options(detector: str) -> frozenset[str]:
    """The keyword options torchvision's constructor of ``detector`` takes (along its bases' ``**kwargs``)."""
    names: set[str] = set()
    for cls in _TORCHVISION_CLASSES[detector].__mro__:
        if cls is nn.Module:
            break
        if "__init__" in vars(cls):
            names |= set(inspect.signature(cls.__init__).parameters)
    return frozenset(names - _BUILT_HERE)


ENGINES.register("torchvision")(Engine(detectors=tuple(TORCHVISION_DETECTORS), build=build_torchvision_detector,
                                       options=torchvision_options))
