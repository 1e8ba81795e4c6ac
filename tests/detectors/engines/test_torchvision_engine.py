"""The torchvision engine on tuned Swin backbones: every method in every detector, training,
prediction and COCO evaluation on the synthetic dataset."""
import itertools

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detectors.data import CocoDetection, build_transforms, collate_fn, make_synthetic_coco
from detectors.engines import ENGINES, build_detector
from detectors.errors import UserInputError
from detectors.training import check_num_classes, evaluate, training_step
from detectors.tuning import variant_table

TINY = dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
# torchvision samples for 800-pixel images by default; these suit 96-pixel ones on a CPU
SMALL_IMAGES = dict(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=300,
                    rpn_post_nms_top_n_test=150, box_batch_size_per_image=64, box_detections_per_img=30)
RETINANET_SMALL = dict(topk_candidates=300, detections_per_img=30)


def options(detector: str) -> dict:
    return RETINANET_SMALL if detector == "retinanet" else SMALL_IMAGES
DETECTORS = ENGINES.get("torchvision").detectors


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    paths = make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), num_train=32, num_val=8,
                                image_size=(96, 128), num_classes=3, seed=0)
    train = CocoDetection(paths["train_images"], paths["train_json"], build_transforms(True, (96,), 128))
    val = CocoDetection(paths["val_images"], paths["val_json"], build_transforms(False, test_short_edge=96,
                                                                                  max_size=128))
    return train, val


def first_batch(dataset, size=2):
    return collate_fn([dataset[i] for i in range(size)])


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("method", sorted(variant_table()))
def test_every_method_takes_a_training_step_in_every_detector(detector, method, synthetic):
    torch.manual_seed(0)
    model = build_detector("torchvision", detector, 3, "swin_t", method, detector_options=options(detector),
                           **TINY).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = training_step(model, optimizer, *first_batch(synthetic[0]))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # the neck and heads always train; the backbone only as the method says
    neck_and_heads = [p for name, p in model.named_parameters() if "backbone.body" not in name]
    assert all(p.requires_grad for p in neck_and_heads)
    frozen_backbone = [p for p in model.backbone.parameters() if not p.requires_grad]
    if method == "full":
        assert not frozen_backbone
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))


@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet"])
def test_e3va_detector_loss_falls_and_evaluation_reports_coco_figures(detector, synthetic):
    train, val = synthetic
    torch.manual_seed(0)
    model = build_detector("torchvision", detector, 3, "swin_t", "e3va", detector_options=options(detector),
                           **TINY).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate_fn,
                                         generator=torch.Generator().manual_seed(0))
    history = [training_step(model, optimizer, *batch, clip_norm=1.0)["loss"]
               for batch in itertools.islice(itertools.cycle(loader), 24)]
    assert sum(history[-6:]) / 6 < 0.8 * sum(history[:6]) / 6, history
    metrics = evaluate(model, val)
    for kind in ("bbox", "segm") if detector == "mask_rcnn" else ("bbox",):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert f"{kind}/{name}" in metrics
    assert ("segm/AP" in metrics) == (detector == "mask_rcnn")
    prediction = model.predict([val[0][0]])[0]
    assert {"boxes", "scores", "labels"} <= set(prediction)
    assert ("masks" in prediction) == (detector == "mask_rcnn")


@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet"])
def test_predictions_in_the_original_frame_are_torchvisions_own(detector, synthetic):
    # torchvision's stock transform resizes the original image itself and pastes the soft masks back
    # at the original size; its reference COCO evaluation keeps mask probabilities > 0.5. The project
    # gets the resized image from its data pipeline and asks predict for the original frame: the
    # boxes and binary masks must be the same. An untrained head puts many mask probabilities near
    # 0.5, where a quantised threshold (128/255) would differ.
    torch.manual_seed(0)
    score_options = {"retinanet": dict(score_thresh=0.0)}.get(detector, dict(box_score_thresh=0.0))
    model = build_detector("torchvision", detector, 3, "swin_t", "e3va",
                           detector_options={**options(detector), **score_options}, **TINY).eval()
    original = torch.rand(3, 60, 90)
    # torchvision normalises before it resizes; an identity normalisation makes the order exact
    model.model.transform.image_mean, model.model.transform.image_std = [0.0] * 3, [1.0] * 3
    stock = GeneralizedRCNNTransform(min_size=96, max_size=160, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                                     size_divisible=32).eval()
    resized, _ = stock.resize(original)
    assert resized.shape[-2:] != original.shape[-2:]
    ours = model.predict([resized], output_sizes=[tuple(original.shape[-2:])])[0]
    model.model.transform = stock
    with torch.no_grad():
        theirs = model.model([original])[0]
    assert len(theirs["scores"]) > 0
    assert torch.equal(ours["labels"], theirs["labels"]) and torch.equal(ours["scores"], theirs["scores"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=1e-4)
    if detector == "mask_rcnn":
        near_half = ((theirs["masks"] - 0.5).abs() < 2e-3).sum()
        assert near_half > 0  # the case a 0..255 paste gets wrong
        assert ours["masks"].dtype == torch.bool and ours["masks"].shape == (len(theirs["scores"]), 1, 60, 90)
        assert torch.equal(ours["masks"], theirs["masks"] > 0.5)
    else:
        assert "masks" not in ours


def test_unknown_engine_and_detector_are_one_line_errors():
    with pytest.raises(UserInputError, match="engine 'mmdet'"):
        build_detector("mmdet", "mask_rcnn", 3)
    with pytest.raises(UserInputError, match="detector 'yolo' for engine torchvision"):
        build_detector("torchvision", "yolo", 3)


def test_a_dataset_with_more_categories_than_the_head_is_refused(synthetic):
    with pytest.raises(UserInputError, match="category id .* is out of range"):
        check_num_classes(synthetic[0], num_classes=2)
    check_num_classes(synthetic[0], num_classes=3)


@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet"])
def test_every_method_starts_from_the_same_neck_and_heads_at_one_seed(detector):
    """Whatever a tuning method draws at random, the FPN and heads built after it are the same at one seed:
    a gap between methods is the method's, not the heads' initialisation."""
    def neck_and_heads(method: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_detector("torchvision", detector, 3, backbone="swin_t", tuning=method, drop_path_rate=0.0,
                               detector_options=options(detector), **TINY)
        return {n: t for n, t in model.state_dict().items() if not n.startswith("model.backbone.body.")}

    fixed = neck_and_heads("fixed")
    assert any(".fpn." in n for n in fixed) and len(fixed) > 20
    for method in ("e3va", "lorand", "adapter"):
        other = neck_and_heads(method)
        assert other.keys() == fixed.keys()
        differing = [n for n in fixed if not torch.equal(other[n], fixed[n])]
        assert not differing, f"{method}: {len(differing)} neck/head tensors differ from fixed's, e.g. {differing[0]}"
