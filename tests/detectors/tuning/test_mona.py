"""Mona computes the reference's block, starts exactly on the frozen backbone, trains only itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectors.backbones import build_swin
from detectors.errors import UserInputError
from detectors.tuning import build_tuning
from detectors.tuning.base import iter_blocks
from detectors.tuning.mona import MonaTuner

TINY = dict(depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8))
ODD_SIZE = (2, 3, 96, 160)  # stride 4: 24 x 40, stride 32: 3 x 5, none a multiple of the window (7)


def _plain(seed: int = 0):
    torch.manual_seed(seed)
    return build_swin("swin_t", drop_path_rate=0.0, **TINY)


def _mona(seed: int = 0, **hparams):
    return build_tuning("mona", **hparams).apply(_plain(seed))


def _tuners(model: nn.Module) -> list[MonaTuner]:
    return [tuner for block in iter_blocks(model) for tuner in (block.attn_tuner, block.mlp_tuner)]


def _reference_mona(tuner: MonaTuner, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``Mona.forward`` of Leiyi-Hu/mona (mmdet ``swin_transformer_mona.py``), on (B, N, C) tokens."""
    identity = x
    x = tuner.norm(x) * tuner.gamma + x * tuner.gammax
    project1 = tuner.project1(x)
    b, n, c = project1.shape
    h, w = hw
    project1 = project1.reshape(b, h, w, c).permute(0, 3, 1, 2)
    op = tuner.adapter_conv
    identity1 = project1
    project1 = (op.conv1(project1) + op.conv2(project1) + op.conv3(project1)) / 3.0 + identity1
    project1 = project1 + op.projector(project1)
    project1 = project1.permute(0, 2, 3, 1).reshape(b, n, c)
    return identity + tuner.project2(tuner.dropout(F.gelu(project1)))


def _reference_forward(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference block: x = Mona1(x + MSA(LN1(x))); x = Mona2(x + MLP(LN2(x))), Mona on the
    residual stream after each add, written out without the branch-tuner slots."""
    x = model.embed(images)
    outputs = []
    for stage in model.layers:
        x = stage.downsample(x)
        for block in stage.blocks:
            b, h, w, c = x.shape
            x = x + block.attention_branch(x)
            x = _reference_mona(block.attn_tuner, x.reshape(b, h * w, c), (h, w)).reshape(b, h, w, c)
            x = x + block.mlp_branch(x)
            x = _reference_mona(block.mlp_tuner, x.reshape(b, h * w, c), (h, w)).reshape(b, h, w, c)
        outputs.append(x)
    return model.finish(outputs)


def _randomise(module: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# --------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_default_mona_starts_exactly_on_the_frozen_backbone(mode):
    """Tolerance: none. With project2 at zero every Mona adds an exact zero, so the features are
    bit-identical to the frozen backbone's, dropout active or not."""
    plain, tuned = _plain(), _mona()
    plain.train(mode == "train")
    tuned.train(mode == "train")
    images = torch.randn(*ODD_SIZE)
    with torch.no_grad():
        expected, actual = plain(images), tuned(images)
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_reference_init_does_not_start_on_the_backbone():
    """``init=reference`` (project2 truncated-normal, as the authors' runs start) moves the features
    at step 0; it is zero_up that makes the default exact (and the tuners are really called)."""
    plain, tuned = _plain().eval(), _mona(init="reference").eval()
    images = torch.randn(*ODD_SIZE)
    with torch.no_grad():
        expected, actual = plain(images), tuned(images)
    assert all((actual[k] - expected[k]).abs().max() > 1e-4 for k in expected)
    zero_up = _mona()
    for ref, zero in zip(_tuners(tuned), _tuners(zero_up)):
        assert torch.count_nonzero(ref.project2.weight) > 0 and torch.count_nonzero(zero.project2.weight) == 0
        assert torch.count_nonzero(zero.project1.weight) > 0
        assert torch.equal(ref.gamma, torch.full_like(ref.gamma, 1e-6))
        assert torch.equal(ref.gammax, torch.ones_like(ref.gammax))


def test_mona_is_the_reference_block_on_the_residual_stream():
    """Every Mona parameter randomised (biases, gammas, norms too, so every term matters), in float64:
    the slots give exactly the reference's x = Mona(x + branch(x)), at an odd size."""
    model = _mona(seed=2).double().eval()
    for tuner in _tuners(model):
        _randomise(tuner)
    images = torch.randn(*ODD_SIZE, dtype=torch.float64)
    with torch.no_grad():
        actual, expected = model(images), _reference_forward(model, images)
        plain = _plain(seed=2).double().eval()(images)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-10, rtol=1e-10)
        assert (actual[key] - plain[key]).abs().max() > 1e-3, key


def test_mona_is_not_a_serial_adapter_on_the_branch_output():
    """The reference's Mona(x + out) differs from the Houlsby placement out + g(out)."""
    torch.manual_seed(0)
    tuner = MonaTuner(16, hidden=8).double().eval()
    _randomise(tuner, 0.5)
    x, out = torch.randn(2, 5, 6, 16, dtype=torch.float64), torch.randn(2, 5, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        block = x + tuner(x, out)
        torch.testing.assert_close(block, (x + out) + tuner.delta(x + out), atol=1e-12, rtol=1e-12)
        assert (block - (x + out + tuner.delta(out))).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# Training


def test_training_moves_mona_and_leaves_every_frozen_parameter_bit_identical():
    """One step moves project2 of every Mona (the only factor with a gradient while it is zero);
    a second step moves every Mona parameter. No frozen parameter gets a gradient or moves."""
    model = _mona()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mona = {n for n, _ in model.named_parameters() if "_tuner." in n}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # a move is a gradient's
    torch.manual_seed(1)
    images = torch.randn(*ODD_SIZE)
    probes = None
    for step in (1, 2):
        optimizer.zero_grad(set_to_none=True)
        features = model(images)
        probes = probes or [torch.randn_like(f) for f in features.values()]
        loss = sum((f * probe).mean() for f, probe in zip(features.values(), probes))
        assert loss.abs() > 0
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if n in mona}
        optimizer.step()
        moved = {n for n, p in model.named_parameters() if n in mona and not torch.equal(p, before[n])}
        if step == 1:
            assert all(g is not None for g in grads.values())
            up = {n for n in mona if ".project2." in n}
            assert up and moved == up and all(grads[n].abs().sum() > 0 for n in up)
        else:
            assert all(g.abs().sum() > 0 for g in grads.values())
            assert moved == mona
        for n, p in model.named_parameters():
            if n not in mona:
                assert p.grad is None, f"frozen {n} received a gradient"
                assert torch.equal(p, before[n]), f"frozen {n} moved"


def test_exactly_the_mona_parameters_train():
    """Two Monas per block, nothing else: the output norms stay frozen, as in the reference."""
    model = _mona()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tuners = _tuners(model)
    assert len(tuners) == 2 * sum(TINY["depths"]) and all(isinstance(t, MonaTuner) for t in tuners)
    mona = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, MonaTuner)
            for n, _ in module.named_parameters()}
    assert trainable == mona
    assert not any(p.requires_grad for norm in model.output_norms for p in norm.parameters())
    plain_names = {n for n, _ in _plain().named_parameters()}
    assert not trainable & plain_names
    assert {n.split("_tuner.", 1)[1] for n in trainable} == {
        "norm.weight", "norm.bias", "gamma", "gammax", "project1.weight", "project1.bias",
        "adapter_conv.conv1.weight", "adapter_conv.conv1.bias", "adapter_conv.conv2.weight",
        "adapter_conv.conv2.bias", "adapter_conv.conv3.weight", "adapter_conv.conv3.bias",
        "adapter_conv.projector.weight", "adapter_conv.projector.bias", "project2.weight", "project2.bias"}


@pytest.mark.parametrize("hparams", [{}, {"dim": 8, "dropout": 0.0}])
def test_trainable_count_is_the_formula(hparams):
    """Per Mona: (2d + 5) C + d^2 + 88 d."""
    model = _mona(**hparams)
    d = hparams.get("dim", 64)
    expected = sum(depth * 2 * ((2 * d + 5) * c + d * d + 88 * d)
                   for depth, c in zip(TINY["depths"], model.out_channels))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert all(t.project1.out_features == d and t.dropout.p == hparams.get("dropout", 0.1) for t in _tuners(model))


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(("overrides", "named", "says"), [
    ({"dim": 0}, "dim=0", "positive"),
    ({"dim": -8}, "dim=-8", "positive"),
    ({"dim": "64"}, "dim='64'", "must be int"),
    ({"dim": 64.0}, "dim=64.0", "must be int"),
    ({"dropout": 1.0}, "dropout=1.0", "[0, 1)"),
    ({"dropout": -0.1}, "dropout=-0.1", "[0, 1)"),
    ({"dropout": "0.1"}, "dropout='0.1'", "must be float"),
    ({"init": "kaiming"}, "init='kaiming'", "zero_up, reference"),
    ({"init": 0}, "init=0", "must be str"),
    ({"rank": 8}, "'rank'", "dim, dropout, init"),
])
def test_bad_hyperparameters_are_one_line_naming_the_field(overrides, named, says):
    with pytest.raises(UserInputError) as exc:
        build_tuning("mona", **overrides)
    message = str(exc.value)
    assert "\n" not in message and "mona" in message
    assert named in message and says in message


def test_defaults_and_an_int_dropout():
    cfg = build_tuning("mona").cfg
    assert (cfg.dim, cfg.dropout, cfg.init) == (64, 0.1, "zero_up")
    assert build_tuning("mona", dropout=0).cfg.dropout == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision training runs on CUDA")
def test_mona_trains_under_cuda_autocast():
    model = _mona().cuda()
    images = torch.rand(*ODD_SIZE, device="cuda")
    with torch.autocast("cuda"):
        loss = sum(f.float().square().mean() for f in model(images).values())
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
