"""The command line as a user runs it: python -m orchestrator params|bench."""
import json
import subprocess
import sys

import pytest


def orchestrator(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_params_json_matches_the_e3va_paper():
    result = orchestrator("params", "--backbone", "swin_b", "--method", "e3va", "--set", "rank=8", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["backbone"] == "swin_b" and row["method"] == "e3va"
    assert isinstance(row["trainable"], int) and isinstance(row["total"], int)
    assert abs(row["trainable"] / 1.20e6 - 1) < 0.01
    assert row["total"] > 86e6


def test_params_variant_by_name_equals_override():
    by_name = json.loads(orchestrator("params", "--backbone", "swin_l", "--method", "e3va++", "--json").stdout)
    by_set = json.loads(orchestrator("params", "--backbone", "swin_l", "--method", "e3va", "--set", "rank=32",
                                     "--json").stdout)
    assert by_name["trainable"] == by_set["trainable"]
    assert abs(by_name["trainable"] / 7.00e6 - 1) < 0.01


def test_params_table_lists_every_method_and_variant():
    result = orchestrator("params", "--backbone", "swin_b", "--all")
    assert result.returncode == 0, result.stderr
    first_column = [line.split()[0] for line in result.stdout.splitlines()[3:] if line.strip()]
    for name in ("full", "fixed", "bitfit", "norm", "partial-1", "adapter", "lora", "adaptformer",
                 "lorand", "lorand+", "lorand++", "e3va", "e3va+", "e3va++"):
        assert name in first_column
    assert "2.39" in result.stdout  # LoRand on Swin-B, as published


def test_params_does_not_import_ray_or_mlflow():
    code = ("import sys; from orchestrator.cli import main; main(['params', '--backbone', 'swin_t', '--method', "
            "'e3va', '--json']); assert not {'ray', 'mlflow'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, named", [
    (("params", "--backbone", "swin_q"), "swin_q"),
    (("params", "--method", "e4va"), "e4va"),
    (("params", "--method", "e3va", "--set", "kernel=8"), "kernel"),
    (("params", "--method", "lorand", "--set", "branches=two"), "branches"),
    (("params", "--method", "e3va", "--set", "rank=0"), "rank"),
    (("bench", "--methods", "full,e4va", "--size", "64x64"), "e4va"),
    (("bench", "--backbone", "swin_x", "--size", "64x64"), "swin_x"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(args, named):
    result = orchestrator(*args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and named in lines[0]
    assert "Traceback" not in result.stderr


def test_bench_json_measures_every_method_side_by_side():
    result = orchestrator("bench", "--backbone", "swin_t", "--methods", "full,fixed,e3va", "--size", "96x128",
                          "--batch", "1", "--repeats", "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"full", "fixed", "e3va"}
    for row in rows.values():
        assert {"method", "trainable", "saved_bytes", "peak_bytes", "step_s"} <= set(row)
        assert row["step_s"] > 0 and row["peak_bytes"] > 0
    assert rows["fixed"]["trainable"] == 0 and rows["fixed"]["saved_bytes"] == 0
    assert rows["e3va"]["trainable"] < rows["full"]["trainable"] / 20
    # saved activations are deterministic: the highway keeps a small fraction of what full keeps
    assert rows["e3va"]["saved_bytes"] < 0.25 * rows["full"]["saved_bytes"]


def test_bench_table_prints_ratios_to_full_and_fixed():
    result = orchestrator("bench", "--backbone", "swin_t", "--methods", "full,fixed,e3va", "--size", "64x64",
                          "--batch", "1", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "time/full" in result.stdout and "time/fixed" in result.stdout
    e3va_row = next(line for line in result.stdout.splitlines() if line.startswith("e3va"))
    assert len(e3va_row.split()) == 13
