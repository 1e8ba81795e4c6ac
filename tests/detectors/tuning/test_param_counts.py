"""Trainable-parameter counts reproduce the papers' tables (E3VA Table 1-4, LoRand Table 1-3)."""

from __future__ import annotations

import pytest

from detectors.backbones import SWIN_SPECS, build_swin
from detectors.params import count_parameters, parameter_table
from detectors.tuning import variant_table

# Trainable backbone parameters (millions) as the papers print them; see DESIGN.md.
PAPER = {
    #            e3va  e3va+  e3va++ lorand lorand+ lorand++ bitfit norm  partial-1 adapter lora  adaptformer
    "swin_b": (1.20, 2.35, 4.66, 2.39, 4.73, 9.32, 0.20, 0.06, 12.60, 3.11, 3.03, 3.11),
    "swin_l": (1.79, 3.53, 7.00, 3.59, 7.19, 14.24, 0.30, 0.09, 28.34, 4.66, 4.57, 4.66),
}
COLUMNS = ("e3va", "e3va+", "e3va++", "lorand", "lorand+", "lorand++", "bitfit", "norm", "partial-1",
           "adapter", "lora", "adaptformer")
LORAND_SMALL = {"swin_t": 0.88, "swin_s": 1.80}


def _tolerance(method: str) -> float:
    return 0.01 if method.startswith("e3va") else 0.03


CASES = [(backbone, method, millions) for backbone, row in PAPER.items() for method, millions in zip(COLUMNS, row)]
CASES += [(backbone, "lorand", millions) for backbone, millions in LORAND_SMALL.items()]


@pytest.mark.parametrize(("backbone", "method", "millions"), CASES,
                         ids=[f"{b}-{m}" for b, m, _ in CASES])
def test_count_matches_the_paper(backbone, method, millions):
    count = count_parameters(backbone, method)
    assert count.trainable / 1e6 == pytest.approx(millions, rel=_tolerance(method))
    assert count.percent == pytest.approx(100 * count.trainable / count.backbone_total)


def _e3va_exact(backbone: str, rank: int) -> int:
    """Per block two adapters, D: C -> C/2 and U: C/2 -> C, each weight 2 * rank * (in + out) plus a
    bias; plus the four trainable output LayerNorms."""
    spec = SWIN_SPECS[backbone]
    total = 0
    for stage, depth in enumerate(spec.depths):
        c = spec.embed_dim * 2**stage
        adapter = 2 * rank * (c + c // 2) + c // 2 + 2 * rank * (c // 2 + c) + c
        total += depth * 2 * adapter + 2 * c
    return total


def _lorand_exact(backbone: str, branches: int, kernel: int) -> int:
    """Per adapter (m = C, n = 2C): 2 * alpha * beta * (m + n + beta / 2) + n + m; two per block."""
    spec = SWIN_SPECS[backbone]
    total = 0
    for stage, depth in enumerate(spec.depths):
        m, n = spec.embed_dim * 2**stage, 2 * spec.embed_dim * 2**stage
        total += depth * 2 * (branches * kernel * kernel + 2 * branches * kernel * (m + n) + n + m)
    return total


@pytest.mark.parametrize("backbone", ["swin_t", "swin_b", "swin_l"])
@pytest.mark.parametrize("rank", [8, 16, 32])
def test_e3va_count_is_exactly_the_design_formula(backbone, rank):
    assert count_parameters(backbone, "e3va", {"rank": rank}).trainable == _e3va_exact(backbone, rank)


@pytest.mark.parametrize("backbone", ["swin_t", "swin_b"])
@pytest.mark.parametrize(("branches", "kernel"), [(2, 8), (4, 8), (4, 16)])
def test_lorand_count_is_exactly_the_design_formula(backbone, branches, kernel):
    count = count_parameters(backbone, "lorand", {"branches": branches, "kernel": kernel})
    assert count.trainable == _lorand_exact(backbone, branches, kernel)


def _mona_exact(backbone: str, dim: int = 64) -> int:
    """Per Mona on C channels: 4C (LayerNorm, gamma, gammax) + project1 (C d + d) + three depthwise
    convolutions (83 d + 3 d) + the 1x1 convolution (d^2 + d) + project2 (d C + C); two per block.
    The output norms stay frozen, as in the authors' code."""
    spec = SWIN_SPECS[backbone]
    return sum(depth * 2 * ((2 * dim + 5) * spec.embed_dim * 2**stage + dim * dim + 88 * dim)
               for stage, depth in enumerate(spec.depths))


@pytest.mark.parametrize("backbone", ["swin_t", "swin_s", "swin_b", "swin_l"])
@pytest.mark.parametrize("dim", [32, 64])
def test_mona_count_is_exactly_the_formula(backbone, dim):
    assert count_parameters(backbone, "mona", {"dim": dim}).trainable == _mona_exact(backbone, dim)


def test_mona_count_is_the_authors_training_log():
    """Leiyi-Hu/mona, ``Swin-Transformer-Object-Detection/log/voc/mona.txt`` (RetinaNet, Swin-L)
    prints ``trained_backbone_num:5267712``: every trained backbone parameter is a Mona one."""
    counts = {b: count_parameters(b, "mona").trainable for b in ("swin_t", "swin_s", "swin_b", "swin_l")}
    assert counts == {"swin_t": 1_408_128, "swin_s": 2_867_328, "swin_b": 3_667_456, "swin_l": 5_267_712}


@pytest.mark.xfail(strict=True, reason="the paper's 4.16M for COCO Swin-B is 13% above what the authors' "
                                       "code builds (3.67M); the output norms (3,840) do not close the gap")
@pytest.mark.parametrize("output_norms", [False, True], ids=["without-output-norms", "with-output-norms"])
def test_mona_count_matches_the_paper_on_swin_b(output_norms):
    trainable = count_parameters("swin_b", "mona").trainable
    trainable += 2 * sum(128 * 2**i for i in range(4)) if output_norms else 0
    assert trainable / 1e6 == pytest.approx(4.16, rel=0.03)


@pytest.mark.parametrize(("variant", "method", "overrides"), [
    ("e3va+", "e3va", {"rank": 16}),
    ("e3va++", "e3va", {"rank": 32}),
    ("lorand+", "lorand", {"branches": 4, "kernel": 8}),
    ("lorand++", "lorand", {"branches": 4, "kernel": 16}),
])
def test_a_variant_by_name_equals_its_method_with_overrides(variant, method, overrides):
    by_name = count_parameters("swin_b", variant)
    by_overrides = count_parameters("swin_b", method, overrides)
    assert by_name.method == by_overrides.method == method
    assert by_name.variant == variant and by_overrides.variant == method
    assert by_name.hyperparameters == by_overrides.hyperparameters
    assert by_name.trainable == by_overrides.trainable
    assert by_name.trainable != count_parameters("swin_b", method).trainable  # the default differs


def test_totals_and_the_table():
    with_head = sum(p.numel() for p in build_swin("swin_t").parameters())
    rows = parameter_table("swin_t")
    table = {c.variant: c for c in rows}
    assert len(rows) == len(table) and set(table) == set(variant_table())
    assert table["full"].trainable == table["full"].total == table["full"].backbone_total == with_head
    assert table["full"].percent == pytest.approx(100.0)
    assert table["fixed"].trainable == 0 and table["fixed"].total == with_head
    # Methods that add modules add exactly their trainable parameters (the output norms aside).
    e3va = table["e3va"]
    norms = sum(2 * c for c in (96, 192, 384, 768))
    assert e3va.total == with_head + e3va.trainable - norms
    assert table["adapter"].total == with_head + table["adapter"].trainable
    assert table["partial-1"].total == with_head
    assert 0 < e3va.percent < 2
