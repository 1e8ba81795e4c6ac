"""The detectron2 engine: Cascade Mask R-CNN and RetinaNet on the tuned Swin + detectron2's FPN.

detectron2 is an optional extra (it is installed from its source repository, see
``detectors.engines.DETECTRON2_INSTALL``); this module imports it at the top and is imported only
when it is installed. It plugs into detectron2 the way detectron2's own projects do:

- ``add_swin_tuning_config(cfg)`` adds our yacs keys (``MODEL.SWIN_TUNED.*`` for the backbone and its
  tuning method, ``SOLVER.SWIN_TUNED.*`` for AdamW, which detectron2's yacs solver lacks);
- ``build_swin_tuned_fpn_backbone`` is registered in ``BACKBONE_REGISTRY``, so detectron2's
  ``build_model(cfg)`` and train_net-style tools build our detectors from the YAML files in
  ``detectors/configs/detectron2/``:

      cfg = get_cfg(); add_swin_tuning_config(cfg); cfg.merge_from_file(config_path("retinanet"))
      model = build_model(cfg)            # after `import detectors.engines.detectron2_engine`
      optimizer = build_optimizer(cfg, model)   # AdamW from SOLVER.SWIN_TUNED (train_net's is SGD)

- ``build_detectron2_detector`` builds the same detectors around a backbone that is already tuned
  and returns a ``Detector`` with the project's interface (``detectors.engines.base``).

Resizing is the data pipeline's job: the engine hands detectron2 images at the size it got them
(``height``/``width`` equal the image size), so detectron2 pads to 32 and rescales nothing.
"""
from __future__ import annotations

import contextlib
import importlib.resources
from typing import Any, Mapping, Sequence

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import (BACKBONE_REGISTRY, FPN, Backbone, GeneralizedRCNN, RetinaNet,
                                 build_anchor_generator, build_proposal_generator, build_roi_heads)
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage, get_event_storage
from torch import nn

from detectors import build_backbone
from detectors.backbones import OUT_FEATURES
from detectors.engines.base import Detector
from detectors.errors import UserInputError

# One config file per detector; the files are ours (written from the Swin detection and E3VA
# papers' setups) and ship as package data.
CONFIG_FILES: dict[str, str] = {
    "cascade_mask_rcnn": "cascade_mask_rcnn_swin_b_coco_3x.yaml",
    "retinanet": "retinanet_swin_l_voc.yaml",
}
# Swin's parameters that the Swin detection recipes keep out of weight decay (norms are covered
# by SOLVER.WEIGHT_DECAY_NORM).
NO_WEIGHT_DECAY = ("relative_position_bias_table", "absolute_pos_embed")


# --------------------------------------------------------------------------------------------
# Config


def add_swin_tuning_config(cfg: CN) -> None:
    """Add the keys of the tuned Swin backbone and of AdamW to a detectron2 config, in place."""
    cfg.MODEL.SWIN_TUNED = CN()
    # A name in detectors.SWIN_SPECS: swin_t, swin_s, swin_b, swin_l, swin_b_384, swin_l_384.
    cfg.MODEL.SWIN_TUNED.NAME = "swin_b"
    # Pre-trained backbone weights (Microsoft's, timm's, or a detection checkpoint with a
    # "backbone." prefix); "" for random initialisation. MODEL.WEIGHTS stays detectron2's
    # whole-detector checkpoint.
    cfg.MODEL.SWIN_TUNED.WEIGHTS = ""
    cfg.MODEL.SWIN_TUNED.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN_TUNED.OUT_FEATURES = list(OUT_FEATURES)
    cfg.MODEL.SWIN_TUNED.TUNING = CN()
    # A tuning method or named variant (detectors.TUNING_METHODS, e.g. e3va, e3va++, lorand, full).
    cfg.MODEL.SWIN_TUNED.TUNING.METHOD = "e3va"
    # Overrides of the method's hyperparameters as "key=value" strings; values are read as YAML
    # ("rank=16" -> 16), so the list also works on a command line: TUNING.HYPERPARAMETERS "['rank=16']".
    cfg.MODEL.SWIN_TUNED.TUNING.HYPERPARAMETERS = []

    cfg.SOLVER.SWIN_TUNED = CN()
    # "AdamW" (the papers): lr SOLVER.BASE_LR, weight decay SOLVER.WEIGHT_DECAY, none on norms
    # (SOLVER.WEIGHT_DECAY_NORM) nor on NO_WEIGHT_DECAY. "SGD": detectron2's own optimizer.
    cfg.SOLVER.SWIN_TUNED.OPTIMIZER = "AdamW"
    cfg.SOLVER.SWIN_TUNED.BETAS = (0.9, 0.999)


def config_path(detector: str) -> str:
    """The path of our config file for ``detector`` (package data under detectors/configs/)."""
    if detector not in CONFIG_FILES:
        raise UserInputError(f"unknown detector {detector!r} for engine detectron2; "
                             f"choose one of {', '.join(CONFIG_FILES)}")
    resource = importlib.resources.files("detectors") / "configs" / "detectron2" / CONFIG_FILES[detector]
    return str(resource)


def load_config(detector: str, num_classes: int | None = None, config_file: str | None = None,
                opts: Sequence[str] | Mapping[str, Any] = ()) -> CN:
    """A frozen config: detectron2's defaults + our keys + our file for ``detector`` (or
    ``config_file``) + ``opts`` + ``num_classes`` if given.

    ``opts`` is detectron2's command-line form ``["KEY", "VALUE", ...]`` or a mapping
    ``{"KEY": value}`` (as an experiment YAML writes it). A key that does not exist, or a value of
    the wrong type, is a ``UserInputError``.
    """
    items = [x for pair in opts.items() for x in pair] if isinstance(opts, Mapping) else list(opts)
    cfg = get_cfg()
    add_swin_tuning_config(cfg)
    path = config_file or config_path(detector)
    try:
        cfg.merge_from_file(path)
    except (KeyError, ValueError, AssertionError, OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"detectron2 config {path}: {exc}") from None
    try:
        cfg.merge_from_list(items)
    except (KeyError, ValueError, AssertionError) as exc:
        raise UserInputError(f"detectron2 config overrides {items}: {exc}") from None
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
        cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.freeze()
    return cfg


def parse_hyperparameters(items: Sequence[str]) -> dict[str, Any]:
    """``["rank=8", "init=zero_up"]`` -> ``{"rank": 8, "init": "zero_up"}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"MODEL.SWIN_TUNED.TUNING.HYPERPARAMETERS: {item!r} is not 'key=value'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserInputError(f"MODEL.SWIN_TUNED.TUNING.HYPERPARAMETERS: cannot read the value of "
                                 f"{item!r} ({exc})") from None
    return out


def build_optimizer(cfg: CN, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``SOLVER.SWIN_TUNED.OPTIMIZER`` names, over the parameters that train.

    AdamW (lr ``SOLVER.BASE_LR``, weight decay ``SOLVER.WEIGHT_DECAY``, ``SOLVER.SWIN_TUNED.BETAS``)
    with no decay on norms (``SOLVER.WEIGHT_DECAY_NORM``) and on ``NO_WEIGHT_DECAY`` parameters, as the
    Swin detection recipes set it. A train_net-style trainer uses it by overriding its
    ``build_optimizer`` classmethod; ``SOLVER.CLIP_GRADIENTS`` applies as in detectron2.
    """
    name = cfg.SOLVER.SWIN_TUNED.OPTIMIZER
    if name == "SGD":
        return build_sgd_optimizer(cfg, model)
    if name != "AdamW":
        raise UserInputError(f"SOLVER.SWIN_TUNED.OPTIMIZER must be AdamW or SGD, got {name!r}")
    params = get_default_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM, bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        overrides={key: {"weight_decay": 0.0} for key in NO_WEIGHT_DECAY})
    optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.SWIN_TUNED.BETAS),
                                  weight_decay=cfg.SOLVER.WEIGHT_DECAY, fused=True)
    return maybe_add_gradient_clipping(cfg, optimizer)


# --------------------------------------------------------------------------------------------
# Backbone


class SwinBackboneAdapter(Backbone):
    """A tuned backbone ({res2..res5} NCHW maps, ``out_channels``, ``strides``) as a detectron2
    ``Backbone``. It adds nothing: what trains inside is what the tuning method decided."""

    def __init__(self, body: nn.Module, out_features: Sequence[str] = OUT_FEATURES):
        super().__init__()
        unknown = [name for name in out_features if name not in OUT_FEATURES]
        if unknown or not out_features:
            raise UserInputError(f"MODEL.SWIN_TUNED.OUT_FEATURES must be a non-empty subset of "
                                 f"{list(OUT_FEATURES)}, got {list(out_features)}")
        self.body = body
        self._out_features = list(out_features)
        self._out_feature_channels = {name: int(body.out_channels[OUT_FEATURES.index(name)])
                                      for name in out_features}
        self._out_feature_strides = {name: int(body.strides[OUT_FEATURES.index(name)])
                                     for name in out_features}
        self._size_divisibility = int(getattr(body, "size_divisibility", 32))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {name: features[name] for name in self._out_features}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility


def build_swin_fpn(cfg: CN, bottom_up: SwinBackboneAdapter) -> FPN:
    """detectron2's FPN on the adapter: P2-P6 (max-pool P6) for the R-CNNs; P3-P7 with P6/P7
    from res5 for RetinaNet (``MODEL.META_ARCHITECTURE == "RetinaNet"``, FPN.IN_FEATURES res3-res5)."""
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [name for name in in_features if name not in bottom_up.output_shape()]
    if missing:
        raise UserInputError(f"MODEL.FPN.IN_FEATURES {in_features} asks for {missing}, which "
                             f"MODEL.SWIN_TUNED.OUT_FEATURES {list(bottom_up.output_shape())} does not give")
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        top_block = LastLevelP6P7(bottom_up.output_shape()["res5"].channels, out_channels, in_feature="res5")
    else:
        top_block = LastLevelMaxPool()
    return FPN(bottom_up=bottom_up, in_features=in_features, out_channels=out_channels,
               norm=cfg.MODEL.FPN.NORM, top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


def build_tuned_swin(cfg: CN) -> nn.Module:
    """The tuned Swin that ``MODEL.SWIN_TUNED`` describes."""
    spec = cfg.MODEL.SWIN_TUNED
    hyperparameters = parse_hyperparameters(spec.TUNING.HYPERPARAMETERS)
    try:
        return build_backbone(spec.NAME, tuning=spec.TUNING.METHOD, weights=spec.WEIGHTS or None,
                              drop_path_rate=spec.DROP_PATH_RATE, **hyperparameters)
    except UserInputError as exc:
        raise UserInputError(f"MODEL.SWIN_TUNED (NAME {spec.NAME}, TUNING.METHOD {spec.TUNING.METHOD}, "
                             f"TUNING.HYPERPARAMETERS {list(spec.TUNING.HYPERPARAMETERS)}): {exc}") from None


@BACKBONE_REGISTRY.register()
def build_swin_tuned_fpn_backbone(cfg: CN, input_shape: ShapeSpec) -> Backbone:
    """BACKBONE_REGISTRY entry: (CfgNode, ShapeSpec) -> FPN on the Swin tuned as
    ``MODEL.SWIN_TUNED`` says (``MODEL.BACKBONE.NAME: build_swin_tuned_fpn_backbone``)."""
    if input_shape.channels != 3:
        raise UserInputError(f"the Swin backbone takes 3-channel images; MODEL.PIXEL_MEAN has "
                             f"{input_shape.channels} values")
    return build_swin_fpn(cfg, SwinBackboneAdapter(build_tuned_swin(cfg), cfg.MODEL.SWIN_TUNED.OUT_FEATURES))


# --------------------------------------------------------------------------------------------
# Detectors


def _cascade_mask_rcnn(cfg: CN, backbone: Backbone) -> nn.Module:
    shapes = backbone.output_shape()
    return GeneralizedRCNN(backbone=backbone, proposal_generator=build_proposal_generator(cfg, shapes),
                           roi_heads=build_roi_heads(cfg, shapes), pixel_mean=cfg.MODEL.PIXEL_MEAN,
                           pixel_std=cfg.MODEL.PIXEL_STD, input_format=cfg.INPUT.FORMAT, vis_period=cfg.VIS_PERIOD)


def _retinanet(cfg: CN, backbone: Backbone) -> nn.Module:
    """RetinaNet's own ``from_config`` mapping, with our backbone instead of ``build_backbone(cfg)``."""
    head_cfg = cfg.MODEL.RETINANET
    shapes = [backbone.output_shape()[name] for name in head_cfg.IN_FEATURES]
    return RetinaNet(
        backbone=backbone, head=RetinaNetHead(cfg, shapes), head_in_features=head_cfg.IN_FEATURES,
        anchor_generator=build_anchor_generator(cfg, shapes),
        box2box_transform=Box2BoxTransform(weights=head_cfg.BBOX_REG_WEIGHTS),
        anchor_matcher=Matcher(head_cfg.IOU_THRESHOLDS, head_cfg.IOU_LABELS, allow_low_quality_matches=True),
        num_classes=head_cfg.NUM_CLASSES, focal_loss_alpha=head_cfg.FOCAL_LOSS_ALPHA,
        focal_loss_gamma=head_cfg.FOCAL_LOSS_GAMMA, smooth_l1_beta=head_cfg.SMOOTH_L1_LOSS_BETA,
        box_reg_loss_type=head_cfg.BBOX_REG_LOSS_TYPE, test_score_thresh=head_cfg.SCORE_THRESH_TEST,
        test_topk_candidates=head_cfg.TOPK_CANDIDATES_TEST, test_nms_thresh=head_cfg.NMS_THRESH_TEST,
        max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD, vis_period=cfg.VIS_PERIOD, input_format=cfg.INPUT.FORMAT)


META_ARCHITECTURES = {"cascade_mask_rcnn": ("GeneralizedRCNN", _cascade_mask_rcnn),
                      "retinanet": ("RetinaNet", _retinanet)}


class Detectron2Detector(Detector):
    """A detectron2 model behind the project's ``Detector`` interface.

    Images come in as the data pipeline makes them (RGB floats in [0, 1], C x H x W, already
    resized); they go to detectron2 as RGB floats in 0..255, which is what ``INPUT.FORMAT: RGB``
    and ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` in our config files describe. Labels 1..K become
    detectron2's classes 0..K-1 and back.

    Under DistributedDataParallel on CPU pass ``device_ids=None`` (detectron2's ``create_ddp_model``
    passes a device id, which torch rejects for CPU modules), and ``find_unused_parameters=True``:
    RetinaNet never uses the res2 output (E3VA trains its norm). Inside a process group made by
    someone else (Ray Train), every rank calls ``detectron2.utils.comm.create_local_process_group``.
    """

    engine = "detectron2"

    def __init__(self, name: str, model: nn.Module, cfg: CN):
        super().__init__()
        if cfg.INPUT.FORMAT != "RGB":
            raise UserInputError(f"INPUT.FORMAT must be RGB (the Swin weights take RGB images), "
                                 f"got {cfg.INPUT.FORMAT!r}")
        self.name = name
        self.model = model
        self.cfg = cfg
        self.has_masks = isinstance(model, GeneralizedRCNN) and bool(cfg.MODEL.MASK_ON)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone.bottom_up.body

    def _inputs(self, images: Sequence[torch.Tensor], targets: Sequence[dict] | None = None,
                output_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict]:
        inputs = []
        for i, image in enumerate(images):
            height, width = image.shape[-2:]
            # "height"/"width": the frame detectron2's postprocess maps the predictions to.
            out_height, out_width = output_sizes[i] if output_sizes else (height, width)
            item = {"image": image * 255.0, "height": int(out_height), "width": int(out_width)}
            if targets is not None:
                item["instances"] = self._instances(targets[i], (int(height), int(width)))
            inputs.append(item)
        return inputs

    def _instances(self, target: dict, size: tuple[int, int]) -> Instances:
        instances = Instances(size)
        instances.gt_boxes = Boxes(target["boxes"].float().reshape(-1, 4))
        instances.gt_classes = target["labels"].long() - 1
        if self.has_masks:
            if "masks" not in target:
                raise UserInputError(f"{self.name} trains a mask head, but the targets have no 'masks' "
                                     f"(box-only data such as VOC needs a box detector)")
            instances.gt_masks = BitMasks(target["masks"])
        return instances

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Training mode: detectron2's loss dict for ``targets``. Eval mode: ``predict(images)``."""
        if not self.training:
            return self.predict(images)
        if targets is None:
            raise ValueError("targets are required in training mode")
        inputs = self._inputs(images, targets)
        with _event_storage():
            return self.model(inputs)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor],
                output_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, torch.Tensor]]:
        was_training = self.training
        self.eval()
        try:
            # detectron2's own inference and postprocess (detector_postprocess): boxes scaled to
            # "height" x "width" and clipped, empty boxes dropped, masks pasted there at >= 0.5.
            outputs = self.model(self._inputs(images, output_sizes=output_sizes))
        finally:
            self.train(was_training)
        return [self._prediction(out["instances"]) for out in outputs]

    def _prediction(self, result: Instances) -> dict[str, torch.Tensor]:
        out = {"boxes": result.pred_boxes.tensor, "scores": result.scores, "labels": result.pred_classes + 1}
        if self.has_masks:
            out["masks"] = result.pred_masks[:, None]
        return out


@contextlib.contextmanager
def _event_storage():
    """detectron2's heads log to the current EventStorage: open a throwaway one where none is open
    (a detectron2 trainer has its own)."""
    try:
        get_event_storage()
    except (AssertionError, IndexError):
        with EventStorage():
            yield
        return
    yield


def build_detectron2_detector(detector: str, backbone: nn.Module, num_classes: int, *,
                              config_file: str | None = None, opts: Sequence[str] | Mapping[str, Any] = (),
                              **unknown: Any) -> Detectron2Detector:
    """``detector`` (cascade_mask_rcnn or retinanet) from our config file, on the tuned ``backbone``.

    ``num_classes`` counts the object classes (detectron2 adds its own background). The options
    (``build_detector(..., detector_options=...)``, an experiment's ``model.options``) are
    ``config_file``, which replaces our file, and ``opts`` (``["KEY", "VALUE", ...]`` or
    ``{"KEY": value}``), which override it. Of the ``MODEL.SWIN_TUNED`` keys only ``OUT_FEATURES``
    is used: the backbone is already built and tuned.
    """
    if unknown:
        raise UserInputError(f"unknown option(s) {', '.join(sorted(unknown))} for engine detectron2; "
                             f"valid: config_file, opts")
    if detector not in META_ARCHITECTURES:
        raise UserInputError(f"unknown detector {detector!r} for engine detectron2; "
                             f"choose one of {', '.join(META_ARCHITECTURES)}")
    if num_classes < 1:
        raise UserInputError(f"num_classes must be at least 1, got {num_classes}")
    cfg = load_config(detector, num_classes=num_classes, config_file=config_file, opts=opts)
    meta_arch, build = META_ARCHITECTURES[detector]
    if cfg.MODEL.META_ARCHITECTURE != meta_arch:
        raise UserInputError(f"{detector} needs MODEL.META_ARCHITECTURE {meta_arch}, "
                             f"the config says {cfg.MODEL.META_ARCHITECTURE}")
    fpn = build_swin_fpn(cfg, SwinBackboneAdapter(backbone, cfg.MODEL.SWIN_TUNED.OUT_FEATURES))
    return Detectron2Detector(detector, build(cfg, fpn), cfg)


__all__ = ["CONFIG_FILES", "Detectron2Detector", "SwinBackboneAdapter", "add_swin_tuning_config",
           "build_detectron2_detector", "build_optimizer", "build_swin_fpn", "build_swin_tuned_fpn_backbone",
           "build_tuned_swin", "config_path", "load_config", "parse_hyperparameters"]
