"""The synthetic upstream pre-training: deterministic, cached, loaded like a Microsoft Swin release."""
import json

import pytest
import torch

import detectors
from detectors.backbones.swin import read_state_dict
from detectors.errors import UserInputError
from detectors.upstream import UpstreamSpec, cached, check_fits, ensure_pretrained, upstream_batch
from detectors.upstream import pretraining as pretrain_module
from detectors.upstream.data import COLOUR_FAMILIES, SHAPES, TEXTURES

QUICK = dict(steps=2, batch_size=2, image_size=64, warmup_steps=1, device="cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    spec = UpstreamSpec(**QUICK, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return spec, ensure_pretrained(spec)


def test_batches_depend_only_on_seed_split_and_index_and_label_what_is_drawn():
    images, maps = upstream_batch(3, 0, 5, 4, 64)
    again, maps_again = upstream_batch(3, 0, 5, 4, 64)
    other, _ = upstream_batch(3, 1, 5, 4, 64)
    assert torch.equal(images, again) and torch.equal(maps, maps_again) and not torch.equal(images, other)
    assert images.shape == (4, 3, 64, 64) and maps.shape == (4, 3, 64, 64)
    for j, names in enumerate((SHAPES, COLOUR_FAMILIES, TEXTURES)):
        assert 0 <= maps[:, j].min() and maps[:, j].max() <= len(names)
    # the three maps mark the same object pixels, and every image has some
    assert torch.equal(maps[:, 0] > 0, maps[:, 1] > 0) and torch.equal(maps[:, 0] > 0, maps[:, 2] > 0)
    assert all((maps[i, 0] > 0).any() for i in range(4))


def test_the_same_spec_and_seed_give_the_same_weights(checkpoint, tmp_path):
    spec, path = checkpoint
    again = ensure_pretrained(UpstreamSpec(**QUICK, cache_dir=str(tmp_path)))
    first, second = read_state_dict(path)["model"], read_state_dict(again)["model"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other_seed = ensure_pretrained(UpstreamSpec(**{**QUICK, "seed": 1}, cache_dir=str(tmp_path)))
    assert other_seed != again and not torch.equal(read_state_dict(other_seed)["model"]["patch_embed.proj.weight"],
                                                   first["patch_embed.proj.weight"])


def test_the_checkpoint_has_microsofts_layout_and_loads_through_build_backbone(checkpoint):
    spec, path = checkpoint
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == {"model"}
    keys = state["model"].keys()
    # Microsoft's release: patch merging at the END of stages 0-2, no detection output norms
    assert "layers.0.downsample.reduction.weight" in keys and "layers.3.downsample.reduction.weight" not in keys
    assert not any(k.startswith(("norm0", "norm1")) for k in keys) and any(k.startswith("head.") for k in keys)
    backbone = detectors.build_backbone("swin_mini", tuning="e3va", weights=path)
    loaded = backbone.state_dict()
    merged = [k for k in loaded if k.endswith("layers.1.downsample.reduction.weight")]
    assert merged and torch.equal(loaded[merged[0]], state["model"]["layers.0.downsample.reduction.weight"])
    with pytest.raises(UserInputError, match="another backbone"):
        detectors.build_backbone("swin_t", weights=path)


def test_a_second_call_takes_the_cache_without_training(checkpoint, monkeypatch):
    spec, path = checkpoint
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **k: pytest.fail("trained again"))
    assert ensure_pretrained(spec) == path


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "drop the manifest", "another spec's manifest"])
def test_a_damaged_cache_is_trained_again_never_used(tmp_path, damage):
    spec = UpstreamSpec(**QUICK, cache_dir=str(tmp_path))
    path = ensure_pretrained(spec)
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "flip a byte":
        path.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    elif damage == "drop the manifest":
        spec.manifest.unlink()
    else:
        manifest = json.loads(spec.manifest.read_text())
        manifest["identity"]["steps"] = 99
        spec.manifest.write_text(json.dumps(manifest))
    assert cached(spec) is None
    assert ensure_pretrained(spec) == path and path.read_bytes() == good and cached(spec) == path


def test_a_cache_that_cannot_be_written_is_one_line_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(pretrain_module, "pretrain", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(UserInputError) as caught:
        ensure_pretrained(UpstreamSpec(**QUICK, cache_dir=str(blocker / "cache")))
    message = str(caught.value)
    assert "\n" not in message and f"{blocker}/cache is not a writable directory" in message


def test_an_upstream_that_does_not_fit_the_backbone_is_named():
    check_fits(UpstreamSpec(), "swin_mini", {})
    check_fits(UpstreamSpec(), "swin_t", {"embed_dim": 48, "depths": [2, 2, 2, 2]})
    with pytest.raises(UserInputError) as caught:
        check_fits(UpstreamSpec(), "swin_t", {})
    message = str(caught.value)
    assert message.startswith("backbone.upstream: pre-trains swin_mini (embed_dim 48")
    assert "swin_t (embed_dim 96" in message


@pytest.mark.parametrize("field, value, expected", [("steps", 0, "steps must be at least 1"),
                                                    ("image_size", 100, "multiple of 32"),
                                                    ("backbone", "swin_x", "unknown"),
                                                    ("device", "tpu", "auto, cpu or cuda")])
def test_bad_specs_are_one_line(field, value, expected):
    with pytest.raises(UserInputError, match=expected):
        UpstreamSpec(**{field: value})
