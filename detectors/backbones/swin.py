"""Swin Transformer backbone for dense prediction, built from timm's layers.

Paper: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al., 2021).

timm provides the layers and the parameter layout (so timm checkpoints load as they are), but the
forward pass follows the original detection Swin (Swin-Transformer-Object-Detection) rather than
timm's classifier:
- each stage's feature map is padded to a multiple of the window size *before* the cyclic shift,
  and the shift mask is built for the padded size (timm rolls first, which lets rows that wrap
  around attend across the image edge when the size is not a window multiple);
- every odd block is shifted whatever the feature size;
- any input size works: images are zero-padded to a multiple of 32;
- four NCHW outputs at strides 4, 8, 16, 32, each through its own LayerNorm (``norm0``..``norm3``),
  the "pre-FPN norms" that are not part of ImageNet checkpoints.

A block exposes its two residual branches (``attention_branch`` and ``mlp_branch``) and two empty
*branch tuner* slots that tuning methods fill; see ``detectors/tuning``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resize_rel_pos_bias_table
from timm.models.swin_transformer import PatchMerging, WindowAttention, window_partition, window_reverse
from torch import nn

from detectors.errors import UserInputError

__all__ = ["SwinBlock", "SwinStage", "SwinBackbone", "SWIN_SPECS", "build_swin", "checkpoint_filter_fn",
           "fitting_state_dict", "load_swin_weights", "OUT_FEATURES"]

OUT_FEATURES = ("res2", "res3", "res4", "res5")
SIZE_DIVISIBILITY = 32
_MASKED = -100.0  # what the original implementation adds to attention logits across shift seams

# A tuner sees the branch input and the branch output and returns the new branch output.
BranchTuner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@lru_cache(maxsize=64)
def shifted_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(num_windows, window*window, window*window) additive mask for a padded, shifted map."""
    region = torch.zeros(height, width, device=device)
    spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in spans:
        for ws in spans:
            region[hs, ws] = label
            label += 1
    windows = window_partition(region[None, :, :, None], (window, window)).flatten(1)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, _MASKED)


def unshift_and_crop(x: torch.Tensor, shift: int, height: int, width: int) -> torch.Tensor:
    """``torch.roll(x, (shift, shift), (1, 2))[:, :height, :width]`` as one contiguous copy.

    Row i of the result is row (i - shift) mod H_padded of x: the last ``shift`` padded rows
    first, then the first ``height - shift``; the same for columns. Written by slice assignment,
    so meant for tensors that need no gradient.
    """
    padded_h, padded_w = x.shape[1:3]
    top, left = min(shift, height), min(shift, width)
    rows = [(slice(0, top), slice(padded_h - shift, padded_h - shift + top)),
            (slice(top, height), slice(0, height - top))]
    cols = [(slice(0, left), slice(padded_w - shift, padded_w - shift + left)),
            (slice(left, width), slice(0, width - left))]
    out = x.new_empty(x.shape[0], height, width, x.shape[3])
    for out_rows, in_rows in rows:
        for out_cols, in_cols in cols:
            out[:, out_rows, out_cols] = x[:, in_rows, in_cols]
    return out


class SwinBlock(nn.Module):
    """A (shifted-)window transformer block in NHWC layout, with timm's parameter names."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: bool = False,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=window_size)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # Filled by tuning methods that change a branch (adapters behind or beside it).
        self.attn_tuner: nn.Module | None = None
        self.mlp_tuner: nn.Module | None = None

    def attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        """f_P1(x) = W/SW-MSA(LN1(x)): pad to the window, then shift, attend, undo both."""
        batch, height, width, channels = x.shape
        win, shift = self.window_size, self.shift_size
        h = self.norm1(x)
        pad_h, pad_w = (-height) % win, (-width) % win
        h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        mask = None
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(padded_h, padded_w, win, shift, h.device).to(h.dtype)
        windows = window_partition(h, (win, win)).view(-1, win * win, channels)
        windows = self.attn(windows, mask=mask)
        h = window_reverse(windows.view(-1, win, win, channels), (win, win), padded_h, padded_w)
        if shift and not h.requires_grad:
            h = unshift_and_crop(h, shift, height, width)  # one copy where roll, then crop, costs two
        elif shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        return self.drop_path1(h[:, :height, :width, :])

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """f_P2(x) = MLP(LN2(x))."""
        return self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention_branch(x)
        if self.attn_tuner is not None:
            a = self.attn_tuner(x, a)
        x = x + a
        m = self.mlp_branch(x)
        if self.mlp_tuner is not None:
            m = self.mlp_tuner(x, m)
        return x + m


class SwinStage(nn.Module):
    """Optional 2x2 patch merging (timm puts it at the start of stages 2-4), then the blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window_size: int,
                 downsample: bool, drop_path: list[float], norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, norm_layer=norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, window_size, shift=(i % 2 == 1), drop_path=drop_path[i],
                      norm_layer=norm_layer)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SwinBackbone(nn.Module):
    """Swin for detection: image batch (B, 3, H, W) -> {res2..res5: NCHW maps at strides 4..32}."""

    size_divisibility = SIZE_DIVISIBILITY

    def __init__(self, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 4,
                 in_chans: int = 3, drop_path_rate: float = 0.2, name: str = "swin"):
        """
        Args:
            embed_dim: channels of the first stage; doubled at every following stage.
            depths: blocks per stage.
            num_heads: attention heads per stage.
            window_size: attention window (7 for the 224 models, 12 for the 384 ones).
            patch_size: stride of the patch embedding.
            in_chans: image channels.
            drop_path_rate: stochastic depth at the last block, rising linearly from 0.
            name: the spec name (``swin_t`` ...), used in messages and checkpoints.
        """
        super().__init__()
        self.name = name
        self.window_size = window_size
        self.out_channels = [embed_dim * 2**i for i in range(len(depths))]
        self.strides = [patch_size * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC",
                                      strict_img_size=False, dynamic_img_pad=True)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.layers.append(SwinStage(
                in_dim=self.out_channels[max(i - 1, 0)], dim=self.out_channels[i], depth=depth,
                num_heads=num_heads[i], window_size=window_size, downsample=i > 0,
                drop_path=rates[first:first + depth]))
        for i, channels in enumerate(self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.apply(_init_weights)

    @property
    def output_norms(self) -> list[nn.LayerNorm]:
        return [getattr(self, f"norm{i}") for i in range(len(self.layers))]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-pad to a multiple of 32 and embed patches: (B, 3, H, W) -> (B, H/4, W/4, C) NHWC."""
        height, width = images.shape[-2:]
        pad_h, pad_w = (-height) % SIZE_DIVISIBILITY, (-width) % SIZE_DIVISIBILITY
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        return self.patch_embed(images)

    def stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """NHWC output of every stage, before the output norms."""
        x = self.embed(images)
        outputs = []
        for stage in self.layers:
            x = stage(x)
            outputs.append(x)
        return outputs

    def finish(self, stage_outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Apply the output norms and turn NHWC stage maps into the NCHW feature dict."""
        return {name: norm(x).permute(0, 3, 1, 2).contiguous()
                for name, norm, x in zip(OUT_FEATURES, self.output_norms, stage_outputs)}

    # What ``detectors.sharing`` asks of every tuned backbone: where its pre-trained weights are, and
    # which of its computation (if any) is the same for every task trained from them.

    @property
    def pretrained_swin(self) -> SwinBackbone:
        return self

    def shareable_pass(self) -> str | None:
        """All of it where every weight here is frozen (FIXED); nothing where a method tunes inside."""
        return None if any(p.requires_grad for p in self.parameters()) else "swin features"

    #: Set by ``detectors.sharing.share_backbone`` where ``shareable_pass`` names one: tasks on this
    #: backbone then compute the same features and reuse one forward.
    shared_pass = None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.shared_pass is not None:
            return dict(self.shared_pass(images, self._features))
        return self._features(images)

    def _features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.finish(self.stage_outputs(images))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Checkpoints


_KEY_PREFIXES = ("backbone.bottom_up.", "backbone.", "module.", "encoder.")
_DROPPED = ("relative_position_index", "attn_mask")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SwinBackbone) -> dict[str, torch.Tensor]:
    """Bring a Microsoft, timm or detection (``backbone.``-prefixed) Swin state dict to our layout.

    Microsoft's release keeps the patch merging at the end of a stage; timm (and we) at the start
    of the next. Classifier heads and the final classification norm are dropped; the window size
    of relative position tables is adapted when a 224 checkpoint meets a 384 model or back.
    """
    for nested in ("model", "state_dict", "module"):
        if isinstance(state_dict.get(nested), dict):
            state_dict = state_dict[nested]
    prefix = next((p for p in _KEY_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    microsoft_layout = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for key, value in state_dict.items():
        if any(part in key for part in _DROPPED) or key.startswith(("head.", "norm.")):
            continue
        if microsoft_layout:
            key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", key)
        if key.endswith("relative_position_bias_table"):
            attn = _get_submodule(model, key.rsplit(".", 1)[0])
            if isinstance(attn, WindowAttention) and value.shape != attn.relative_position_bias_table.shape:
                value = resize_rel_pos_bias_table(value, new_window_size=attn.window_size,
                                                  new_bias_shape=attn.relative_position_bias_table.shape)
        out[key] = value
    return out


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"cannot read weight file {path}: {first_line}") from None
    if not isinstance(state, dict):
        raise UserInputError(f"weight file {path} holds a {type(state).__name__}, not a state dict")
    return state


def _describe_backbone(state_dict: dict[str, torch.Tensor]) -> str:
    """Guess which Swin a foreign state dict belongs to, for error messages."""
    embed = state_dict.get("patch_embed.proj.weight")
    depths = [1 + max((int(m[2]) for k in state_dict if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k))
                       and int(m[1]) == stage), default=-1) for stage in range(4)]
    for name, spec in SWIN_SPECS.items():
        if embed is not None and embed.shape[0] == spec.embed_dim and tuple(depths) == spec.depths:
            return f"looks like {name}"
    dim = embed.shape[0] if embed is not None else "?"
    return f"embed_dim={dim}, depths={tuple(depths)}"


def fitting_state_dict(model: SwinBackbone, path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``path`` into ``model``'s layout; one clear error if it is for another backbone.

    Works on a meta-device model, so a run can check a weight file before building anything.
    """
    state = checkpoint_filter_fn(read_state_dict(path), model)
    not_tensors = [k for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise UserInputError(f"weight file {path} is not a state dict of tensors: {not_tensors[0]} holds a "
                             f"{type(state[not_tensors[0]]).__name__}")
    expected = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    if wrong_shape:
        raise UserInputError(
            f"weight file {path} is for another backbone ({_describe_backbone(state)}), not {model.name}: "
            f"{wrong_shape[0]} has shape {list(state[wrong_shape[0]].shape)}, "
            f"expected {list(expected[wrong_shape[0]].shape)}")
    # The output norms are not part of classification checkpoints; they start from their init.
    missing = [k for k in expected if k not in state and not re.match(r"norm\d\.", k)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise UserInputError(f"weight file {path} does not fit {model.name}: {'; '.join(parts)}")
    return state


def load_swin_weights(model: SwinBackbone, path: str | Path) -> None:
    """Load pre-trained weights into ``model``; one clear error if they do not fit."""
    model.load_state_dict(fitting_state_dict(model, path), strict=False)


# --------------------------------------------------------------------------------------------
# Builders


@dataclass(frozen=True)
class SwinSpec:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int = 7


SWIN_SPECS: dict[str, SwinSpec] = {
    "swin_t": SwinSpec(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_s": SwinSpec(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_b": SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_l": SwinSpec(192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "swin_b_384": SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), window_size=12),
    "swin_l_384": SwinSpec(192, (2, 2, 18, 2), (6, 12, 24, 48), window_size=12),
    # Not a published model: the small Swin that ``detectors.upstream`` pre-trains on every machine
    # (4.7M parameters, a few minutes on 2 CPU cores), for trying the methods on a backbone that knows something.
    "swin_mini": SwinSpec(48, (2, 2, 2, 2), (3, 6, 12, 24)),
}


def build_swin(name: str, weights: str | Path | None = None, drop_path_rate: float = 0.2,
               **overrides) -> SwinBackbone:
    """Build a Swin backbone by name (``swin_t``, ``swin_s``, ``swin_b``, ``swin_l``, ``*_384``).

    ``overrides`` replace fields of the spec (e.g. ``depths=(1, 1, 1, 1)`` for a tiny test model).
    """
    if name not in SWIN_SPECS:
        raise UserInputError(f"unknown backbone {name!r}; choose one of {', '.join(SWIN_SPECS)}")
    spec = {**SWIN_SPECS[name].__dict__, **overrides}
    model = SwinBackbone(**spec, drop_path_rate=drop_path_rate, name=name)
    if weights is not None:
        load_swin_weights(model, weights)
    return model
