"""Bad method names and hyperparameters are one-line user errors that say what is valid."""

from __future__ import annotations

import pytest

from detectors import build_backbone
from detectors.errors import UserInputError
from detectors.tuning import build_tuning, hyperparameter_names, resolve_method, variant_table


def _message(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_unknown_method_is_named_and_the_choices_listed():
    with pytest.raises(UserInputError) as exc:
        build_tuning("e4va")
    message = _message(exc)
    assert "'e4va'" in message
    for choice in variant_table():
        assert choice in message


def test_unknown_hyperparameter_is_named_with_the_valid_ones():
    with pytest.raises(UserInputError) as exc:
        build_tuning("e3va", kernel=8)
    message = _message(exc)
    assert "'kernel'" in message and "e3va" in message
    assert hyperparameter_names("e3va") == ["rank", "init", "recompute"]
    for valid in hyperparameter_names("e3va"):
        assert valid in message


def test_a_method_without_hyperparameters_rejects_any():
    with pytest.raises(UserInputError) as exc:
        build_tuning("full", rank=8)
    assert "'rank'" in _message(exc) and "none" in str(exc.value)


@pytest.mark.parametrize(("method", "overrides", "named"), [
    ("e3va", {"rank": "big"}, "rank='big'"),
    ("e3va", {"rank": 8.0}, "rank=8.0"),
    ("e3va", {"rank": True}, "rank=True"),
    ("lorand", {"kernel": "16"}, "kernel='16'"),
    ("e3va", {"init": 0}, "init=0"),
])
def test_wrong_type_is_rejected(method, overrides, named):
    with pytest.raises(UserInputError) as exc:
        build_tuning(method, **overrides)
    message = _message(exc)
    assert named in message and method in message


@pytest.mark.parametrize(("method", "overrides", "named"), [
    ("e3va", {"rank": 0}, "rank=0"),
    ("e3va", {"rank": -4}, "rank=-4"),
    ("lorand", {"branches": 0}, "branches=0"),
    ("adapter", {"dim": 0}, "dim=0"),
    ("lora", {"alpha": -1.0}, "alpha=-1.0"),
    ("partial-1", {"blocks": 0}, "blocks=0"),
])
def test_non_positive_values_are_rejected(method, overrides, named):
    with pytest.raises(UserInputError) as exc:
        build_tuning(method, **overrides)
    message = _message(exc)
    assert named in message and "positive" in message


def test_unknown_e3va_init_lists_the_choices():
    with pytest.raises(UserInputError) as exc:
        build_tuning("e3va", init="xavier")
    message = _message(exc)
    assert "xavier" in message and "kaiming" in message and "zero_up" in message


def test_an_int_is_accepted_where_a_float_is_expected():
    assert build_tuning("lora", alpha=32).cfg.alpha == 32.0
    assert isinstance(build_tuning("lora", alpha=32).cfg.alpha, float)


def test_unknown_backbone_is_named():
    with pytest.raises(UserInputError) as exc:
        build_backbone("swin_x")
    message = _message(exc)
    assert "'swin_x'" in message and "swin_t" in message and "swin_l_384" in message


def test_bad_tuning_is_reported_before_any_backbone_is_built():
    with pytest.raises(UserInputError) as exc:
        build_backbone("swin_x", tuning="e3va", rank=0)
    assert "rank=0" in _message(exc)


@pytest.mark.parametrize(("name", "method", "expected"), [
    ("e3va", "e3va", {"rank": 8, "init": "linear"}),
    ("e3va+", "e3va", {"rank": 16}),
    ("e3va++", "e3va", {"rank": 32}),
    ("lorand", "lorand", {"branches": 2, "kernel": 8}),
    ("lorand+", "lorand", {"branches": 4, "kernel": 8}),
    ("lorand++", "lorand", {"branches": 4, "kernel": 16}),
    ("adapter", "adapter", {"dim": 64}),
    ("lora", "lora", {"dim": 64}),
    ("adaptformer", "adaptformer", {"dim": 64}),
    ("partial-1", "partial-1", {"blocks": 1}),
])
def test_variants_resolve_to_the_papers_settings(name, method, expected):
    resolved, cfg = resolve_method(name)
    assert resolved == method
    for key, value in expected.items():
        assert getattr(cfg, key) == value
    assert build_tuning(name).cfg == cfg


def test_overrides_on_a_variant_apply():
    method, cfg = resolve_method("e3va+", {"rank": 4})
    assert (method, cfg.rank) == ("e3va", 4)
    method, cfg = resolve_method("lorand++", {"branches": 2})
    assert (method, cfg.branches, cfg.kernel) == ("lorand", 2, 16)
    assert build_tuning("e3va++", init="zero_up").cfg.rank == 32


def test_resolving_a_variant_does_not_change_the_table():
    resolve_method("e3va+", {"rank": 4})
    assert variant_table()["e3va+"] == ("e3va", {"rank": 16})
    assert resolve_method("e3va+")[1].rank == 16
