"""The sweep's parent MLflow run: made once, found again when the sweep resumes, closed with how the sweep ended."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from orchestrator.console import CONSOLE

if TYPE_CHECKING:
    from orchestrator.sweep.loading import Sweep

PARENT_RUN_FILE = "mlflow_parent_run_id"
SWEEP_FILE = "sweep.json"


def _parent_run(sweep: Sweep, resuming: bool) -> tuple[Any, str | None]:
    """The sweep's MLflow run: the one it had when it resumes, else a new one."""
    from orchestrator.tracking import experiment_id, open_client, warn_unreachable
    uri = sweep.tracking_uri
    client, answers = open_client(uri)
    if not answers:
        return client, None
    remembered = sweep.storage.path(PARENT_RUN_FILE)
    try:
        if resuming and (run_id := (sweep.storage.read_text(remembered) or "").strip()):
            CONSOLE.say(f"resuming sweep {sweep.name}: MLflow parent run {run_id} "
                        f"(was {client.get_run(run_id).info.status})")
            client.update_run(run_id, "RUNNING")
            return client, run_id
        run = client.create_run(experiment_id(client, sweep.base.tracking.experiment, uri), run_name=sweep.name,
                                tags={"sweep.space": json.dumps(list(sweep.cfg.space)), "sweep.parent": "true"})
        run_id = run.info.run_id
        params = {"sweep_file": str(sweep.path), "base": str(sweep.cfg.base), "num_samples": sweep.cfg.num_samples,
                  "max_concurrent_trials": sweep.cfg.max_concurrent_trials,
                  **{f"space.{k}": v.describe() for k, v in sweep.cfg.space.items()},
                  **({f"asha.{k}": v for k, v in sweep.cfg.asha.model_dump().items()} if sweep.cfg.asha else {})}
        for key, value in params.items():
            if value is not None:
                client.log_param(run_id, key, str(value)[:6000])
        client.log_artifact(run_id, str(sweep.dir / SWEEP_FILE))
        sweep.storage.write_text(remembered, run_id)
        return client, run_id
    except Exception as exc:  # noqa: BLE001 - tracking must never stop the sweep
        warn_unreachable(uri, str(exc).splitlines()[0])
        return client, None


def _terminate(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001
        CONSOLE.warn(f"MLflow tracking failed ({str(exc).splitlines()[0]})")
