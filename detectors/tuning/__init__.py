"""Tuning methods. Each sibling module registers one method; importing this package loads them all."""
import importlib
import pkgutil

from detectors.tuning.base import (TUNING_METHODS, MethodConfig, TuningMethod, build_tuned_swin, build_tuning,
                                   hyperparameter_names, memory_savers, resolve_method, result_hyperparameters,
                                   variant_table)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "layers"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TUNING_METHODS", "MethodConfig", "TuningMethod", "build_tuned_swin", "build_tuning", "hyperparameter_names",
           "memory_savers", "resolve_method", "result_hyperparameters", "variant_table"]
