"""The Ray cluster a command works on: joining it, and the checks that refuse, in one line and before
anything starts, what it can never hold (workers, trials) or reach (a node-local storage path)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from detectors.errors import UserInputError

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig
    from orchestrator.storage import Storage


def connect(*, dashboard: bool | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster at $RAY_ADDRESS, or start a local one, unless this process is in one already.

    ``dashboard``: None leaves it to Ray; a sweep asks for it (its state API), a run does without."""
    import ray
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=dashboard, log_to_driver=log_to_driver)


def check_cluster(cfg: ExperimentConfig, nodes: list[dict]) -> None:
    """One line, before anything starts, when the cluster's nodes can never hold the run's workers."""
    need = cfg.scaling.worker_resources()
    alive = [node["Resources"] for node in nodes if node.get("Alive", True)]
    fits = sum(min(int(node.get(name, 0) / amount + 1e-9) for name, amount in need.items()) for node in alive)
    if fits < cfg.scaling.workers:
        have = sorted({name for node in alive for name in node
                       if name.startswith("gpu_") or name in ("CPU", "GPU") or name in need})
        raise UserInputError(f"scaling: {cfg.scaling.workers} workers each needing {need} do not fit this cluster "
                             f"(room for {fits}; its nodes offer {', '.join(have)}); set scaling.check_cluster=false "
                             f"if it starts nodes on demand")


def check_storage_reach(storage: Storage, nodes: list[dict], need: dict[str, float], driver_node: str, *,
                        fixed_cluster: bool = True) -> None:
    """A node-local storage path is refused when a worker may land on a node other than this one:
    Ray Train's checkpoints (and everything a re-run reads) would stay on that node's disk."""
    if storage.shared:
        return
    others = [node for node in nodes if node.get("Alive", True) and node.get("NodeID") != driver_node
              and all(node.get("Resources", {}).get(name, 0) > 0 for name in need)]
    if others or not fixed_cluster:
        where = f"{len(others)} other node{'s' * (len(others) != 1)}" if fixed_cluster else "nodes started on demand"
        raise UserInputError(
            f"{storage.field}: {storage.uri} is on this node's disk, but the workers may land on {where} that "
            f"cannot see it; set {storage.field} to an s3:// or gs:// URI, or to a folder every node mounts "
            f"and {storage.field}.shared=true")


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    s = cfg.scaling
    per_worker = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        per_worker["GPU"] = s.gpus_per_worker
    return per_worker


def check_resources(source: Path, configs: Sequence[ExperimentConfig]) -> int:
    """Each trial's workers must fit this Ray cluster; returns how many trials fit at once. Errors name
    ``source``, the sweep file."""
    import ray
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits_at_once = None
    for cfg in configs:
        s = cfg.scaling
        per_worker = trial_resources(cfg)
        fields = {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.gpus_per_worker"}
        for kind, amount in per_worker.items():
            biggest = max((n.get(kind, 0) for n in nodes), default=0)
            if amount > biggest:
                raise UserInputError(f"{source}: a trial worker needs {amount:g} {kind} "
                                     f"({fields[kind]}) but no node of this Ray cluster has more than {biggest:g}")
            need = amount * s.workers
            if need > total.get(kind, 0):
                raise UserInputError(f"{source}: a trial needs {s.workers} workers x {amount:g} {kind} = "
                                     f"{need:g} {kind} (scaling.workers, {fields[kind]}) but this Ray cluster has "
                                     f"{total.get(kind, 0):g}")
            at_once = int(total.get(kind, 0) // need)
            fits_at_once = at_once if fits_at_once is None else min(fits_at_once, at_once)
        if s.check_cluster:  # the GPU kind and custom resources too, node by node
            try:
                check_cluster(cfg, ray.nodes())
            except UserInputError as exc:
                raise UserInputError(f"{source}: a {cfg.tuning.method} trial: {exc}") from None
    return max(fits_at_once or 1, 1)


def check_state_api(source: Path) -> None:
    """Tune kills a trial ASHA stops; Train's placement-group cleaner then needs the state API to
    notice, or the trial's reserved CPUs and GPUs are never given back and later trials wait forever."""
    from ray.util.state import list_actors
    try:
        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001
        raise UserInputError(
            f"{source}: asha: stopping trials early needs the Ray dashboard (its state API frees a stopped "
            f"trial's workers), and this Ray cluster has none ({str(exc).strip().splitlines()[0][:120]}); "
            f"start it with the dashboard (ray start --include-dashboard=true, ray.init(include_dashboard=True))"
        ) from None
