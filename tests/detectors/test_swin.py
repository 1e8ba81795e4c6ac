"""The Swin backbone has the detection Swin's semantics and loads every checkpoint layout safely."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from detectors.backbones import build_swin, load_swin_weights
from detectors.backbones.swin import SwinBlock, unshift_and_crop
from detectors.errors import UserInputError

TINY = dict(depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 4, 8))


def _tiny(seed: int, name: str = "swin_t", **overrides):
    torch.manual_seed(seed)
    return build_swin(name, drop_path_rate=0.0, **{**TINY, **overrides}).eval()


# --------------------------------------------------------------------------------------------
# Equality with torchvision's Swin-T (pad-then-shift, the detection semantics)


def _torchvision_key(ours: str) -> str | None:
    """Our (timm-layout) parameter name -> torchvision's ``swin_t`` name; None for the output norms."""
    if re.match(r"norm\d\.", ours):
        return None
    if ours.startswith("patch_embed.proj."):
        return ours.replace("patch_embed.proj.", "features.0.0.")
    if ours.startswith("patch_embed.norm."):
        return ours.replace("patch_embed.norm.", "features.0.2.")
    if m := re.match(r"layers\.(\d+)\.downsample\.(.*)", ours):
        return f"features.{2 * int(m[1])}.{m[2]}"
    if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", ours):
        rest = m[3].replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
        return f"features.{1 + 2 * int(m[1])}.{m[2]}.{rest}"
    raise AssertionError(f"no torchvision name for {ours}")


def test_stage_outputs_equal_torchvision_swin_t():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.swin_t().eval()
    ours = build_swin("swin_t").eval()
    theirs = reference.state_dict()
    mapped = {k: theirs[_torchvision_key(k)] for k in ours.state_dict() if _torchvision_key(k) is not None}
    result = ours.load_state_dict(mapped, strict=False)
    assert sorted(result.missing_keys) == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert result.unexpected_keys == []

    captured = {}
    for i in (1, 3, 5, 7):
        reference.features[i].register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out))
    images = torch.randn(1, 3, 416, 544)  # stride 4: 104 x 136 rows/cols, not multiples of the window
    with torch.no_grad():
        reference(images)
        stages = ours.stage_outputs(images)
    for stage, tv_index in zip(stages, (1, 3, 5, 7)):
        assert stage.shape == captured[tv_index].shape
        torch.testing.assert_close(stage, captured[tv_index], atol=1e-5, rtol=1e-5)


def test_timm_rolls_before_padding_and_differs_from_us_only_off_the_window_grid():
    """Same weights in timm's classifier Swin: equal where every map is a window multiple (224),
    different where it is not (256: 64/32/16/8), because timm rolls before it pads."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, strict_img_size=False,
                                  always_partition=True, **TINY).eval()
    ours = build_swin("swin_t", **TINY).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    assert all(re.match(r"norm\d\.", k) for k in result.missing_keys)
    assert all(k.startswith(("head.", "norm.")) or "relative_position_index" in k for k in result.unexpected_keys)

    def stages_of_timm(images):
        outputs, x = [], reference.patch_embed(images)
        for layer in reference.layers:
            x = layer(x)
            outputs.append(x)
        return outputs

    with torch.no_grad():
        for size, same in ((224, True), (256, False)):
            images = torch.randn(1, 3, size, size)
            theirs, mine = stages_of_timm(images), ours.stage_outputs(images)
            for a, b in zip(mine, theirs):
                assert a.shape == b.shape
            if same:
                for a, b in zip(mine, theirs):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            else:
                assert (mine[0] - theirs[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# Shapes and shifts


def test_any_input_size_gives_nchw_maps_at_strides_4_to_32():
    model = _tiny(0)
    height, width = 200, 333
    images = torch.randn(1, 3, height, width)
    with torch.no_grad():
        out = model(images)
        # Zero-padding to a multiple of 32 is all that happens to an odd-sized image.
        padded = model(torch.nn.functional.pad(images, (0, 352 - width, 0, 224 - height)))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    assert model.strides == [4, 8, 16, 32]
    assert model.out_channels == [32, 64, 128, 256]
    for (name, x), stride, channels in zip(out.items(), model.strides, model.out_channels):
        padded_h, padded_w = math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
        assert x.shape == (1, channels, padded_h // stride, padded_w // stride), name
        assert x.is_contiguous()
        torch.testing.assert_close(x, padded[name], atol=1e-5, rtol=1e-5)


def test_every_odd_block_shifts_and_even_blocks_do_not():
    model = build_swin("swin_t", drop_path_rate=0.0)
    for stage in model.layers:
        shifts = [block.shift_size for block in stage.blocks]
        assert shifts == [0 if i % 2 == 0 else 3 for i in range(len(shifts))]


def test_odd_blocks_shift_even_when_the_map_is_smaller_than_the_window():
    """A 64x64 image leaves a 2x2 map in the last stage (window 7); the shift still changes it."""
    model = _tiny(0)
    last_odd = model.layers[3].blocks[1]
    assert isinstance(last_odd, SwinBlock) and last_odd.shift_size == 3
    seen = {}
    hook = last_odd.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], out=out))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        hook.remove()
        assert seen["x"].shape[1:3] == (2, 2)
        last_odd.shift_size = 0
        unshifted = last_odd(seen["x"])
    assert (unshifted - seen["out"]).abs().max() > 1e-4


@pytest.mark.parametrize("padded, size, shift", [((133, 161), (128, 160), 3), ((7, 14), (2, 10), 3),
                                                  ((7, 7), (1, 1), 3), ((24, 12), (20, 12), 6)])
def test_unshift_and_crop_equals_roll_then_crop(padded, size, shift):
    x = torch.randn(2, *padded, 5)
    out = unshift_and_crop(x, shift, *size)
    assert out.is_contiguous()
    assert torch.equal(out, torch.roll(x, (shift, shift), (1, 2))[:, :size[0], :size[1]])


def test_a_shifted_block_gives_the_same_output_with_and_without_autograd():
    """Frozen (no gradient) blocks take the one-copy unshift; trained ones roll, then crop."""
    block = build_swin("swin_t", drop_path_rate=0.0).layers[0].blocks[1]
    x = torch.randn(1, 17, 23, 96)
    with torch.no_grad():
        frozen = block(x)
    trained = block(x.requires_grad_(True))
    assert trained.requires_grad
    torch.testing.assert_close(frozen, trained.detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Checkpoint layouts


def _source_model():
    """A tiny model whose every parameter (output norms included) is distinctive."""
    model = _tiny(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _merging_at_stage_end(state):
    """Microsoft's placement of the patch merging: at the end of the previous stage."""
    return {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
            for k, v in state.items()}


def _microsoft_layout(state):
    """Microsoft's release: merging at the end of a stage, classifier and buffers, no output norms."""
    out = _merging_at_stage_end({k: v for k, v in state.items() if not re.match(r"norm\d\.", k)})
    out["head.weight"], out["head.bias"] = torch.randn(1000, 256), torch.randn(1000)
    out["norm.weight"], out["norm.bias"] = torch.randn(256), torch.randn(256)
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return {"model": out}


def _mmdet_layout(state):
    """Swin-Transformer-Object-Detection: Microsoft's placement under ``backbone.``, with the output norms."""
    out = {f"backbone.{k}": v for k, v in _merging_at_stage_end(state).items()}
    out["neck.lateral_convs.0.conv.weight"] = torch.randn(8, 32, 1, 1)
    return {"state_dict": out, "meta": {"epoch": 36}}


def _detectron2_layout(state):
    """detectron2's Swin: ``backbone.bottom_up.`` prefix beside the FPN's ``backbone.fpn_*`` keys."""
    out = {f"backbone.bottom_up.{k}": v for k, v in _merging_at_stage_end(state).items()}
    out["backbone.fpn_lateral2.weight"] = torch.randn(8, 32, 1, 1)
    out["roi_heads.box_predictor.cls_score.weight"] = torch.randn(81, 8)
    return {"model": out, "iteration": 90000}


def _detection_layout(state):
    out = {f"backbone.{k}": v for k, v in state.items()}
    out["neck.fpn_inner.0.weight"] = torch.randn(8, 32, 1, 1)
    out["roi_heads.box_predictor.cls_score.weight"] = torch.randn(81, 8)
    return {"state_dict": out, "meta": {"epoch": 12}}


LAYOUTS = {"timm": lambda s: s, "microsoft": _microsoft_layout, "detection": _detection_layout,
           "mmdet": _mmdet_layout, "detectron2": _detectron2_layout}


@pytest.mark.parametrize("layout", [*LAYOUTS, "safetensors"])
def test_every_checkpoint_layout_loads_to_identical_outputs(layout, tmp_path):
    source = _source_model()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    assert "layers.1.downsample.reduction.weight" in state and "norm3.weight" in state
    if layout == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "weights.pth"
        saved = LAYOUTS[layout](state)
        if layout == "microsoft":
            assert "layers.0.downsample.reduction.weight" in saved["model"]
            assert "layers.3.downsample.reduction.weight" not in saved["model"]
        torch.save(saved, path)

    target = _tiny(2)
    load_swin_weights(target, path)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        if layout == "microsoft":  # the output norms are not in classification checkpoints
            for norm in source.output_norms:
                torch.nn.init.ones_(norm.weight)
                torch.nn.init.zeros_(norm.bias)
        expected, actual = source(images), target(images)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_build_swin_loads_weights(tmp_path):
    source = _source_model()
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(5)
    target = build_swin("swin_t", weights=path, drop_path_rate=0.0, **TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_weights_of_another_backbone_are_refused_by_name(tmp_path):
    path = tmp_path / "swin_t_tiny.pth"
    torch.save(_source_model().state_dict(), path)
    other = build_swin("swin_s", **{**TINY, "embed_dim": 48})
    with pytest.raises(UserInputError) as exc:
        load_swin_weights(other, path)
    message = _one_line(exc)
    assert str(path) in message
    assert "another backbone" in message and "swin_s" in message


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "swin_t.pth"
    with pytest.raises(UserInputError) as exc:
        load_swin_weights(_tiny(0), path)
    assert str(path) in _one_line(exc)


def test_missing_keys_are_listed(tmp_path):
    state = _source_model().state_dict()
    del state["layers.2.blocks.1.mlp.fc1.weight"]
    del state["patch_embed.proj.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(UserInputError) as exc:
        load_swin_weights(_tiny(0), path)
    message = _one_line(exc)
    assert str(path) in message and "2 missing keys" in message
    assert "layers.2.blocks.1.mlp.fc1.weight" in message and "patch_embed.proj.bias" in message


def test_unexpected_keys_are_listed(tmp_path):
    state = _source_model().state_dict()
    state["layers.0.blocks.0.attn.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(UserInputError) as exc:
        load_swin_weights(_tiny(0), path)
    assert "unexpected" in _one_line(exc) and "layers.0.blocks.0.attn.extra.weight" in str(exc.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_file_that_is_not_a_checkpoint_is_a_user_error(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are not weights\n")
    with pytest.raises(UserInputError) as exc:
        load_swin_weights(_tiny(0), path)
    assert str(path) in _one_line(exc)


def test_a_checkpoint_that_is_not_a_dict_is_a_user_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserInputError) as exc:
        load_swin_weights(_tiny(0), path)
    assert str(path) in _one_line(exc)


class _Payload:
    """Unpickling this with a full unpickler creates ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = _source_model().state_dict()
    state["payload"] = _Payload(marker)
    torch.save(state, path)

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    with pytest.raises(UserInputError) as exc:
        load_swin_weights(_tiny(0), path)
    assert str(path) in _one_line(exc)
    assert not marker.exists()
    assert calls and all(kw.get("weights_only") is True for kw in calls)
