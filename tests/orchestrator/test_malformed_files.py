"""Whatever bytes an experiment or sweep file holds, ``run`` and ``sweep`` answer in one line naming the file,
exit 2, within seconds, and write nothing. The corpus is what an attacker or a tired user would give."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "tiny.yaml"
VALID = DEMO.read_text()
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))

CORPUS = {  # name -> (file contents, what the one line says)
    "not utf-8": (b"name: \xff\xfe caf\xe9\n", "not UTF-8 text (byte 0xff at offset 6)"),
    "utf-16": ("name: demo\n".encode("utf-16"), "not UTF-8 text"),
    "duplicate key": (VALID.replace("name: tiny", "name: tiny\nseed: 1\nseed: 2").encode(),
                      "the key 'seed' is given twice"),
    "duplicate nested key": (b"schedule: {iterations: 2, lr: 0.1, lr: 0.001}\n", "the key 'lr' is given twice"),
    "python object": (b"name: !!python/object/apply:os.system ['touch PWNED']\n", "not valid YAML"),
    "billion laughs": (LAUGHS.encode(), "aliases (*name) are not allowed"),
    "deep nesting": (b"a: " + b"[" * 50000 + b"]" * 50000 + b"\n", "not valid YAML"),
    "control characters": (b"name: de\x00mo\n", "not valid YAML"),
    "two documents": (b"name: a\n---\nname: b\n", "not valid YAML"),
    "a list": (b"- name: a\n", "expected a mapping of sections, got a list"),
    "too large": (b"# " + b"x" * (1 << 20) + b"\n", "is too large"),
    "unhashable key": (b"? [a, b]\n: 1\n", "a key must be a plain value"),
}


def check_one_line(capsys, path: Path, message: str, out: Path) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err and message in err, err
    assert "Traceback" not in err and not out.exists() and not (Path.cwd() / "PWNED").exists()


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("case", sorted(CORPUS))
def test_a_malformed_file_is_one_line_and_exit_2(tmp_path, capsys, command, case):
    content, message = CORPUS[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    out = tmp_path / "out"
    started = time.monotonic()
    assert main([command, str(path), "--set", f"output_dir={out}"]) == 2
    assert time.monotonic() - started < 10
    check_one_line(capsys, path, message, out)


@pytest.mark.parametrize("case", ["not utf-8", "duplicate key", "billion laughs"])
def test_a_sweep_whose_base_experiment_is_malformed_names_the_base(tmp_path, capsys, case):
    base = tmp_path / "base.yaml"
    base.write_bytes(CORPUS[case][0])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {base}\nspace: {{seed: {{grid: [1, 2]}}}}\n")
    assert main(["sweep", str(sweep), "--set", f"output_dir={tmp_path}/out"]) == 2
    check_one_line(capsys, base, CORPUS[case][1], tmp_path / "out")


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_directory_given_as_the_file_is_named_a_directory(tmp_path, capsys, command):
    assert main([command, str(tmp_path), "--set", f"output_dir={tmp_path}/out"]) == 2
    check_one_line(capsys, tmp_path, "is a directory, not a file", tmp_path / "out")


AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture(scope="module")
def as_another_user():
    """Root reads any file: a file without read permission is tried as ``nobody``, where the checkout allows it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("reading as another user needs root and setpriv")
    if subprocess.run([*AS_NOBODY, sys.executable, "-c", "import orchestrator.cli"], cwd=ROOT,
                      capture_output=True, timeout=60).returncode != 0:
        pytest.skip("nobody cannot read this checkout or its virtualenv")


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_file_without_read_permission_is_one_line_from_the_real_command(tmp_path, command, as_another_user):
    path = tmp_path / "secret.yaml"
    path.write_text(VALID)
    path.chmod(0o000)
    tmp_path.chmod(0o755)
    result = subprocess.run([*AS_NOBODY, sys.executable, "-m", "orchestrator", command, str(path), "--set", f"output_dir={tmp_path}/out"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == f"error: {'experiment' if command == 'run' else 'sweep'} file {path} cannot be read: " \
                            f"Permission denied\n", result.stderr
    assert not (tmp_path / "out").exists()


def test_a_detectron2_experiment_with_torchvision_options_fails_before_ray_starts(tmp_path, capsys):
    """The demo's torchvision-only model.options left in a detectron2 experiment: one line, at once."""
    started = time.monotonic()
    assert main(["run", str(DEMO), "--set", "model.engine=detectron2", "--set", "model.detector=retinanet",
                 "--set", f"output_dir={tmp_path}/out", "--set", f"data.synthetic.root={tmp_path}/s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and time.monotonic() - started < 10, err
    assert ("unknown option(s) box_batch_size_per_image" in err or "detectron2 is not installed" in err), err
    assert not (tmp_path / "out").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
