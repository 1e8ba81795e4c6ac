"""UPerNet on the tuned Swin: every tuning method builds and takes a training step; E3VA keeps the frozen
backbone out of backpropagation; the heads have the recipe's structure."""
import re

import pytest
import torch

from detectors.backbones import build_swin
from detectors.segmentation import IGNORE_INDEX, UPerNet
from detectors.tuning import build_tuning, variant_table

pytest.importorskip("transformers")
TINY = dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))


def tiny_backbone(method: str):
    return build_tuning(method).apply(build_swin("swin_t", **TINY))


def batch(classes: int = 4):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    labels = torch.randint(0, classes, (2, 64, 96), generator=generator)
    labels[:, :8] = IGNORE_INDEX
    return images, labels


@pytest.mark.parametrize("method", sorted(variant_table()))
def test_every_method_takes_a_training_step_in_upernet(method):
    torch.manual_seed(0)
    model = UPerNet(tiny_backbone(method), num_classes=4, channels=32,
                    auxiliary_channels=16).train()
    images, labels = batch()
    losses = model(images, labels)
    assert set(losses) == {"loss_seg", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())
    # The method's own backbone parameters (not the heads, not the output norms) take a gradient step.
    own = [p for n, p in model.backbone.named_parameters()
           if p.requires_grad and not re.match(r"(backbone\.)?norm[0-3]\.", n)]
    before = [p.detach().clone() for p in own]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sum(losses.values()).backward()
    optimizer.step()
    if variant_table()[method][0] != "fixed":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 and not torch.equal(b, p)
                   for b, p in zip(before, own)), f"none of {method}'s own parameters took a step"
    heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert all(p.requires_grad for p in heads)
    with torch.no_grad():
        logits = model.eval()(images)
    assert logits.shape == (2, 4, 64, 96)


def test_e3va_keeps_the_frozen_backbone_out_of_backpropagation(inside_backbone):
    """No tensor is saved for backward inside the backbone (``full`` is the control), and an AdamW step
    with weight decay over every parameter leaves every frozen one as it was."""
    saved = {}
    for method in ("e3va", "full"):
        torch.manual_seed(0)
        model = UPerNet(tiny_backbone(method), num_classes=3, channels=32, auxiliary_channels=16).train()
        swin = model.backbone.backbone if method == "e3va" else model.backbone
        probe = inside_backbone(swin)
        images, labels = batch(3)
        with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
            loss = sum(model(images, labels).values())
        saved[method] = probe.inside
    assert saved["full"] > 0 and saved["e3va"] == 0, saved
    model = UPerNet(tiny_backbone("e3va"), num_classes=3, channels=32, auxiliary_channels=16).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sum(model(images, labels).values()).backward()
    optimizer.step()
    assert frozen and all(torch.equal(model.get_parameter(n), value) for n, value in frozen.items())


def test_the_heads_follow_the_swin_recipe():
    """PPM scales 1, 2, 3, 6 and 512 channels on stride 32, FPN over all four maps, the auxiliary FCN head
    on the stride-16 map (256 channels, one 3x3 conv) weighted 0.4; 150 ADE20K classes."""
    with torch.device("meta"):
        model = UPerNet(build_swin("swin_t"), num_classes=150)
    head = model.decode_head
    assert [block.layers[0].output_size for block in head.psp_modules.blocks] == [1, 2, 3, 6]
    assert head.channels == 512 and len(head.lateral_convs) == 3 and head.classifier.out_channels == 150
    assert model.auxiliary_head.in_channels == 384 and model.auxiliary_head.channels == 256
    assert model.auxiliary_weight == 0.4
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("decode_head", "auxiliary_head")}
    # mmsegmentation's UPerHead and FCNHead on Swin-T's (96, 192, 384, 768), counted by hand: convolutions
    # without bias, each followed by BatchNorm (2 x 512 numbers), classifiers with bias
    bn = 2 * 512
    ppm = 4 * (768 * 512 + bn)
    bottleneck = (768 + 4 * 512) * 512 * 9 + bn
    laterals = (96 + 192 + 384) * 512 + 3 * bn
    fpn = 3 * (512 * 512 * 9 + bn)
    fusion = 4 * 512 * 512 * 9 + bn
    assert counts["decode_head"] == ppm + bottleneck + laterals + fpn + fusion + 512 * 150 + 150  # 31.50M
    assert counts["auxiliary_head"] == 384 * 256 * 9 + 2 * 256 + 256 * 150 + 150  # 0.92M


def test_sliding_windows_cover_the_image_and_equal_the_whole_image_pass_for_one_window():
    from detectors.segmentation.upernet import slide_inference
    torch.manual_seed(0)
    model = UPerNet(tiny_backbone("fixed"), num_classes=3, channels=16, auxiliary_channels=8).eval()
    image = torch.randn(1, 3, 64, 96)
    whole = model(image)
    assert torch.allclose(slide_inference(model, image, crop=(64, 96), stride=(64, 96)), whole, atol=1e-5)
    windows = slide_inference(model, image, crop=(64, 64), stride=(32, 32))  # two overlapping windows
    assert windows.shape == whole.shape and torch.isfinite(windows).all()
    left = model(image[:, :, :, :64])
    assert torch.allclose(windows[..., :32], left[..., :32], atol=1e-5)  # only the first window covers these


def test_bench_measures_upernet_training_steps_side_by_side():
    """``bench --detector upernet``: E3VA keeps the Swin out of backward, so it saves bytes for backward and
    holds fewer gradients and optimizer state than full fine-tuning; the heads train in both."""
    from detectors.bench import benchmark
    results = {r.method: r for r in benchmark("swin_t", ("full", "e3va"), (64, 64), 2, "cpu", 1, detector="upernet",
                                              backbone_kwargs=TINY)}
    assert results["e3va"].saved_bytes < results["full"].saved_bytes
    assert results["e3va"].train_bytes < results["full"].train_bytes
    assert results["e3va"].trainable < results["full"].trainable


def test_the_losses_keep_only_the_small_logits_for_backward_and_give_the_same_gradients(monkeypatch):
    """The full-size log-probabilities are recomputed in backward, not kept: same gradients, less saved."""
    from detectors.bench import saved_tensor_bytes
    from detectors.segmentation import upernet
    torch.manual_seed(0)
    model = UPerNet(tiny_backbone("e3va"), num_classes=150, channels=32, auxiliary_channels=16).train()
    images, labels = batch(150)

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)
        sum(model(images, labels).values()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def saved():
        return saved_tensor_bytes(lambda: sum(model(images, labels).values()))

    recomputed, recomputed_saved = gradients(), saved()
    monkeypatch.setattr(upernet, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    kept, kept_saved = gradients(), saved()
    assert all(torch.equal(a, b) for a, b in zip(recomputed, kept)) and len(kept) > 10
    # two heads x 2 images x 150 classes x 64x96 float log-probabilities no longer saved
    assert kept_saved - recomputed_saved >= 2 * 2 * 150 * 64 * 96 * 4 * 0.9
