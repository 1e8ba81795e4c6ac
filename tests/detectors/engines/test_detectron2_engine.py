"""The detectron2 engine: Cascade Mask R-CNN and RetinaNet on a tuned Swin, with the project's
Detector interface, and the registered backbone for detectron2's own build_model.

Skips as a whole where detectron2 is not installed (it publishes no wheels: CI installs the pinned source
in ../shared/deps, see README). What does not need detectron2 is tested elsewhere (test_layering.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import NaiveSyncBatchNorm  # noqa: E402
from detectron2.modeling import FPN, GeneralizedRCNN, RetinaNet, build_model  # noqa: E402
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7  # noqa: E402

from detectors.data import CocoDetection, build_transforms, collate_fn, make_synthetic_coco  # noqa: E402
from detectors.engines import build_detector  # noqa: E402
from detectors.engines import detectron2_engine as d2  # noqa: E402
from detectors.errors import UserInputError  # noqa: E402
from detectors.evaluation.coco_eval import METRIC_NAMES  # noqa: E402
from detectors.highway import HighwayBackbone  # noqa: E402
from detectors.training import evaluate, training_step  # noqa: E402
from detectors.tuning import build_tuned_swin, variant_table  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
NUM_CLASSES = 3
TINY = dict(backbone="swin_t", tuning="e3va", drop_path_rate=0.0, depths=(1, 1, 1, 1), embed_dim=32,
            num_heads=(1, 2, 4, 8))
# Our Cascade Mask R-CNN file has the paper's heads (4 convs of 256 in each of three box heads,
# 512 RoIs per image): about 20 s a step on 2 CPU cores. Training tests shrink them.
SMALL_HEADS = ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
               "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
               "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "256",
               "MODEL.RPN.POST_NMS_TOPK_TEST", "128"]
DETECTORS = ("cascade_mask_rcnn", "retinanet")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=4,
                               image_size=(128, 160), num_classes=NUM_CLASSES)


def _tiny(detector: str, opts: list[str] | dict | None = None) -> d2.Detectron2Detector:
    torch.manual_seed(0)
    options = {"opts": opts} if opts else None
    return build_detector("detectron2", detector, num_classes=NUM_CLASSES, detector_options=options, **TINY)


# --------------------------------------------------------------------------------------------
# Building


@pytest.mark.parametrize("detector", DETECTORS)
def test_detector_builds_on_a_tiny_e3va_swin(detector):
    model = _tiny(detector)
    assert isinstance(model, d2.Detectron2Detector)
    assert (model.engine, model.name) == ("detectron2", detector)
    assert model.has_masks is (detector == "cascade_mask_rcnn")
    assert isinstance(model.backbone, HighwayBackbone)
    fpn = model.model.backbone
    assert isinstance(fpn, FPN) and isinstance(fpn.bottom_up, d2.SwinBackboneAdapter)
    assert fpn.bottom_up.body is model.backbone
    assert fpn.size_divisibility == 32
    # Only E3VA's highway and output norms train in the backbone; neck and heads train.
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("highway.", "backbone.norm")) for n in trainable)
    in_backbone = {id(p) for p in model.backbone.parameters()}
    assert all(p.requires_grad for p in model.parameters() if id(p) not in in_backbone)
    if detector == "cascade_mask_rcnn":
        assert isinstance(model.model, GeneralizedRCNN)
        assert isinstance(fpn.top_block, LastLevelMaxPool)
        assert list(fpn.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
        assert model.model.roi_heads.num_cascade_stages == 3
        assert model.model.roi_heads.box_predictor[0].cls_score.out_features == NUM_CLASSES + 1
        # Synchronised BN that also runs under DDP on CPU workers (torch's SyncBatchNorm does not).
        norms = [m for m in model.model.roi_heads.box_head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(norms) == 3 * 4 and all(isinstance(m, NaiveSyncBatchNorm) for m in norms)
    else:
        assert isinstance(model.model, RetinaNet)
        assert isinstance(fpn.top_block, LastLevelP6P7)
        assert list(fpn.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
        assert model.model.num_classes == NUM_CLASSES


def test_options_override_our_file_as_a_list_or_a_mapping():
    as_list = _tiny("cascade_mask_rcnn", ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.FPN.OUT_CHANNELS", "64"])
    as_mapping = _tiny("cascade_mask_rcnn", {"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64, "MODEL.FPN.OUT_CHANNELS": 64})
    for model in (as_list, as_mapping):
        assert model.cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 64
        assert model.model.roi_heads.batch_size_per_image == 64
        assert model.model.backbone.output_shape()["p2"].channels == 64
        assert model.cfg.MODEL.ROI_HEADS.NUM_CLASSES == NUM_CLASSES  # num_classes wins over the file's 80


def test_our_config_files_ship_and_hold_the_papers_schedules():
    for detector in DETECTORS:
        assert Path(d2.config_path(detector)).is_file()
    cascade = d2.load_config("cascade_mask_rcnn")
    solver = cascade.SOLVER
    assert (solver.SWIN_TUNED.OPTIMIZER, solver.BASE_LR, solver.WEIGHT_DECAY) == ("AdamW", 1e-4, 0.05)
    assert cascade.SOLVER.IMS_PER_BATCH == 16 and cascade.SOLVER.MAX_ITER == 270000
    assert [s / cascade.SOLVER.MAX_ITER * 36 for s in cascade.SOLVER.STEPS] == [27, 33]
    assert tuple(cascade.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32)) and cascade.INPUT.MAX_SIZE_TRAIN == 1333
    voc = d2.load_config("retinanet")
    per_epoch = math.ceil(16551 / voc.SOLVER.IMS_PER_BATCH)
    assert voc.SOLVER.MAX_ITER == 12 * per_epoch and list(voc.SOLVER.STEPS) == [8 * per_epoch, 11 * per_epoch]
    assert (voc.MODEL.RETINANET.NUM_CLASSES, voc.MODEL.SWIN_TUNED.NAME, voc.SOLVER.BASE_LR) == (20, "swin_l", 1e-4)


def test_unknown_detector_for_detectron2_is_a_user_error():
    with pytest.raises(UserInputError, match="unknown detector 'mask_rcnn' for engine detectron2"):
        build_detector("detectron2", "mask_rcnn", num_classes=NUM_CLASSES, **TINY)
    with pytest.raises(UserInputError, match="unknown detector 'faster_rcnn' for engine detectron2"):
        d2.build_detectron2_detector("faster_rcnn", torch.nn.Identity(), NUM_CLASSES)


def test_bad_config_values_are_user_errors():
    backbone = _tiny("retinanet").backbone
    with pytest.raises(UserInputError, match="INPUT.FORMAT must be RGB"):
        d2.build_detectron2_detector("retinanet", backbone, NUM_CLASSES, opts=["INPUT.FORMAT", "BGR"])
    with pytest.raises(UserInputError, match="OUT_FEATURES"):
        d2.build_detectron2_detector("retinanet", backbone, NUM_CLASSES,
                                     opts=["MODEL.SWIN_TUNED.OUT_FEATURES", "['res2', 'res3']"])
    with pytest.raises(UserInputError, match="Non-existent key: MODEL.ROI_HEADS.NUM_CLASS"):
        d2.build_detectron2_detector("retinanet", backbone, NUM_CLASSES, opts={"MODEL.ROI_HEADS.NUM_CLASS": 4})
    with pytest.raises(UserInputError, match="unknown option.*box_batch_size_per_image.*valid: config_file, opts"):
        build_detector("detectron2", "retinanet", NUM_CLASSES, detector_options={"box_batch_size_per_image": 64},
                       **TINY)
    with pytest.raises(UserInputError, match="detectron2 config .*missing.yaml"):
        d2.build_detectron2_detector("retinanet", backbone, NUM_CLASSES, config_file="/nonexistent/missing.yaml")
    with pytest.raises(UserInputError, match="not 'key=value'"):
        d2.parse_hyperparameters(["rank"])
    assert d2.parse_hyperparameters(["rank=16", "init = zero_up"]) == {"rank": 16, "init": "zero_up"}


@pytest.mark.parametrize("method", sorted(variant_table()))
@pytest.mark.parametrize("detector", DETECTORS)
def test_every_tuning_method_builds_and_steps_in_both_detectors(detector, method, synthetic):
    """What trains in the backbone is what the method says; neck and heads train; one step runs."""
    torch.manual_seed(0)
    model = build_detector("detectron2", detector, num_classes=NUM_CLASSES,
                           detector_options={"opts": SMALL_HEADS} if detector == "cascade_mask_rcnn" else None,
                           **{**TINY, "tuning": method})
    torch.manual_seed(0)
    alone = build_tuned_swin("swin_t", method, drop_path_rate=0.0, depths=(1, 1, 1, 1), embed_dim=32,
                             num_heads=(1, 2, 4, 8))
    assert ({n for n, p in model.backbone.named_parameters() if p.requires_grad}
            == {n for n, p in alone.named_parameters() if p.requires_grad})
    in_backbone = {id(p) for p in model.backbone.parameters()}
    assert all(p.requires_grad for p in model.parameters() if id(p) not in in_backbone)
    train = CocoDetection(synthetic["train_images"], synthetic["train_json"])
    images, targets = collate_fn([train[0], train[1]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    assert math.isfinite(training_step(model, optimizer, images, targets)["loss"])


# --------------------------------------------------------------------------------------------
# detectron2's own build_model on our config files


def _cfg(detector: str, *opts: str):
    cfg = get_cfg()
    d2.add_swin_tuning_config(cfg)
    cfg.merge_from_file(d2.config_path(detector))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.SWIN_TUNED.NAME", "swin_t", *opts])
    return cfg


@pytest.mark.parametrize("detector", DETECTORS)
def test_registered_backbone_builds_from_our_yaml_with_build_model(detector):
    cfg = _cfg(detector, "MODEL.SWIN_TUNED.TUNING.HYPERPARAMETERS", "['rank=4']",
               "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RETINANET.NUM_CLASSES", "3")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    adapter = model.backbone.bottom_up
    assert isinstance(model.backbone, FPN) and isinstance(adapter, d2.SwinBackboneAdapter)
    assert isinstance(adapter.body, HighwayBackbone)
    assert adapter.body.highway[0][0].attn.rank == 4  # our hyperparameter key reached the method
    assert adapter.body.out_channels == [96, 192, 384, 768]  # swin_t from MODEL.SWIN_TUNED.NAME
    with torch.no_grad():
        outputs = model([{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}])
    assert outputs[0]["instances"].image_size == (64, 96)


def test_registered_backbone_follows_the_tuning_method_key():
    cfg = _cfg("retinanet", "MODEL.SWIN_TUNED.TUNING.METHOD", "bitfit")
    with pytest.raises(UserInputError, match=r"MODEL.SWIN_TUNED .*unknown hyperparameter 'rank' for method bitfit"):
        d2.build_tuned_swin(cfg)  # our file's rank=8 is E3VA's
    cfg.merge_from_list(["MODEL.SWIN_TUNED.TUNING.HYPERPARAMETERS", "[]"])
    body = d2.build_tuned_swin(cfg)
    trainable = [n for n, p in body.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("bias") or "relative_position_bias_table" in n for n in trainable)


def test_build_optimizer_is_adamw_over_what_trains():
    cfg = _cfg("retinanet")
    model = _tiny("retinanet")
    optimizer = d2.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["betas"] == (0.9, 0.999)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    decays = {group["weight_decay"] for group in optimizer.param_groups}
    assert decays == {0.0, 0.05}  # norms without decay, everything else with


# --------------------------------------------------------------------------------------------
# Training, prediction and evaluation on the synthetic data set


@pytest.mark.parametrize("detector", DETECTORS)
def test_predict_returns_the_documented_keys(detector, synthetic):
    # Score threshold 0 so that even an untrained model returns detections.
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    model = _tiny(detector, (SMALL_HEADS if detector == "cascade_mask_rcnn" else []) + opts)
    dataset = CocoDetection(synthetic["val_images"], synthetic["val_json"])
    images = [dataset[0][0], dataset[1][0][:, :96, :128]]  # two sizes, neither padded by the caller
    model.train()
    predictions = model.predict(images)
    assert model.training  # predict leaves the mode as it found it
    assert len(predictions) == 2
    for image, pred in zip(images, predictions):
        height, width = image.shape[-2:]
        expected = {"boxes", "scores", "labels"} | ({"masks"} if detector == "cascade_mask_rcnn" else set())
        assert set(pred) == expected
        n = len(pred["scores"])
        assert n > 0 and pred["boxes"].shape == (n, 4) and pred["labels"].dtype == torch.int64
        assert int(pred["labels"].min()) >= 1 and int(pred["labels"].max()) <= NUM_CLASSES
        boxes = pred["boxes"]
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= width
        assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= height
        if "masks" in pred:
            assert pred["masks"].shape == (n, 1, height, width) and pred["masks"].dtype == torch.bool
    model.eval()
    again = model(images)  # eval-mode forward is predict
    assert torch.equal(again[0]["boxes"], predictions[0]["boxes"])


@pytest.mark.slow
@pytest.mark.parametrize("detector", DETECTORS)
def test_training_lowers_the_loss_and_evaluate_gives_coco_metrics(detector, synthetic):
    model = _tiny(detector, SMALL_HEADS if detector == "cascade_mask_rcnn" else None)
    train = CocoDetection(synthetic["train_images"], synthetic["train_json"])
    batches = [collate_fn([train[i], train[i + 1]]) for i in range(0, len(train), 2)]  # 4 batches, fixed order
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    model.train()
    losses = []
    for step in range(8 * len(batches)):  # 8 epochs, 32 steps
        images, targets = batches[step % len(batches)]
        out = training_step(model, optimizer, images, targets)
        losses.append(out["loss"])
        if step == 0:
            keys = set(out) - {"loss"}
            if detector == "cascade_mask_rcnn":
                assert {"loss_rpn_cls", "loss_rpn_loc", "loss_mask", "loss_cls_stage2", "loss_box_reg_stage2"} <= keys
            else:
                assert keys == {"loss_cls", "loss_box_reg"}
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"{detector} losses: {[round(v, 3) for v in losses]}")
    assert last < 0.8 * first, f"first epoch {first:.3f}, last epoch {last:.3f}: {losses}"

    val = CocoDetection(synthetic["val_images"], synthetic["val_json"])
    metrics = evaluate(model, val, batch_size=2)
    expected = {f"bbox/{m}" for m in METRIC_NAMES} | {"bbox/VOC_AP50"}
    if detector == "cascade_mask_rcnn":
        expected |= {f"segm/{m}" for m in METRIC_NAMES}
    assert set(metrics) == expected
    assert all(isinstance(v, float) and (math.isnan(v) or 0.0 <= v <= 100.0) for v in metrics.values())
    assert model.training  # evaluate's predict put the mode back

    # The same images resized smaller, so predictions go back to the annotations' frame: the
    # project's figures equal those of detectron2's own inference (its postprocess pastes and
    # binarises the masks at the original size) scored by detectron2's own COCOEvaluator.
    resized = CocoDetection(synthetic["val_images"], synthetic["val_json"],
                            build_transforms(False, test_short_edge=96, max_size=160))
    ours = evaluate(model, resized, batch_size=2)
    theirs = _detectron2_evaluation(model, resized, synthetic, f"synthetic_val_{detector}")
    assert set(theirs) == {k for k in ours if k != "bbox/VOC_AP50"}
    for name, value in theirs.items():
        assert value == pytest.approx(ours[name], abs=1e-6, nan_ok=True), name
    if detector == "cascade_mask_rcnn":
        assert theirs["segm/AP50"] > 0  # the masks are scored, not empty


def _detectron2_evaluation(model, dataset, synthetic, name: str) -> dict[str, float]:
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    register_coco_instances(name, {}, str(synthetic["val_json"]), str(synthetic["val_images"]))
    DatasetCatalog.get(name)  # fills the metadata's category id mapping, as a detectron2 trainer does
    inputs = [{"image": image * 255.0, "height": int(target["orig_size"][0]), "width": int(target["orig_size"][1]),
               "image_id": int(target["image_id"])} for image, target in dataset]
    batches = [inputs[i:i + 2] for i in range(0, len(inputs), 2)]
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm") if model.has_masks else ("bbox",), distributed=False)
    results = inference_on_dataset(model.model, batches, evaluator)
    return {f"{kind}/{metric}": float(value) for kind, figures in results.items()
            for metric, value in figures.items() if "-" not in metric}  # per-category "AP-name" left out
