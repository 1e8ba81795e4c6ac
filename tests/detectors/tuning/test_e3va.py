"""E3VA's highway computes the paper's equations, trains only itself, and keeps no backbone activation."""

from __future__ import annotations

import re

import pytest
import torch
from timm.models.swin_transformer import PatchMerging
from torch import nn
from torch.func import functional_call

from detectors.backbones import build_swin
from detectors.bench import saved_tensor_bytes
from detectors.highway import (DualLowRankAdapter, HighwayBackbone, HighwayBlock, _keeps_z_and_y, _rows_t_mm,
                               highway_stage, merge_frozen)
from detectors.tuning import build_tuning

TINY = dict(depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8))
ODD_SIZE = (2, 3, 96, 160)  # stride 4: 24 x 40, stride 32: 3 x 5, none a multiple of the window (7)


def _plain(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_swin("swin_t", drop_path_rate=0.0, **{**TINY, **overrides})


def _e3va(seed: int = 0, **hparams) -> HighwayBackbone:
    model = build_tuning("e3va", **hparams).apply(_plain(seed))
    assert isinstance(model, HighwayBackbone)
    return model


def _inputs_of_output_norms(model: HighwayBackbone, images: torch.Tensor) -> list[torch.Tensor]:
    captured = {}
    handles = [norm.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0]))
               for i, norm in enumerate(model.backbone.output_norms)]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(4)]


def _reference_forward(model: HighwayBackbone, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's equations with plain autograd, written out independently of the fused highway:
    a_i = f_P1(l_i), m_i = f_P2(l_i + a_i), l_{i+1} = l_i + a_i + m_i;
    e_0 = l_0, e_{i+1} = e_i + A1(a_i) + A2(m_i), A(x) = x + U(GELU(D(x))); the frozen patch
    merging on e at stage boundaries; the output norms on each stage's e."""
    backbone = model.backbone
    with torch.no_grad():
        lane = backbone.embed(images)
    highway, outputs = lane, []
    for stage, adapters in zip(backbone.layers, model.highway):
        if not isinstance(stage.downsample, nn.Identity):
            with torch.no_grad():
                lane = stage.downsample(lane)
            highway = stage.downsample(highway)
        for block, adapter in zip(stage.blocks, adapters):
            with torch.no_grad():
                a = block.attention_branch(lane)
                m = block.mlp_branch(lane + a)
                lane = lane + a + m
            highway = highway + (a + adapter.attn(a)) + (m + adapter.mlp(m))
        outputs.append(highway)
    return backbone.finish(outputs)


def _randomise(module: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# --------------------------------------------------------------------------------------------
# Values


def test_zero_up_highway_reproduces_the_frozen_backbone_at_an_odd_size():
    model = _e3va(init="zero_up").eval()
    images = torch.randn(*ODD_SIZE)
    with torch.no_grad():
        highway = _inputs_of_output_norms(model, images)
        backbone = model.backbone.stage_outputs(images)
    for e, l in zip(highway, backbone):
        assert e.shape == l.shape
        torch.testing.assert_close(e, l, atol=1e-5, rtol=1e-5)


def test_kaiming_highway_follows_the_paper_equations_in_value_and_gradient():
    model = _e3va(seed=3).double()
    _randomise(model.highway)  # biases too, so every term matters
    images = torch.randn(*ODD_SIZE, dtype=torch.float64)

    def run(forward):
        model.zero_grad(set_to_none=True)
        out = forward(model, images)
        sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in out.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, grads

    fused_out, fused_grads = run(HighwayBackbone.forward)
    ref_out, ref_grads = run(_reference_forward)
    for key in ref_out:
        torch.testing.assert_close(fused_out[key], ref_out[key], atol=1e-10, rtol=1e-10)
    assert fused_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], atol=1e-9, rtol=1e-9, msg=name)
    # With non-zero U the highway is not the backbone any more.
    with torch.no_grad():
        plain = model.backbone.stage_outputs(images)
    assert (model.backbone.output_norms[0](plain[0]).permute(0, 3, 1, 2) - fused_out["res2"]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# Gradients


def test_one_backward_reaches_every_highway_parameter_and_no_backbone_weight():
    model = _e3va()
    out = model(torch.randn(*ODD_SIZE))
    sum((v * torch.randn_like(v)).mean() for v in out.values()).backward()
    for name, p in model.named_parameters():
        if name.startswith("highway.") or re.match(r"backbone\.norm[0-3]\.", name):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert name.startswith("backbone.") and not p.requires_grad, name
            # That no gradient reaches the backbone's computation: test_no_backbone_activation_is_saved...
    highway = [n for n, _ in model.named_parameters() if n.startswith("highway.")]
    assert len(highway) == 2 * 6 * sum(TINY["depths"])  # two adapters of six tensors per block


@pytest.mark.parametrize(("method", "saves_inside"), [("e3va", False), ("e3va-recompute", False), ("full", True)])
def test_no_backbone_activation_is_saved_for_backward(method, saves_inside, inside_backbone):
    """``full`` is the control: the same instrumentation does see its saved activations."""
    model = build_tuning(method).apply(_plain())
    backbone = model.backbone if isinstance(model, HighwayBackbone) else model
    probe = inside_backbone(backbone)
    with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
        out = model(torch.randn(*ODD_SIZE))
    assert probe.depth == 0
    assert probe.outside > 0  # the highway (or full's own glue) does save what backward needs
    assert (probe.inside > 0) == saves_inside
    sum(v.mean() for v in out.values()).backward()  # and backward still works with what was kept


def test_e3va_saves_far_fewer_bytes_for_backward_than_full():
    figures = {}
    for method in ("full", "e3va"):
        model = build_tuning(method).apply(_plain())
        images = torch.randn(2, 3, 128, 160)

        def step():
            out = model(images)
            sum(v.mean() for v in out.values()).backward()

        figures[method] = saved_tensor_bytes(step, exclude=model.parameters())
    assert figures["full"] > 0 and figures["e3va"] > 0
    assert figures["e3va"] < 0.25 * figures["full"], figures


# --------------------------------------------------------------------------------------------
# recompute: the frozen blocks again in backward instead of their outputs kept


def _swin_t_step(recompute: bool, drop_path_rate: float):
    """One training step of E3VA on a real Swin-T (with a trained-looking highway): outputs and gradients."""
    torch.manual_seed(0)
    model = build_tuning("e3va", recompute=recompute).tune(build_swin("swin_t", drop_path_rate=drop_path_rate))
    _randomise(model.highway, 0.05)
    model.train()
    torch.manual_seed(1)
    out = model(torch.randn(2, 3, 96, 128))
    sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values()).backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, torch.rand(4)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_recompute_gives_bit_identical_outputs_and_gradients_on_swin_t(drop_path_rate):
    """Drop-path on the frozen blocks draws random numbers: backward replays forward's, so the
    recomputed branches are the ones forward used, and the generator ends where it would have."""
    out, grads, after = _swin_t_step(False, drop_path_rate)
    out_r, grads_r, after_r = _swin_t_step(True, drop_path_rate)
    assert all(torch.equal(out[k], out_r[k]) for k in out)
    assert grads.keys() == grads_r.keys() and len(grads) == 2 * 6 * 12 + 8  # 12 blocks of Swin-T, 4 norms
    assert all(g.abs().sum() > 0 for g in grads.values())
    unequal = [n for n in grads if not torch.equal(grads[n], grads_r[n])]
    assert not unequal, unequal[:5]
    assert torch.equal(after, after_r)


def test_recompute_keeps_less_than_half_the_bytes_and_only_in_training():
    images = torch.randn(2, 3, 128, 160)
    saved, outputs = {}, {}
    for recompute in (False, True):
        model = _e3va(recompute=recompute)

        def step():
            out = model(images)
            sum(v.mean() for v in out.values()).backward()
        saved[recompute] = saved_tensor_bytes(step, exclude=model.parameters())
        with torch.no_grad():  # inference takes the shared frozen pass, the same in both modes
            outputs[recompute] = model(images)
    assert 0 < saved[True] < 0.5 * saved[False], saved
    assert all(torch.equal(outputs[False][k], outputs[True][k]) for k in outputs[False])


def test_recompute_runs_each_frozen_block_twice_per_step(monkeypatch):
    """Once in forward, once more in backward: no stage is run a third time for a later stage's input."""
    model = _e3va(recompute=True)
    calls: dict[int, int] = {}
    for stage in model.backbone.layers:
        for block in stage.blocks:
            def counted(x, branch=block.attention_branch, key=id(block)):
                calls[key] = calls.get(key, 0) + 1
                return branch(x)
            monkeypatch.setattr(block, "attention_branch", counted)
    out = model(torch.randn(1, 3, 128, 160))
    sum(v.mean() for v in out.values()).backward()
    blocks = [block for stage in model.backbone.layers for block in stage.blocks]
    assert [calls.get(id(block)) for block in blocks] == [2] * len(blocks)


# --------------------------------------------------------------------------------------------
# The fused pieces against plain autograd


def _step_case(dim: int = 8, rank: int = 2, shape=(2, 3, 4), seed: int = 0):
    torch.manual_seed(seed)
    block = HighwayBlock(dim, rank).double()
    _randomise(block, 0.5)
    d = torch.randn(*shape, dim, dtype=torch.float64, requires_grad=True)
    a = torch.randn(*shape, dim, dtype=torch.float64)
    m = torch.randn(*shape, dim, dtype=torch.float64)
    return block, d, a, m


def _outputs_and_gradients(module, lead, forwards):
    """For each forward: its output, and the gradients of lead and of every parameter of module
    under one fixed weighting of the output."""
    weights = torch.randn_like(lead)
    results = []
    for forward in forwards:
        module.zero_grad(set_to_none=True)
        lead.grad = None
        out = forward()
        (out * weights).sum().backward()
        results.append((out.detach(), lead.grad.clone(), {n: p.grad.clone() for n, p in module.named_parameters()}))
    return results


def test_fused_highway_step_equals_plain_autograd_in_value_and_gradients():
    block, d, a, m = _step_case()
    (fused, fused_d, fused_p), (ref, ref_d, ref_p) = _outputs_and_gradients(
        block, d, [lambda: block(d, a, m), lambda: d + block.attn(a) + block.mlp(m)])
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused_d, ref_d, atol=1e-12, rtol=1e-12)
    assert fused_p.keys() == ref_p.keys() and len(ref_p) == 12
    for name in ref_p:
        torch.testing.assert_close(fused_p[name], ref_p[name], atol=1e-10, rtol=1e-10, msg=name)
        assert ref_p[name].abs().sum() > 0, name


def test_fused_highway_step_passes_gradcheck():
    block, d, a, m = _step_case(dim=4, rank=1, shape=(1, 2, 3))
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in block.parameters()]

    def step(d, *params):
        return functional_call(block, dict(zip(names, params)), (d, a, m))

    assert torch.autograd.gradcheck(step, (d, *params))


def _stage_case(blocks: int = 3, dim: int = 8, rank: int = 2, shape=(2, 3, 4), seed: int = 0):
    torch.manual_seed(seed)
    stage = nn.ModuleList(HighwayBlock(dim, rank) for _ in range(blocks)).double()
    _randomise(stage, 0.5)
    lead = torch.randn(*shape, dim, dtype=torch.float64, requires_grad=True)
    branches = [(torch.randn(*shape, dim, dtype=torch.float64), torch.randn(*shape, dim, dtype=torch.float64))
                for _ in range(blocks)]
    return stage, lead, branches


def _lanes(lead: torch.Tensor, branches) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features before and after a stage whose branch outputs are ``branches``."""
    start = torch.randn_like(lead).detach()
    return start, start + sum(a + m for a, m in branches)


@pytest.mark.parametrize("threads, dim, with_lanes", [(1, 8, False), (3, 8, False), (3, 32, False), (3, 32, True)])
def test_fused_highway_stage_equals_plain_autograd_in_value_and_gradients(threads, dim, with_lanes, monkeypatch):
    """Several blocks through one stage function; 3 "threads" and 2 x 32 x 48 rows take the
    row-split weight gradients, 1 the plain ones. At dim 8 backward recomputes z and y, at dim 32
    it keeps them. With the lanes given, the lead is the highway itself and the result e_end."""
    assert _keeps_z_and_y(dim, 2 * 2) == (dim == 32)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    stage, lead, branches = _stage_case(dim=dim, shape=(2, 32, 48))
    lanes = _lanes(lead, branches) if with_lanes else None

    def plain():
        out = lead
        for block, (a, m) in zip(stage, branches):
            out = out + (a + block.attn(a)) + (m + block.mlp(m)) if lanes else out + block.attn(a) + block.mlp(m)
        return out

    def fused():
        return highway_stage(lead, [(b, a, m) for b, (a, m) in zip(stage, branches)], lanes)

    (fused, fused_lead, fused_p), (ref, ref_lead, ref_p) = _outputs_and_gradients(stage, lead, [fused, plain])
    torch.testing.assert_close(fused, ref, atol=1e-11, rtol=1e-12)
    torch.testing.assert_close(fused_lead, ref_lead, atol=1e-12, rtol=1e-12)
    assert fused_p.keys() == ref_p.keys() and len(ref_p) == 3 * 12
    for name in ref_p:
        torch.testing.assert_close(fused_p[name], ref_p[name], atol=1e-9, rtol=1e-9, msg=name)
        assert ref_p[name].abs().sum() > 0, name


@pytest.mark.parametrize("dim, with_lanes", [(4, False), (16, False), (16, True)])  # z and y recomputed; kept
def test_fused_highway_stage_passes_gradcheck(dim, with_lanes):
    stage, lead, branches = _stage_case(blocks=2, dim=dim, rank=1, shape=(1, 2, 3))
    lanes = _lanes(lead, branches) if with_lanes else None
    names = [n for n, _ in stage.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in stage.parameters()]

    def run(lead, *params):
        tensors = dict(zip(names, params))
        steps = []
        for i, (block, (a, m)) in enumerate(zip(stage, branches)):
            own = {n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith(f"{i}.")}
            steps.append((_Factors(own), a, m))
        return highway_stage(lead, steps, lanes)

    assert torch.autograd.gradcheck(run, (lead, *params))


class _Factors:
    """Stands in for a HighwayBlock whose factors are given tensors (for gradcheck)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def factors(self):
        return tuple(self.tensors[f"{branch}.{name}"] for branch in ("attn", "mlp")
                     for name in ("down_t", "down_s", "down_bias", "up_t", "up_s", "up_bias"))


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_row_split_weight_gradient_matmul_equals_plain(parts):
    torch.manual_seed(0)
    rows = 3 * 1024 * 2
    a = torch.randn(rows, 40, dtype=torch.float64)[:, 8:24]  # a column slice, as dL/dy_k is
    b = torch.randn(rows, 12, dtype=torch.float64)
    torch.testing.assert_close(_rows_t_mm(a, b, parts), a.T @ b, atol=1e-10, rtol=1e-10)


def _merge_case(seed: int = 0, shape=(2, 4, 6, 6)):
    torch.manual_seed(seed)
    merge = PatchMerging(dim=shape[-1], out_dim=2 * shape[-1]).double()
    _randomise(merge, 0.5)
    merge.requires_grad_(False)  # frozen, as in the backbone
    e = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    return merge, e


def test_merge_frozen_equals_patch_merging_in_value_and_gradient():
    merge, e = _merge_case()
    weights = torch.randn(2, 2, 3, 12, dtype=torch.float64)
    results = []
    for forward in (merge_frozen, lambda mod, x: mod(x)):
        e.grad = None
        out = forward(merge, e)
        (out * weights).sum().backward()
        results.append((out.detach(), e.grad.clone()))
    (fused, fused_grad), (ref, ref_grad) = results
    assert fused.shape == (2, 2, 3, 12)
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused_grad, ref_grad, atol=1e-12, rtol=1e-12)


def test_merge_frozen_passes_gradcheck():
    merge, e = _merge_case(seed=1, shape=(1, 2, 4, 3))
    assert torch.autograd.gradcheck(lambda x: merge_frozen(merge, x), (e,))


def test_dual_low_rank_adapter_is_a_sum_of_two_rank_r_products():
    """D = s_1 t_1 + s_2 t_2 with rank-r factors: as one matrix its rank is at most 2r."""
    torch.manual_seed(0)
    adapter = DualLowRankAdapter(dim=32, rank=3)
    assert adapter.down_t.shape == (6, 32) and adapter.down_s.shape == (16, 6)
    assert adapter.up_t.shape == (6, 16) and adapter.up_s.shape == (32, 6)
    down = adapter.down_s @ adapter.down_t
    assert torch.linalg.matrix_rank(down) == 6
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = torch.nn.functional.gelu(x @ down.T + adapter.down_bias) @ (adapter.up_s @ adapter.up_t).T
        torch.testing.assert_close(adapter(x), expected + adapter.up_bias, atol=1e-5, rtol=1e-5)
    zero = DualLowRankAdapter(dim=32, rank=3, init="zero_up")
    assert torch.count_nonzero(zero.up_s) == 0 and torch.count_nonzero(zero.down_t) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision training runs on CUDA")
@pytest.mark.parametrize("recompute", [False, True])
def test_highway_trains_under_cuda_autocast(recompute):
    """The trainer's default on a GPU: every highway parameter gets a finite gradient."""
    model = _e3va(recompute=recompute).cuda()
    images = torch.rand(2, 3, 96, 160, device="cuda")
    with torch.autocast("cuda"):
        loss = sum(f.float().square().mean() for f in model(images).values())
    loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trained)
