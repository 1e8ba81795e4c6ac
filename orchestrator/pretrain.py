"""``python -m orchestrator pretrain``: the synthetic upstream pre-training, and where runs find it.

A run whose experiment says ``backbone.upstream`` starts from that checkpoint: the driver pre-trains it
(or finds it in the cache) before anything else, and hands its bytes to the workers through Ray's
object store, so a worker on a node without the cache (each node has its own disk) puts the same file
into its own cache instead of training again.
"""
from __future__ import annotations

import time
from pathlib import Path

from detectors.errors import UserInputError
from detectors.upstream import UpstreamSpec, cached, check_cache_writable, check_fits, ensure_pretrained, install, \
    read_metrics
from orchestrator.console import CONSOLE


class _Progress:
    """A tqdm bar on a terminal; without one, a line every tenth of the steps."""

    def __init__(self, spec: UpstreamSpec):
        self.spec, self.bar, self.started = spec, None, time.perf_counter()
        if CONSOLE.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=spec.steps, file=CONSOLE.out, ncols=CONSOLE.columns(), nrows=CONSOLE.rows(),
                            desc="pre-training", unit="step")

    def __call__(self, step: int, total: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
        elif step == 1 or step == total or step % max(1, total // 10) == 0:
            elapsed = time.perf_counter() - self.started
            CONSOLE.say(f"pre-training step {step}/{total}  loss {loss:.4f}  "
                        f"eta {elapsed / step * (total - step):.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pretrained_checkpoint(spec: UpstreamSpec, where: str = "upstream") -> Path:
    """``spec``'s checkpoint, trained now (with progress on the terminal) unless the cache has it intact."""
    found = cached(spec)
    if found is not None:
        return found
    check_cache_writable(spec, f"{where}.cache_dir")
    CONSOLE.say(f"pre-training {spec.backbone} on the synthetic upstream task: {spec.steps} steps of "
                f"{spec.batch_size} images at {spec.image_size} px, seed {spec.seed} (cached in {spec.cache_dir})")
    progress = _Progress(spec)
    try:
        path = ensure_pretrained(spec, progress)
    finally:
        progress.close()
    CONSOLE.say(f"pre-trained in {read_metrics(spec).get('seconds', 0):.0f} s: {describe(spec)} -> {path}")
    return path


def describe(spec: UpstreamSpec) -> str:
    """The upstream validation figures, in a few words."""
    m = read_metrics(spec)
    if not m:
        return "no upstream figures recorded"
    return (f"upstream validation: objectness {m['objectness']:.1f}%, shape {m['shape_accuracy']:.1f}% "
            f"(chance {m['shape_chance']:.1f}%), colour {m['colour_accuracy']:.1f}% "
            f"(chance {m['colour_chance']:.1f}%)")


def resolve_upstream(cfg) -> Path | None:
    """For an experiment that starts from the upstream pre-training: check it fits, train or find it."""
    spec = cfg.backbone.upstream
    if spec is None:
        return None
    check_fits(spec, cfg.backbone.name, cfg.backbone.overrides)
    return pretrained_checkpoint(spec, "backbone.upstream")


def checkpoint_for_workers(cfg):
    """The upstream checkpoint's bytes in Ray's object store (a reference), for workers on other nodes."""
    if cfg.backbone.upstream is None:
        return None
    import ray
    return ray.put(cfg.backbone.upstream.path.read_bytes())


def install_on_this_node(spec: UpstreamSpec, reference) -> None:
    """In a worker: put the driver's checkpoint into this node's cache unless an intact copy is there."""
    if reference is None or cached(spec) is not None:
        return
    import ray
    try:
        install(spec, ray.get(reference), read_metrics(spec))
    except OSError as exc:
        raise UserInputError(f"backbone.upstream.cache_dir: cannot write {spec.path} on this node "
                             f"({exc.strerror or exc})") from None


def run_pretrain(spec: UpstreamSpec) -> Path:
    fresh = cached(spec) is None
    path = pretrained_checkpoint(spec)
    if not fresh:
        CONSOLE.say(f"found in the cache ({describe(spec)}): {path}")
    return path
