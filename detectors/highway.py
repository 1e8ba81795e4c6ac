"""E3VA's gradient highway: dual low-rank adapters on a side path beside a frozen Swin.

For block i with input l_i the frozen backbone computes, without autograd,
    a_i = f_P1(l_i)             (LN1 + W/SW-MSA)
    m_i = f_P2(l_i + a_i)       (LN2 + MLP)
    l_{i+1} = l_i + a_i + m_i,
and the highway, starting from the patch embedding (e_0 = l_0), computes
    e_{i+1} = e_i + A1(a_i) + A2(m_i),   A(x) = x + U(GELU(D(x))).
With U at zero the highway reproduces the backbone exactly. At a stage boundary e goes through
the backbone's own frozen patch merging; each stage's e goes through a trainable LayerNorm (the
backbone's output norms) to the FPN. Backpropagation therefore only walks the highway: no backbone
activation is kept for backward and no backbone weight receives a gradient.

D and U are "dual low-rank": W = s_1 t_1 + s_2 t_2 with rank-``rank`` factors, which is one
product of the concatenated factors [s_1 s_2] [t_1; t_2]. It is applied as x -> x t^T -> (.) s^T,
never forming W, inside one autograd function per stage that saves the adapters' inputs (and,
where they are narrow beside them, the rank-2r products) and recomputes the hidden layers and
their GELU in backward.

With ``recompute`` the highway keeps no frozen tensor but the images and the (small) input lanes of the last
two stages: in backward the first stage's blocks run again for the second stage's input, then each
stage's frozen blocks again for their branch outputs (a_i, m_i), all under no_grad and replaying the random
numbers (drop-path) forward drew: the same gradients, bit for bit, for about the memory of the images -
the trade activation checkpointing makes, on the frozen side only, at a little over one more frozen forward
per step.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from detectors.backbones.swin import SwinBackbone

#: How the adapter factors start. ``linear`` (the default): each factor as PyTorch initialises an
#: ``nn.Linear`` of its shape, per branch, as the authors' public low-rank code (DongshuoYin/CoLin) does;
#: the product of two such factors is small, so the highway starts next to the backbone. ``kaiming``: the
#: paper's words ("Kaiming Norm") read literally, Kaiming-normal factors, whose products make each
#: adapter's output several times its input. ``zero_up``: ``linear`` with the up projections at zero,
#: so the highway starts exactly on the backbone.
INITS = ("linear", "kaiming", "zero_up")


def _adapter_hidden(x: torch.Tensor, down_t, down_s, down_bias, z: torch.Tensor | None = None):
    """z = x t_d^T (rank 2r) and the pre-activation z s_d^T + b_d (C/2) of the down projection;
    a given ``z`` (kept from forward) is used as is."""
    if z is None:
        z = x @ down_t.T
    return z, torch.addmm(down_bias, z, down_s.T)


def _rows_t_mm(a: torch.Tensor, b: torch.Tensor, parts: int | None = None) -> torch.Tensor:
    """a^T b for two tall matrices (rows x p, rows x q): every weight gradient of the highway.

    On a multi-threaded CPU MKL runs this reduction over the rows with little parallelism (with
    2 threads, measured 1.2-2.7x slower than below at Swin-T stage-1 sizes), so the rows are cut
    into ``parts`` blocks (default: one per CPU thread), multiplied as one batch and the partial
    products summed.
    """
    if parts is None:
        parts = torch.get_num_threads() if a.device.type == "cpu" else 1
    rows = a.shape[0]
    if parts < 2 or rows % parts or rows < 1024 * parts:
        return a.T @ b
    return torch.bmm(a.view(parts, rows // parts, -1).transpose(1, 2), b.view(parts, rows // parts, -1)).sum(0)


class _HighwayStageFn(torch.autograd.Function):
    """lead + sum_k U_k(GELU(D_k(x_k))) over all adapters of one stage (x = a_1, m_1, a_2, m_2, ...);
    given the lanes, (lead - lane_start) + sum_k ... + lane_end, formed in one buffer.

    Within a stage the lead only accumulates adapter outputs, so every adapter sees the same
    incoming gradient G, and the gradient w.r.t. the lead is G itself. The work is thin matmuls
    and passes over (rows x C) tensors, so: the x_k are saved (the down projections' weight
    gradients need them); the hidden layers and their GELU are recomputed in backward, one adapter
    at a time, so at most one adapter's hidden layer is alive; z = x t_d^T and y (2r wide each) are
    kept where that adds at most a quarter to the x_k's bytes (``_keeps_z_and_y``), else recomputed
    too; all up projections and up biases run as one matmul on [y_1 ... y_K, 1], whose gradient is
    one read of G per stage, and G [s_u(1) ... s_u(K)] gives every adapter's dL/dy in one more.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, lead, lane_start, lane_end, *tensors):
        inputs, params = _split_stage_args(tensors)
        keep = ctx.keep = _keeps_z_and_y(lead.shape[-1], params[0].shape[0])
        ctx.count = len(inputs)
        zs, y = _adapter_products(inputs, params, keep)
        ctx.save_for_backward(*inputs, *params, *((*zs, y) if keep else ()))
        return _stage_output(lead, lane_start, lane_end, y, params)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        saved, count = ctx.saved_tensors, ctx.count
        inputs, params, kept = saved[:count], saved[count:7 * count], saved[7 * count:]  # kept: z_1 .. z_K, y
        grads = _stage_backward(grad_out, inputs, params, kept if ctx.keep else None)
        # The x_k come from the frozen backbone under no_grad: they never need a gradient.
        return (grad_out, None, None, *([None] * len(inputs)), *grads)


class _RecomputedStageFn(torch.autograd.Function):
    """``_HighwayStageFn`` for a whole stage that keeps no frozen tensor: forward runs the stage's frozen
    blocks itself, one at a time, and returns the highway and the stage's output lane; backward runs the
    blocks again from the stage's input lane (kept, or from the trunk, ``_FrozenTrunk``) and the random
    state forward started them with, for the branch outputs it needs - or takes those outputs from the
    trunk where it already ran the stage for a later stage's input."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, trunk, index, lead, lane_start, images, *params):
        blocks = trunk.backbone.layers[index].blocks
        ctx.trunk, ctx.index, ctx.rng = trunk, index, _rng_state(lane_start.device)
        ctx.keeps_input = index >= _KEPT_INPUTS_FROM
        lane_end = lane_start

        def branches():
            nonlocal lane_end
            for a, m, lane_end in frozen_blocks(blocks, lane_start):
                yield a
                yield m
        _, y = _adapter_products(branches(), params, keep=False)
        kept = (lane_start,) if ctx.keeps_input else ()
        ctx.save_for_backward(images, *kept, *params)  # every stage saves the same images: one tensor
        ctx.mark_non_differentiable(lane_end)
        return _stage_output(lead, lane_start, lane_end, y, params), lane_end

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out, _grad_lane_end):
        images, *params = ctx.saved_tensors
        lane_start = params.pop(0) if ctx.keeps_input else None
        branches = ctx.trunk.stage_branches(ctx.index)  # where the trunk ran this stage again already
        with torch.no_grad(), _replaying(ctx.rng, images.device):
            if branches is None:
                if lane_start is None:
                    lane_start = ctx.trunk.stage_input(ctx.index, images)
                blocks = ctx.trunk.backbone.layers[ctx.index].blocks
                branches = (x for a, m, _ in frozen_blocks(blocks, lane_start) for x in (a, m))
            grads = _stage_backward(grad_out, branches, params, None)
        return (None, None, grad_out, None, None, *grads)


#: Stages from this one on keep their input lane from forward. A Swin stage's input is half the previous
#: one's bytes, so stages 2 and 3 keep 3/8 of the first stage's input (about 0.75x the images' bytes), while
#: stage 2 holds most of the blocks (6 of Swin-T's 12, 18 of Swin-B/L's 24): without its input, backward
#: would run nearly the whole frozen trunk again before the per-stage recomputation.
_KEPT_INPUTS_FROM = 2


class _FrozenTrunk:
    """What a recomputing pass needs in backward that forward did not keep: a stage's input lane and, for
    the stages before it, their branch outputs, from one more run of the frozen trunk.

    The first stage without a kept input to run backward runs the frozen trunk again from the images, from
    the random state forward started with, up to its own input. The earlier stages' branch outputs come
    from that same run: they are kept until each stage's backward takes them (by then the heads'
    activations are freed), so no stage runs more than twice in all.
    """

    def __init__(self, backbone: SwinBackbone, device: torch.device):
        self.backbone, self.rng = backbone, _rng_state(device)
        self.inputs: dict[int, torch.Tensor] = {}
        self.branches: dict[int, list[torch.Tensor]] = {}

    def stage_input(self, index: int, images: torch.Tensor) -> torch.Tensor:
        if index not in self.inputs:  # a second backward through the same graph recomputes them again
            with torch.no_grad(), _replaying(self.rng, images.device):
                self._run_up_to(index, images)
        return self.inputs.pop(index)

    def stage_branches(self, index: int):
        """The stage's a_1, m_1, a_2, ... in order, each let go once used; None if not run again yet."""
        branches = self.branches.pop(index, None)
        return None if branches is None else _draining(branches)

    def _run_up_to(self, last: int, images: torch.Tensor) -> None:
        lane = self.backbone.embed(images)
        for index, stage in enumerate(self.backbone.layers[:last + 1]):
            lane = stage.downsample(lane)
            if index == last:
                self.inputs[index] = lane
                return
            branches = []
            for a, m, lane in frozen_blocks(stage.blocks, lane):
                branches += (a, m)
            self.branches[index] = branches


def _draining(items: list):
    """Yield the list's items, dropping each from it first, so the list keeps none that were used."""
    items.reverse()
    while items:
        yield items.pop()


def _adapter_products(inputs, params, keep: bool):
    """Per adapter z = x t_d^T, then y = GELU(z s_d^T + b_d) t_u^T (2r wide each), one adapter at a time;
    returns the z's (where ``keep``, else none) and y = [y_1 ... y_K, 1]."""
    ys, zs = [], []
    for x, (down_t, down_s, down_bias, up_t, _, _) in zip(inputs, _per_adapter(params)):
        z, pre = _adapter_hidden(x.reshape(-1, x.shape[-1]), down_t, down_s, down_bias)
        if keep:
            zs.append(z)
        ys.append(torch.ops.aten.gelu_(pre) @ up_t.T)  # pre is not needed again in forward
        del x, z, pre  # freed before the next adapter allocates its own, so the allocator reuses them
    return zs, torch.cat([*ys, ys[0].new_ones(len(ys[0]), 1)], dim=1)


def _stage_output(lead, lane_start, lane_end, y, params) -> torch.Tensor:
    """lead + y [s_u(1) ... b_u]^T, or with the lanes (lead - lane_start) + ... + lane_end."""
    rows = lead.numel() // lead.shape[-1]
    up = _up_matrix(params).T
    if lane_start is None:
        out = torch.addmm(lead.reshape(rows, -1), y, up)
    else:  # in place on one fresh buffer: the same sums, in the same order, as three tensors
        out = (lead - lane_start).view(rows, -1)
        out.addmm_(y.to(out.dtype), up.to(out.dtype))  # in-place ops escape autocast's casts
        out.add_(lane_end.reshape(rows, -1))
    return out.view(lead.shape)


def _stage_backward(grad_out, inputs, params, kept):
    """Every factor's gradient for a stage's adapters, given the incoming gradient G of its output.

    ``inputs`` (the x_k, in order) may be a generator: each is used once, by one adapter at a time.
    ``kept`` holds z_1 .. z_K and y from forward, or is None (recompute them from the x_k).
    """
    g_out = grad_out.reshape(-1, grad_out.shape[-1])
    rank2 = params[0].shape[0]
    g_y = g_out @ torch.cat(params[4::6], dim=1)     # (rows, K * 2r): every adapter's dL/dy
    ys, grads = [], []
    for k, (x, (down_t, down_s, down_bias, up_t, _, _)) in enumerate(zip(inputs, _per_adapter(params))):
        x_rows = x.reshape(-1, x.shape[-1])
        z, pre = _adapter_hidden(x_rows, down_t, down_s, down_bias, kept[k] if kept else None)
        g_yk = g_y[:, k * rank2:(k + 1) * rank2]
        # Two (rows x C/2) buffers per adapter: dL/d(act) becomes dL/d(pre) in place, then
        # pre becomes act in place.
        g_pre = g_yk @ up_t
        torch.ops.aten.gelu_backward.grad_input(g_pre, pre, grad_input=g_pre)
        act = torch.ops.aten.gelu_(pre)
        if not kept:
            ys.append(act @ up_t.T)
        g_z = g_pre @ down_s
        grads.append([_rows_t_mm(g_z, x_rows), _rows_t_mm(g_pre, z), g_pre.sum(0), _rows_t_mm(g_yk, act)])
        del x, x_rows, z, pre, act, g_pre, g_z  # freed before the next adapter allocates the same sizes
    y = kept[-1] if kept else torch.cat([*ys, ys[0].new_ones(len(g_out), 1)], dim=1)
    g_up = _rows_t_mm(y, g_out).T                      # (C, K * 2r + 1): every s_u and the bias sum
    for k, g in enumerate(grads):
        g += [g_up[:, k * rank2:(k + 1) * rank2], g_up[:, -1]]
    return [g.to(p.dtype) for g, p in zip((g for adapter in grads for g in adapter), params)]


def _rng_state(device: torch.device):
    """The generators drop-path draws from, as they are now."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replaying(state, device: torch.device):
    """Run with the generators at ``state``; afterwards they are as they were before."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def frozen_blocks(blocks, lane: torch.Tensor):
    """Run frozen Swin blocks from ``lane``: per block, its branch outputs (a, m) and the lane after it."""
    for block in blocks:
        a = block.attention_branch(lane).contiguous()  # cropped from the padded map
        lane = lane + a
        m = block.mlp_branch(lane)
        lane = lane + m
        yield a, m, lane


def _keeps_z_and_y(channels: int, rank2: int) -> bool:
    """Whether backward keeps z and y (2r wide each) rather than recomputing them from x (C wide).

    Keeping them costs 4r / C of the inputs' bytes and saves reading x once more; they are kept
    where that is at most a quarter (rank 8: C >= 128, the later stages of Swin-T).
    """
    return 2 * rank2 <= channels / 4


def _split_stage_args(tensors):
    """(x_1 .. x_K, then six factors per adapter in the same order) -> (inputs, params)."""
    count = len(tensors) // 7
    return tensors[:count], tensors[count:]


def _per_adapter(params):
    return (params[i:i + 6] for i in range(0, len(params), 6))


def _up_matrix(params) -> torch.Tensor:
    """[s_u(1) ... s_u(K), b_u(1) + ... + b_u(K)]: (C, 2r K + 1)."""
    return torch.cat([*params[4::6], torch.stack(params[5::6]).sum(0)[:, None]], dim=1)


class _FrozenMergeFn(torch.autograd.Function):
    """The backbone's frozen patch merging, applied to the highway: Linear(LN(2x2 gather(e))).

    Keeps only e (which the stage's output norm keeps anyway) and the LayerNorm statistics;
    backward re-gathers e instead of saving the 4C-wide copy, and skips the linear's forward.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, e, norm_weight, norm_bias, reduction_weight):
        gathered = _gather_2x2(e)
        normed, mean, rstd = torch.native_layer_norm(gathered, (gathered.shape[-1],), norm_weight, norm_bias, 1e-5)
        ctx.save_for_backward(e, mean, rstd, norm_weight, norm_bias, reduction_weight)
        return normed @ reduction_weight.T

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        e, mean, rstd, norm_weight, norm_bias, reduction_weight = ctx.saved_tensors
        gathered = _gather_2x2(e)
        g_normed = grad_out @ reduction_weight.to(grad_out.dtype)
        g_gathered, _, _ = torch.ops.aten.native_layer_norm_backward(
            g_normed, gathered, (gathered.shape[-1],), mean, rstd, norm_weight, norm_bias, [True, False, False])
        return _scatter_2x2(g_gathered, e.shape), None, None, None


def _gather_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/2, W/2, 4C) in timm's PatchMerging order (H and W are even here)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)


def _scatter_2x2(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, h, w, c = shape
    return x.reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(shape)


def merge_frozen(merge: nn.Module, e: torch.Tensor) -> torch.Tensor:
    """Apply a frozen timm PatchMerging to the highway with the memory profile described above."""
    if e.shape[1] % 2 or e.shape[2] % 2 or merge.norm.eps != 1e-5:
        return merge(e)  # odd sizes (not produced by 32-padded inputs) or foreign norms: plain path
    return _FrozenMergeFn.apply(e, merge.norm.weight, merge.norm.bias, merge.reduction.weight)


def _as_linear_weight(weight: torch.Tensor) -> None:
    """Uniform in +-1/sqrt(fan_in), in place: ``nn.Linear``'s own weight initialisation."""
    nn.init.kaiming_uniform_(weight, a=5 ** 0.5)


class DualLowRankAdapter(nn.Module):
    """The E3VA adapter without its skip: U(GELU(D(x))), D: C -> C/2, U: C/2 -> C."""

    def __init__(self, dim: int, rank: int, init: str = "linear"):
        super().__init__()
        hidden = dim // 2
        self.rank = rank
        self.down_t = nn.Parameter(torch.empty(2 * rank, dim))
        self.down_s = nn.Parameter(torch.empty(hidden, 2 * rank))
        self.down_bias = nn.Parameter(torch.zeros(hidden))
        self.up_t = nn.Parameter(torch.empty(2 * rank, hidden))
        self.up_s = nn.Parameter(torch.empty(dim, 2 * rank))
        self.up_bias = nn.Parameter(torch.zeros(dim))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "linear") -> None:
        """Every factor of every branch as ``init`` says (see ``INITS``); biases start at zero."""
        if init not in INITS:
            raise ValueError(f"unknown adapter init {init!r}; choose one of {', '.join(INITS)}")
        draw = nn.init.kaiming_normal_ if init == "kaiming" else _as_linear_weight
        for t, s in ((self.down_t, self.down_s), (self.up_t, self.up_s)):  # t: (2r, in), s: (out, 2r)
            for branch in (*t.split(self.rank, dim=0), *s.split(self.rank, dim=1)):
                draw(branch)
        if init == "zero_up":
            self.up_s.zero_()

    def factors(self) -> tuple[nn.Parameter, ...]:
        return self.down_t, self.down_s, self.down_bias, self.up_t, self.up_s, self.up_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """U(GELU(D(x))) with plain autograd: the reference the fused highway step is tested against."""
        rows = x.reshape(-1, x.shape[-1])
        _, pre = _adapter_hidden(rows, self.down_t, self.down_s, self.down_bias)
        return torch.addmm(self.up_bias, F.gelu(pre) @ self.up_t.T, self.up_s.T).view(x.shape)


class HighwayBlock(nn.Module):
    """The two parallel adapters that follow one Swin block on the highway."""

    def __init__(self, dim: int, rank: int, init: str = "linear"):
        super().__init__()
        self.attn = DualLowRankAdapter(dim, rank, init)
        self.mlp = DualLowRankAdapter(dim, rank, init)

    def factors(self) -> tuple[nn.Parameter, ...]:
        return (*self.attn.factors(), *self.mlp.factors())

    def forward(self, d: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The highway's lead over the backbone after this block: d + U1(GELU(D1(a))) + U2(GELU(D2(m)))."""
        return highway_stage(d, [(self, a, m)])


def highway_stage(lead: torch.Tensor, steps, lanes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The lead after a stage's blocks: lead + sum over (block, a, m) of U1(GELU(D1(a))) + U2(GELU(D2(m))).

    With ``lanes`` = (l_start, l_end), the backbone's frozen features before and after the stage,
    ``lead`` is the highway e_start and the result is e_end = (e_start - l_start) + sum ... + l_end:
    the skips a + m sum to l_end - l_start, so only the adapters are added.
    """
    lane_start, lane_end = lanes if lanes is not None else (None, None)
    inputs = [x for _, a, m in steps for x in (a, m)]
    return _HighwayStageFn.apply(lead, lane_start, lane_end, *inputs,
                                 *(p for block, _, _ in steps for p in block.factors()))


class HighwayBackbone(nn.Module):
    """A frozen SwinBackbone plus the E3VA highway; same interface as the backbone."""

    def __init__(self, backbone: SwinBackbone, rank: int = 8, init: str = "linear", recompute: bool = False):
        super().__init__()
        self.backbone = backbone
        self.recompute = recompute
        self.highway = nn.ModuleList(
            nn.ModuleList(HighwayBlock(dim, rank, init) for _ in stage.blocks)
            for dim, stage in zip(backbone.out_channels, backbone.layers))
        self.out_channels = backbone.out_channels
        self.strides = backbone.strides
        self.size_divisibility = backbone.size_divisibility

    @property
    def pretrained_swin(self) -> SwinBackbone:
        return self.backbone

    def shareable_pass(self) -> str:
        """``frozen_pass``: the highway only reads it, so it is the same whatever a task's highway learned."""
        return "highway frozen pass"

    #: Set by ``detectors.sharing.share_backbone``: tasks on one backbone reuse one frozen pass.
    shared_pass = None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.recompute and torch.is_grad_enabled():
            return self.recomputing_pass(images)
        frozen = self.shared_pass(images, self.frozen_pass) if self.shared_pass is not None else \
            self.frozen_pass(images)
        return self.highway_pass(frozen)

    @torch.no_grad()
    def frozen_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The frozen backbone's computation, which no task changes: the patch embedding l_0 and,
        per stage, whether it merges patches, its input lane, every block's branch outputs (a, m)
        and its output lane. The stage's frozen blocks run at once; their branch outputs (which
        backward keeps anyway) then go through the stage's highway together."""
        lane = self.backbone.embed(images)
        embedded, stages = lane, []
        for stage in self.backbone.layers:
            merges = not isinstance(stage.downsample, nn.Identity)
            if merges:
                lane = stage.downsample(lane)
            lane_start, branches = lane, []
            for a, m, lane in frozen_blocks(stage.blocks, lane_start):
                branches.append((a, m))
            stages.append((merges, lane_start, branches, lane))
        return embedded, stages

    def recomputing_pass(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen and highway passes stage by stage, keeping no frozen tensor for backward but the
        images (``_FrozenTrunk``): no per-task frozen pass to share, so training only."""
        trunk = _FrozenTrunk(self.backbone, images.device)
        with torch.no_grad():
            lane = self.backbone.embed(images)
        highway, outputs = lane, []
        for index, (stage, adapters) in enumerate(zip(self.backbone.layers, self.highway)):
            if not isinstance(stage.downsample, nn.Identity):
                with torch.no_grad():
                    lane = stage.downsample(lane)
                highway = merge_frozen(stage.downsample, highway)
            factors = [p for adapter in adapters for p in adapter.factors()]
            highway, lane = _RecomputedStageFn.apply(trunk, index, highway, lane, images, *factors)
            outputs.append(highway)
        return self.backbone.finish(outputs)

    def highway_pass(self, frozen: tuple[torch.Tensor, list]) -> dict[str, torch.Tensor]:
        # Within a stage the highway is its lead over the backbone, d = e - l: the skips a + m
        # cancel, each block only adds its two adapter outputs, and e = l + d is formed at the
        # stage's end (stage outputs and patch merging).
        highway, stages = frozen  # e_0 = l_0
        outputs = []
        for stage, adapters, (merges, lane_start, branches, lane_end) in zip(self.backbone.layers, self.highway,
                                                                             stages):
            if merges:
                highway = merge_frozen(stage.downsample, highway)  # the gradient passes, weights stay
            steps = [(adapter, a, m) for adapter, (a, m) in zip(adapters, branches)]
            highway = highway_stage(highway, steps, lanes=(lane_start, lane_end))
            outputs.append(highway)
        return self.backbone.finish(outputs)
