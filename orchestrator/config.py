"""The experiment YAML: a typed, validated schema, loaded with ``--set key.path=value`` overrides.

Errors are one line naming the file, the field and what was expected, e.g.
``experiments/x.yaml: schedule.lr: Input should be a valid number (got 'fast')``.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from detectors.data.transforms import SWIN_MAX_SIZE, SWIN_TEST_SHORT_EDGE, SWIN_TRAIN_SHORT_EDGES
from detectors.segmentation.transforms import ADE20K_CROP, ADE20K_SCALE
from detectors.errors import UserInputError
from detectors.upstream import UpstreamSpec
from orchestrator.gpu_kinds import check_kind
from orchestrator.yaml_files import read_yaml_mapping


class Strict(BaseModel):
    """A section of a YAML file: an unknown key is an error."""

    model_config = ConfigDict(extra="forbid")


class SyntheticData(Strict):
    """The built-in dataset: coloured shapes with boxes and masks, written once under ``root``."""
    root: Path = Field(Path("outputs/synthetic"), description="where it is written; may name the other fields, e.g. "
                                                             "outputs/shapes-{num_train}, so that datasets of "
                                                             "different sizes (a sweep's) do not share a folder")
    num_train: int = Field(64, ge=1)
    num_val: int = Field(16, ge=1)
    image_size: tuple[int, int] = (128, 160)
    num_classes: int = Field(3, ge=1, le=5)
    seed: int = 0
    colours: Literal["by_class", "random", "shifted"] = Field(
        "by_class", description="by_class: each class its own colour; random: any colour, so only the shape tells "
                                "the class; shifted: speckled greys the upstream task never shows, shape only")

    @model_validator(mode="after")
    def _root_names_fields(self) -> "SyntheticData":
        self.folder()
        return self

    def folder(self) -> Path:
        """``root`` with the fields it names filled in."""
        fields = {k: v for k, v in self.model_dump(mode="json").items() if k != "root"}
        try:
            return Path(str(self.root).format(**fields))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"root: {str(self.root)!r} names {exc}, which is not a field of data.synthetic "
                             f"({', '.join(fields)})") from None


class DataConfig(Strict):
    """Where the data is, and how images are resized. Which fields apply depends on the task
    (``orchestrator.tasks``): detection reads COCO files, semantic segmentation an ADE20K-layout folder."""
    synthetic: SyntheticData | None = None
    # detection: COCO-format images and annotations
    train_images: Path | None = None
    train_json: Path | None = None
    val_images: Path | None = None
    val_json: Path | None = None
    train_short_edges: list[int] = list(SWIN_TRAIN_SHORT_EDGES)
    test_short_edge: int = SWIN_TEST_SHORT_EDGE
    max_size: int = SWIN_MAX_SIZE
    # semantic segmentation: an ADE20K-layout folder and the recipe's pipeline
    root: Path | None = Field(None, description="a folder with images/{training,validation} and "
                                                "annotations/{training,validation} (label PNGs)")
    classes: list[str] | Literal["ade20k"] | None = Field(None, description="the class names, in label order, or "
                                                                           "'ade20k' for its 150")
    reduce_zero_label: bool = Field(False, description="label 0 is 'other' (ignored) and 1..K are the classes, as in "
                                                       "ADE20K")
    scale: tuple[PositiveInt, PositiveInt] = Field(ADE20K_SCALE, description="(long, short) edges images are fitted "
                                                                            "into, for testing and (times the ratio) "
                                                                            "training")
    ratio_range: tuple[float, float] = Field((0.5, 2.0), description="training rescales the scale by a ratio in it")
    crop_size: tuple[PositiveInt, PositiveInt] = Field(ADE20K_CROP, description="training crops (height, width)")
    cat_max_ratio: float = Field(0.75, gt=0, le=1, description="a crop is drawn again (up to ten times) while one "
                                                              "class covers more of it than this")
    slide_stride: tuple[PositiveInt, PositiveInt] | None = Field(None, description="test with crop_size windows "
                                                                                  "every this many pixels (the recipe:"
                                                                                  " 341); default the whole image")
    flip: float = Field(0.5, ge=0, le=1)
    loader_workers: int | None = Field(None, ge=0, description="data-loading processes per worker; default: "
                                                          "the worker's CPUs less the one that trains")

    def given(self, *names: str) -> list[str]:
        """Those of ``names`` the experiment sets to other than their defaults (as a value, so that a
        config dumped and read again, as the workers do, says the same)."""
        return [name for name in names if getattr(self, name) != type(self).model_fields[name].default]

    def class_names(self) -> list[str] | None:
        from detectors.segmentation.classes import ADE20K_CLASSES
        return list(ADE20K_CLASSES) if self.classes == "ade20k" else self.classes


class BackboneConfig(Strict):
    name: str = "swin_t"
    weights: Path | None = None
    drop_path_rate: float = Field(0.2, ge=0, lt=1)
    # Spec overrides for small models (depths, embed_dim, num_heads, window_size).
    overrides: dict[str, Any] = {}
    upstream: UpstreamSpec | None = Field(None, description="pre-train the backbone on the synthetic upstream task "
                                                          "(or take it from the cache) and start from it; {} for "
                                                          "the defaults (detectors.upstream.UpstreamSpec)")

    @model_validator(mode="after")
    def _one_start(self) -> "BackboneConfig":
        if self.weights is not None and self.upstream is not None:
            raise ValueError("backbone: give either weights or upstream, not both")
        return self

    def weight_file(self) -> Path | None:
        """The file the frozen backbone starts from: ``weights``, or the upstream checkpoint's place in its cache."""
        return self.upstream.path if self.upstream is not None else self.weights


class TuningConfig(Strict):
    method: str = "e3va"
    hyperparameters: dict[str, Any] = {}

    @model_validator(mode="after")
    def _known(self) -> "TuningConfig":
        from detectors.tuning import resolve_method
        resolve_method(self.method, self.hyperparameters)  # raises UserInputError naming the problem
        return self


class ModelConfig(Strict):
    task: str | None = Field(None, description="detection or segmentation; default: the task of 'detector'")
    engine: str = Field("torchvision", description="detection: the library that builds the detector")
    detector: str = Field("mask_rcnn", description="the model: mask_rcnn, retinanet, ... or upernet")
    # Passed to the model's constructor, e.g. lighter RoI sampling for small images.
    options: dict[str, Any] = {}


class ScheduleConfig(Strict):
    """AdamW with linear warm-up, then step decays (detection) or poly decay (segmentation), as the papers train."""
    iterations: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: PositiveInt | list[PositiveInt] | dict[str, PositiveInt] | Literal["auto"] = Field(
        2, description="images per worker and step: one number for every worker, a list by rank, a mapping "
                       "from GPU kind to images, e.g. {v100: 4, p100: 2, 1080ti: 1}, or 'auto': the largest "
                       "batch the memory planner predicts fits each worker's GPU")
    lr: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_iterations: int = Field(0, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    policy: Literal["step", "poly"] = Field("step", description="step: lr times gamma at each decay_at; poly: lr "
                                                               "times (1 - iteration / iterations) ** power")
    decay_at: list[float] = Field([], description="iterations (or epochs, with 'epochs') where lr drops")
    gamma: float = Field(0.1, gt=0)
    power: float = Field(1.0, gt=0, description="poly: the exponent of the decay")
    clip_grad_norm: float | None = Field(None, gt=0)
    amp: bool = Field(True, description="mixed precision on GPU; ignored on CPU")

    @model_validator(mode="after")
    def _length(self) -> "ScheduleConfig":
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'iterations' and 'epochs'")
        if self.policy == "poly" and self.decay_at:
            raise ValueError("decay_at: poly decays every iteration; decay_at is for policy 'step'")
        return self


class PeriodConfig(Strict):
    period: int = Field(0, ge=0, description="every this many iterations; 0: only at the end")


class ScalingConfig(Strict):
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)
    gpu_kind: str | None = Field(None, description="run only on nodes labelled with this GPU kind (gpu_<kind>)")
    resources: dict[str, float] = Field({}, description="custom Ray resources each worker needs, e.g. {fast_disk: 1}")
    max_failures: int = Field(3, ge=0, description="worker-group restarts (from the newest checkpoint) before the run "
                                                   "fails; as many tries to start the group again when a node is "
                                                   "gone, unless check_cluster is false (then it waits for nodes)")
    check_cluster: bool = Field(True, description="refuse to start when the cluster can never hold the workers "
                                                  "(turn off on an autoscaling cluster that starts nodes on demand)")

    @field_validator("gpu_kind")
    @classmethod
    def _known_kind(cls, value: str | None) -> str | None:
        return None if value is None else check_kind(value, "scaling.gpu_kind")

    def worker_resources(self) -> dict[str, float]:
        """What Ray reserves for each worker. A GPU kind is a node label: a token amount of it."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {}),
                **({f"gpu_{self.gpu_kind}": 0.001} if self.gpu_kind else {}), **self.resources}


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default: sqlite under output_dir")
    experiment: str = "e3va-detection"
    run_name: str | None = Field(None, description="MLflow run name; default: what it is, e.g. "
                                                   "'e3va-r8 swin_t mask_rcnn'")


class StorageConfig(Strict):
    """Where Ray Train keeps the run's state and checkpoints (and a sweep its Tune state)."""
    path: str | None = Field(None, description="a local folder, a folder every node mounts, or a URI "
                                               "(s3://bucket/prefix, gs://...); default: <output_dir>/<name>/ray")
    shared: bool = Field(False, description="the local path is a mount every node shares (NFS, EFS)")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    region: str | None = Field(None, description="S3 region (default: $AWS_REGION)")

    @model_validator(mode="before")
    @classmethod
    def _plain_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, (str, Path)) else value

    def open(self, default: Path, *, probe: bool = False):
        from orchestrator.storage import open_storage
        return open_storage(self.path or str(default), shared=self.shared, endpoint_url=self.endpoint_url,
                            region=self.region, probe=probe)


class ExperimentConfig(Strict):
    name: str = "experiment"
    data: DataConfig
    backbone: BackboneConfig = BackboneConfig()
    tuning: TuningConfig = TuningConfig()
    model: ModelConfig = ModelConfig()
    schedule: ScheduleConfig
    evaluation: PeriodConfig = PeriodConfig()
    checkpoint: PeriodConfig = PeriodConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    output_dir: Path = Path("outputs")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return safe_name(value)

    @model_validator(mode="after")
    def _fits_its_task(self) -> "ExperimentConfig":
        from orchestrator.tasks import task_of
        task_of(self).check_config(self)  # ValueError naming the field
        return self

    @property
    def task(self):
        """What differs between detection and segmentation runs (``orchestrator.tasks.Task``)."""
        from orchestrator.tasks import task_of
        return task_of(self)

    @model_validator(mode="after")
    def _batch_sizes_fit_workers(self) -> "ExperimentConfig":
        sizes = self.schedule.batch_size
        if isinstance(sizes, list) and len(sizes) != self.scaling.workers:
            raise ValueError(f"schedule.batch_size: {len(sizes)} batch sizes for {self.scaling.workers} workers")
        if sizes == "auto" and not self.scaling.use_gpu:
            raise ValueError("schedule.batch_size: 'auto' sizes batches to each worker's GPU memory; "
                             "give a number when training on CPU (scaling.use_gpu is false)")
        if isinstance(sizes, dict):
            if not sizes:
                raise ValueError("schedule.batch_size: the mapping from GPU kind to batch size is empty")
            self.schedule.batch_size = {check_kind(kind, "schedule.batch_size"): n for kind, n in sizes.items()}
        return self

    def batch_sizes(self) -> list[int] | None:
        """Images per rank and step, when the file fixes them (not for a per-kind mapping)."""
        sizes = self.schedule.batch_size
        if isinstance(sizes, int):
            return [sizes] * self.scaling.workers
        return list(sizes) if isinstance(sizes, list) else None

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    def ray_storage(self, *, probe: bool = False):
        """Ray Train's ``storage_path``: the run's state lives in ``<it>/<name>``."""
        return self.storage.open(self.run_dir / "ray", probe=probe)

    def run_storage(self):
        """This run's own folder in its storage: checkpoints, and what a re-run continues from."""
        return self.ray_storage().child(self.name)


def safe_name(value: str) -> str:
    """A name that becomes a folder: non-empty, no slashes."""
    if not value or any(c in value for c in "/\\"):
        raise ValueError("must be a non-empty name without slashes")
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """``"schedule.lr=0.001"`` -> ``("schedule.lr", 0.001)``: what ``--set`` gives, the value read as YAML."""
    path, sep, text = item.partition("=")
    if not sep or not path.strip():
        raise UserInputError(f"--set {item!r}: expected key.path=value")
    try:
        return path.strip(), yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserInputError(f"--set {item!r}: cannot read the value {text!r}") from None


def set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """``raw["a"]["b"]["c"] = value`` for ``path`` ``a.b.c``, creating sections on the way."""
    node = raw
    keys = path.split(".")
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserInputError(f"{'.'.join(keys[:i + 1])} is not a section")
        node = child
    node[keys[-1]] = copy.deepcopy(value)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["schedule.lr=0.001", "tuning.hyperparameters.rank=16"]`` applied to a raw config dict."""
    for item in overrides:
        path, value = parse_override(item)
        try:
            set_path(raw, path, value)
        except UserInputError as exc:
            raise UserInputError(f"--set {item!r}: {exc}") from None
    return raw


def describe_error(error: dict) -> str:
    # Union members show up in the location ("batch_size.constrained-int"): they are not fields.
    parts = [str(part) for part in error["loc"]
             if not re.match(r"^(constrained-\w+|\w+\[.*\]|int|str|float|bool)$", str(part))]
    message = error["msg"].removeprefix("Value error, ")
    if not parts:  # a check across fields names its fields itself
        return message
    location = ".".join(parts)
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required field is missing"
    elif "input" in error and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    return f"{location}: {message}"


def validate_experiment(path: str | Path, raw: dict[str, Any]) -> ExperimentConfig:
    """``raw`` (read from ``path``, overrides applied) as an experiment, or one line naming the field."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserInputError(f"{path}: {describe_error(exc.errors()[0])}") from None
    except UserInputError as exc:
        raise UserInputError(f"{path}: {exc}") from None


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    return validate_experiment(path, apply_overrides(read_yaml_mapping(path, "experiment file"), overrides))


def check_inputs_exist(cfg: ExperimentConfig) -> None:
    """Missing datasets and weight files are found before any worker starts."""
    fields = {f"data.{name}": getattr(cfg.data, name) for name in cfg.task.input_fields}
    fields["backbone.weights"] = cfg.backbone.weights
    for name, value in fields.items():
        if value is not None and not Path(value).exists():
            raise UserInputError(f"{name}: {value} does not exist")
