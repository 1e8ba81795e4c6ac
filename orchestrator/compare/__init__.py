"""``python -m orchestrator compare``: the papers' comparison table and figures from MLflow runs."""
from orchestrator.compare.rows import compare_runs

__all__ = ["compare_runs"]
