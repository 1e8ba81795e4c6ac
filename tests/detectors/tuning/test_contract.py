"""Every tuning method and named variant keeps the backbone's interface and trains exactly what it says."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from detectors.backbones import build_swin
from detectors.tuning import build_tuning, variant_table

NAMES = list(variant_table())
TINY = dict(depths=(1, 1, 2, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
IMAGES_SHAPE = (2, 3, 64, 96)


def _family(name: str) -> str:
    return variant_table()[name][0]


def _plain(seed: int = 0):
    torch.manual_seed(seed)
    return build_swin("swin_t", drop_path_rate=0.0, **TINY)


def _tuned(name: str, seed: int = 0, **hparams):
    backbone = _plain(seed)
    return build_tuning(name, **hparams).tune(backbone)


def _expected_trainable(name: str, model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_parameters()}
    family = _family(name)
    if family == "full":
        return names
    if family == "fixed":
        return set()
    if family == "bitfit":
        return {n for n in names if n.endswith(("bias", "relative_position_bias_table"))}
    if family == "norm":
        return {f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                for p, _ in module.named_parameters(recurse=False)}
    if family == "partial-1":
        return {n for n in names if n.startswith("layers.3.blocks.0.")}
    if family in ("adapter", "lora", "adaptformer", "lorand", "mona"):
        return {n for n in names if "_tuner." in n}
    if family == "e3va":
        return {n for n in names if n.startswith("highway.") or re.match(r"backbone\.norm[0-3]\.", n)}
    raise AssertionError(f"no expectation written for method {family}; add one")


def test_every_method_has_a_test_expectation_and_variants_exist():
    assert {"full", "fixed", "bitfit", "norm", "partial-1", "adapter", "lora", "adaptformer", "lorand",
            "mona", "e3va"} == {_family(n) for n in NAMES}
    assert {"e3va+", "e3va++", "lorand+", "lorand++"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_keep_the_plain_backbone_shapes(name):
    plain, tuned = _plain(), _tuned(name)
    images = torch.randn(*IMAGES_SHAPE)
    with torch.no_grad():
        expected, actual = plain(images), tuned(images)
    assert list(actual) == ["res2", "res3", "res4", "res5"]
    assert {k: v.shape for k, v in actual.items()} == {k: v.shape for k, v in expected.items()}
    assert tuned.out_channels == plain.out_channels and tuned.strides == plain.strides
    assert tuned.size_divisibility == 32


@pytest.mark.parametrize("name", NAMES)
def test_only_the_expected_parameters_train(name):
    model = _tuned(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = _expected_trainable(name, model)
    assert trainable == expected
    if _family(name) != "fixed":
        assert expected, "a method that trains something must train at least one parameter"
    if _family(name) in ("adapter", "lora", "adaptformer", "lorand", "mona", "e3va"):
        # The injected or highway parameters are new: the plain backbone has none of them.
        plain_names = {n for n, _ in _plain().named_parameters()}
        stripped = {n.removeprefix("backbone.") for n in trainable if not re.search(r"norm[0-3]\.", n)}
        assert stripped and not stripped & plain_names


def _own(name: str, model: nn.Module) -> set[str]:
    """What the method itself trains: its expected parameters less the output norms every method has."""
    return {n for n in _expected_trainable(name, model) if not re.match(r"(backbone\.)?norm[0-3]\.", n)}


@pytest.mark.parametrize("name", [n for n in NAMES if _family(n) != "fixed"])
def test_one_step_moves_the_methods_own_parameters_and_no_frozen_one(name):
    model = _tuned(name)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    own = _own(name, model)
    # Every parameter goes to the optimizer, as a careless detector would do: frozen ones must
    # still not move (no gradient may reach them, so AdamW skips them, weight decay included).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    torch.manual_seed(1)
    images = torch.randn(*IMAGES_SHAPE)
    features = model(images)
    probes = [torch.randn_like(f) for f in features.values()]
    loss = sum((f * probe).mean() for f, probe in zip(features.values(), probes))
    loss.backward()
    optimizer.step()

    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"frozen {n} moved"
    # The method's own parameters took a gradient step (not weight decay alone, not only the norms).
    stepped = {n for n, p in model.named_parameters()
               if n in own and p.grad is not None and p.grad.abs().sum() > 0 and not torch.equal(p, before[n])}
    assert own and stepped, f"none of {name}'s own parameters took a gradient step"


@pytest.mark.parametrize("name", ["e3va", "lorand", "adapter"])
def test_the_methods_modules_follow_the_seed(name):
    """Its own draws come from a stream seeded by the global seed: same seed, same modules; another, others."""
    def own(seed):
        torch.manual_seed(seed)
        model = build_tuning(name).tune(build_swin("swin_t", drop_path_rate=0.0, **TINY))
        return {n: p for n, p in model.named_parameters() if n in _own(name, model)}

    first, again, other = own(0), own(0), own(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


# Step-0 tolerance with default hyperparameters: methods whose added modules end in a zero factor
# reproduce the backbone to float precision; E3VA's default (``linear``) starts its highway next to it.
STEP0_RELATIVE_ERROR = {"e3va": 0.05}


@pytest.mark.parametrize("name", NAMES)
def test_tuned_backbone_starts_at_the_pretrained_one_with_default_hyperparameters(name):
    """Every output level of the tuned backbone is within the stated tolerance of the frozen one."""
    plain, tuned = _plain().eval(), _tuned(name).eval()
    images = torch.randn(*IMAGES_SHAPE)
    with torch.no_grad():
        expected, actual = plain(images), tuned(images)
    tolerance = STEP0_RELATIVE_ERROR.get(_family(name), 1e-6)
    for key in expected:
        error = (actual[key] - expected[key]).norm() / expected[key].norm()
        assert error <= tolerance, f"{name} {key}: relative error {error:.3g} > {tolerance}"


def test_e3va_zero_up_starts_exactly_on_the_pretrained_one():
    plain, tuned = _plain().eval(), _tuned("e3va", init="zero_up").eval()
    images = torch.randn(*IMAGES_SHAPE)
    with torch.no_grad():
        expected, actual = plain(images), tuned(images)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["adapter", "lora", "adaptformer", "lorand", "mona", "e3va"])
def test_tuners_are_not_a_no_op_once_their_zero_factor_moves(name):
    """The init test above would also pass if the tuners were never called."""
    hparams = {"init": "zero_up"} if name == "e3va" else {}
    plain, tuned = _plain().eval(), _tuned(name, **hparams).eval()
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if p.requires_grad and not re.search(r"norm[0-3]\.", n):
                p.add_(0.1 * torch.randn_like(p))
        images = torch.randn(*IMAGES_SHAPE)
        expected, actual = plain(images), tuned(images)
    assert (actual["res2"] - expected["res2"]).abs().max() > 1e-3
