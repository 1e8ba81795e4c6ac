"""``detectors`` runs where only torch, timm and torchvision are installed: it never imports the
orchestration layer (Ray, MLflow, the experiment schema's pydantic, ``orchestrator``)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "mlflow", "pydantic", "orchestrator")
OPTIONAL = ("detectron2",)  # an optional extra: modules that need it may fail to import without it
MODULES = ("detectors", "detectors.bench", "detectors.params", "detectors.data", "detectors.evaluation",
           "detectors.highway", "detectors.tuning", "detectors.backbones")

# Runs in a fresh interpreter: import each module in turn and note the top-level packages loaded
# after it; then every module under detectors/.
_PROBE = """
import importlib, json, pkgutil, sys

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules})

report = {}
for module in sys.argv[1:]:
    importlib.import_module(module)
    report[module] = loaded()
if "detectors" in report:
    for info in pkgutil.walk_packages(sys.modules["detectors"].__path__, "detectors."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in %r:
                raise
    report["<all>"] = loaded()
print(json.dumps(report))
""" % (OPTIONAL,)


@functools.lru_cache(maxsize=None)
def _probe(*modules: str) -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _PROBE, *modules], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_probe_sees_what_a_module_imports():
    report = _probe("csv", "wave")
    assert "csv" in report["csv"] and "wave" not in report["csv"]
    assert "wave" in report["wave"]
    assert "<all>" not in report


@pytest.mark.parametrize("module", MODULES)
def test_a_detectors_module_imports_no_orchestration(module):
    """Modules are imported in order, so the first one that fails is the one that pulls it in."""
    loaded = set(_probe(*MODULES)[module])
    assert {"detectors", "torch"} <= loaded
    assert not set(FORBIDDEN) & loaded


def test_no_module_under_detectors_imports_orchestration():
    loaded = set(_probe(*MODULES)["<all>"])
    assert not set(FORBIDDEN) & loaded


def test_importing_the_engines_does_not_import_detectron2():
    """The torchvision engine works where detectron2 is not installed: the registry imports it lazily."""
    code = "import sys, detectors.engines; print('detectron2' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
