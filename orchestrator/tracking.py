"""MLflow from the driver only, and never at the cost of the training run.

Workers never talk to MLflow: what they measure reaches the driver's node through Ray Train's
reports, and a callback there logs rank 0's figures (so a worker on a node that cannot see the
tracking store, or its ``./mlruns``, changes nothing). Each step is logged once, also when a run
resumes: a step at or below the last one MLflow holds was logged before and is skipped.
If the tracking server cannot be reached, training goes on and says so once.
"""
from __future__ import annotations

import logging
import os
import time
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detectors.errors import UserInputError
from detectors.params import count_parameters

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig

log = logging.getLogger(__name__)

# MLflow's HTTP client retries for minutes by default; a training run should not wait on it.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def reachable(uri: str, timeout: float = 3.0) -> bool:
    """False for an http(s) tracking server that does not answer /health; True otherwise."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def warn_unreachable(uri: str, reason: str) -> None:
    from orchestrator.console import CONSOLE
    CONSOLE.warn(f"MLflow tracking at {uri} is unavailable ({reason}); training continues without it")


def open_client(uri: str) -> tuple[Any, bool]:
    """An MLflow client for ``uri``, and whether its server answers (if not, said once here)."""
    from mlflow.tracking import MlflowClient
    answers = reachable(uri)
    if not answers:
        warn_unreachable(uri, "no answer from /health")
    return MlflowClient(tracking_uri=uri), answers


def experiment_id(client, name: str, uri: str) -> str:
    """The MLflow experiment ``name``, created if new. With a local sqlite store its artifacts go
    beside the store, not into ``./mlruns`` of whatever directory the command ran in."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def describe_run(cfg) -> tuple[str, dict[str, str]]:
    """The MLflow run's name (``tracking.run_name``, else what it is: ``e3va-r8 swin_t mask_rcnn``) and the
    tags a user filters and compares by."""
    hyper = cfg.tuning.hyperparameters
    variant = cfg.tuning.method + (f"-r{hyper['rank']}" if "rank" in hyper else "")
    name = cfg.tracking.run_name or f"{variant} {cfg.backbone.name} {cfg.model.detector}"
    return name, {"method": cfg.tuning.method, "backbone": cfg.backbone.name, "detector": cfg.model.detector,
                  "task": cfg.task.run_tag(cfg), **cfg.task.run_params(cfg)}


def log_dataset(client, run_id: str, cfg, paths: dict[str, Any]) -> None:
    """The training data as the run's one MLflow dataset input (the runs table's Dataset column):
    named for what it is, its digest over both splits' annotations."""
    import hashlib

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    name, files, source_path = cfg.task.dataset_record(cfg, paths)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all of them name this file
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(source_path.resolve()))
    dataset = MetaDataset(source, name=name, digest=digest.hexdigest()[:10])
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "train")])])


def system_metrics_monitor(run_id: str, uri: str, resume: bool):
    """CPU, memory (and GPU, where pynvml sees one) of the driver's node, sampled into the run; or None."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=resume, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - e.g. psutil missing: the run goes on without them
        log.info("no system metrics: %s", exc)
        return None


def default_uri(run_dir: Path) -> str:
    """The embedded default: a sqlite store beside the run's outputs."""
    return f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"


class Tracker:
    """Thin, failure-tolerant wrapper around an MLflow client and one run."""

    def __init__(self, uri: str, run_id: str | None):
        self.uri = uri
        self.run_id = run_id
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _call(self, fn, *args, **kwargs) -> Any:
        if self.run_id is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warn_unreachable(self.uri, first)
            self.run_id = None  # said once; no more waiting on a server that is gone
            return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        # NaN is kept: COCO reports it for a size bucket without ground truth.
        batch = [Metric(key=k.replace("/", "_"), value=float(v), timestamp=now, step=step)
                 for k, v in metrics.items() if v is not None]
        if batch:
            self._call(self.client.log_batch, self.run_id, metrics=batch, synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        self._call(self.client.log_batch, self.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                   synchronous=True)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)


def metrics_callback(uri: str, run_id: str, logged_through: int = 0):
    """A Ray Train callback (it runs on the driver's node) that logs rank 0's figures of every step
    after ``logged_through`` to the MLflow run (a report carries the steps since the previous one under
    ``steps``), and once the batch sizes the workers chose."""
    from mlflow.entities import Param
    from ray.train import UserCallback

    class MlflowMetrics(UserCallback):
        def __init__(self):
            self.tracker, self.logged_through, self.sizes_logged = Tracker(uri, run_id), logged_through, False

        def after_report(self, run_context, metrics, checkpoint):
            report = metrics[0]
            if "batch_sizes" in report and not self.sizes_logged:
                self.sizes_logged = True
                sizes = report["batch_sizes"]
                for attempt in range(3):  # a sqlite store shared by concurrent trials can be locked a moment
                    try:  # a resumed run has them already, with the same values: no error
                        # which hyperparameters batch_size: auto switched on (recompute), per rank
                        switched = [Param("switched_hyperparameters", str(report["switched_hyperparameters"]))] \
                            if "switched_hyperparameters" in report else []
                        self.tracker.client.log_batch(run_id, params=[Param("batch_sizes", str(sizes)),
                                                                      Param("batch_total", str(sum(sizes))), *switched])
                        break
                    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                        log.info("batch sizes not logged (try %d): %s", attempt + 1, exc)
                        time.sleep(0.5)
            for figures in [*report.get("steps", []), report]:
                step = int(figures.get("step", 0))
                if step <= self.logged_through:  # logged before the run was interrupted
                    continue
                self.tracker.log_metrics({k: v for k, v in figures.items() if isinstance(v, (int, float))}, step)
                self.logged_through = step

    return MlflowMetrics()


# ----------------------------------------------------------------------------- a training run's MLflow run

def run_params(cfg: ExperimentConfig) -> dict[str, Any]:
    count = count_parameters(cfg.backbone.name, cfg.tuning.method, cfg.tuning.hyperparameters,
                             **cfg.backbone.overrides)
    return {"method": count.method, "variant": cfg.tuning.method, **count.hyperparameters,
            "backbone": cfg.backbone.name, "detector": cfg.model.detector, "task": cfg.task.name,
            **cfg.task.run_params(cfg),
            "batch_per_worker": cfg.schedule.batch_size, "workers": cfg.scaling.workers,
            **({"batch_total": sum(cfg.batch_sizes())} if cfg.batch_sizes() else {}), "lr": cfg.schedule.lr,
            "gpu_kind": cfg.scaling.gpu_kind or ("any gpu" if cfg.scaling.use_gpu else "cpu"),
            "trainable_params": count.trainable, "trainable_percent": round(count.percent, 4),
            "backbone_init": backbone_init(cfg), "seed": cfg.seed,
            **({"train_images": cfg.data.synthetic.num_train} if cfg.data.synthetic is not None else {})}


def backbone_init(cfg: ExperimentConfig) -> str:
    """Where the frozen backbone comes from, in a few words: the upstream pre-training, a file, or a seed."""
    if cfg.backbone.upstream is not None:
        return f"upstream {cfg.backbone.upstream.steps} steps s{cfg.backbone.upstream.seed}"
    if cfg.backbone.weights is not None:
        return Path(cfg.backbone.weights).name
    return f"random s{cfg.seed}"


MLFLOW_RUN_FILE = "mlflow_run_id"


def remembered_run_id(cfg: ExperimentConfig) -> str | None:
    """The MLflow run this training run logged to before, kept in its storage for any re-run."""
    storage = cfg.run_storage()
    text = storage.read_text(storage.path(MLFLOW_RUN_FILE))
    return text.strip() if text else None


def start_mlflow_run(cfg: ExperimentConfig, uri: str, *, resuming: bool, parent_run_id: str | None = None,
                     extra_params: dict[str, Any] | None = None) -> tuple[Any, str | None]:
    """The MLflow run of this training run: the one it had before when it resumes (``resuming``: its storage
    holds a checkpoint), else a new one.

    Returns ``(client, None)`` when the tracking server cannot be reached: training goes on.
    """
    from orchestrator.console import CONSOLE
    client, answers = open_client(uri)
    if not answers:
        return client, None
    storage = cfg.run_storage()
    try:
        run_id = remembered_run_id(cfg)
        if run_id is not None and resuming:
            status = client.get_run(run_id).info.status
            if status == "FINISHED":
                raise UserInputError(f"{storage.uri} already holds the finished run {run_id}; "
                                     f"give the experiment another name (--set name=...) or output_dir")
            client.update_run(run_id, "RUNNING")
            CONSOLE.say(f"resuming MLflow run {run_id} (was {status})")
            return client, run_id
        name, tags = describe_run(cfg)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id(client, cfg.tracking.experiment, uri), run_name=name, tags=tags)
        for key, value in {**run_params(cfg), **(extra_params or {})}.items():
            client.log_param(run.info.run_id, key, value)
        log_dataset(client, run.info.run_id, cfg, cfg.task.dataset_paths(cfg))
        storage.write_text(storage.path(MLFLOW_RUN_FILE), run.info.run_id)
        return client, run.info.run_id
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        warn_unreachable(uri, str(exc).splitlines()[0])
        return client, None
