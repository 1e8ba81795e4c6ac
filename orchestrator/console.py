"""What a run shows a person: its progress, what they must act on and its results on the terminal;
what Ray, its workers, pycocotools and MLflow print, in a log file in the run's directory.

``internals_to(log)`` points file descriptors 1 and 2 (everything those libraries write, Ray's
streamed worker logs and C++ messages included) at the log, and ``CONSOLE`` at the terminal they
were. The training loop never prints for the user: a Ray Train callback on the driver's node puts
each report's figures into a Ray queue there (rank 0 adds its evaluation progress), and
``TrainingProgress`` (a thread of the driver) turns them into live bars on a terminal, or a line
every tenth of the run without one.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

VERBOSE_ENV = "E3VA_VERBOSE"  # 1: Ray's, pycocotools' and MLflow's output on the terminal too


class Console:
    """The user's terminal, wherever fd 1 points while a run is on; each warning said once."""

    def __init__(self):
        self.stream = None  # None: sys.stdout as it is now
        self.log_path: Path | None = None  # the log of the run under way (or the last one)
        self._warned: set[str] = set()

    @property
    def out(self):
        return self.stream or sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            self.say(f"warning: {text}")

    def isatty(self) -> bool:
        return hasattr(self.out, "isatty") and self.out.isatty()

    def columns(self) -> int:
        """The terminal's width (a terminal that says 0, as a bare pseudo-terminal does: 100)."""
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 100
        except (AttributeError, OSError, ValueError):
            return 100

    def rows(self) -> int:
        """The terminal's height (0 from a bare pseudo-terminal, where tqdm would then hide its bar: 24)."""
        try:
            return os.get_terminal_size(self.out.fileno()).lines or 24
        except (AttributeError, OSError, ValueError):
            return 24


CONSOLE = Console()


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def internals_to(log_path: Path, verbose: bool = False, announce: bool = True) -> Iterator[Path]:
    """Send what fds 1 and 2 receive to ``log_path`` (appended) while the block runs; ``CONSOLE`` keeps the
    terminal. With ``verbose`` nothing moves: the log path is still said (unless not ``announce``: output
    a program reads), and the terminal shows all."""
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if announce:
        CONSOLE.say(f"log: {log_path}")
    CONSOLE.log_path = log_path
    if verbose:
        yield log_path
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    previous = CONSOLE.stream
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        CONSOLE.stream = terminal
        try:
            yield log_path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            CONSOLE.stream = previous
            terminal.close()


def log_tail(log_path: Path, lines: int = 12) -> str:
    """The last lines of a run's log, for a run that failed."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- training progress

def progress_channel():
    """A Ray queue on this (the driver's) node: the training callback puts every report's figures into
    it, rank 0 its evaluation progress, and ``TrainingProgress`` takes them out."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def progress_callback(channel):
    """A Ray Train callback (it runs on the driver's node) putting each step's figures into ``channel``
    (a report carries the steps since the previous one under ``steps``)."""
    from ray.train import UserCallback

    class Progress(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            report = metrics[0]
            for figures in [*report.get("steps", []), report]:
                channel.put_nowait({"step": figures.get("step"), "iterations": figures.get("iterations"),
                                    "loss": figures.get("train/loss"), "seconds": figures.get("seconds_per_iteration"),
                                    "evaluated": any(k.startswith("val/") for k in figures)})
    return Progress()


def evaluation_progress(channel, total: int):
    """What rank 0 calls after each evaluation batch: ``(images done)`` into ``channel``."""
    def done(images: int) -> None:
        channel.put_nowait({"evaluating": images, "of": total})
    return done


class TrainingProgress:
    """Shows the channel's reports while the run trains: tqdm bars (training, evaluation) on a terminal,
    else a line per tenth of the run."""

    def __init__(self, channel, total: int | None):
        self.channel, self.total = channel, total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._bars: dict[str, Any] = {}
        self._last_line_step = 0
        self._first = True

    def __enter__(self) -> "TrainingProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for bar in self._bars.values():
            bar.close()

    def _follow(self) -> None:
        from ray.util.queue import Empty
        while True:
            stopping = self._stop.is_set()
            try:
                items = self.channel.get_nowait_batch(len(self.channel)) if stopping else [
                    self.channel.get(timeout=0.5)]
            except Empty:
                items = []
            except Exception:  # noqa: BLE001 - the run is over and Ray with it: nothing more to show
                return
            for item in items:
                self._show(item)
            if stopping:
                return

    def _bar(self, name: str, total: int, initial: int = 0):
        from tqdm import tqdm
        bar = self._bars.get(name)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = self._bars[name] = tqdm(total=total, initial=initial, file=CONSOLE.out, ncols=CONSOLE.columns(),
                                          unit="it" if name == "train" else "img", desc=name, leave=name == "train")
        return bar

    def _show(self, report: dict[str, Any]) -> None:
        if "evaluating" in report:  # rank 0's share of the validation split
            if CONSOLE.isatty():
                bar = self._bar("eval", report["of"])
                bar.update(report["evaluating"] - bar.n)
                if bar.n >= bar.total:
                    bar.close()
                    del self._bars["eval"]
            return
        step, total = report.get("step") or 0, report.get("iterations") or self.total or 0
        if self._first:
            self._first = False
            if step > 1:
                CONSOLE.say(f"resuming from step {step - 1}")
        loss, seconds = report.get("loss") or 0.0, report.get("seconds") or 0.0
        if CONSOLE.isatty():
            bar = self._bar("train", total, step - 1)
            bar.set_postfix_str(f"loss {loss:.4f}, {seconds:.2f} s/it", refresh=False)
            bar.update(step - bar.n)
            return
        every = max(1, total // 10)
        if step - self._last_line_step >= every or step == total or step == 1:
            self._last_line_step = step
            CONSOLE.say(f"step {step}/{total}  loss {loss:.4f}  {seconds:.2f} s/iter  eta {seconds * (total - step):.0f} s"
                        + ("  (evaluated)" if report.get("evaluated") else ""))


__all__ = ["CONSOLE", "internals_to", "log_tail", "progress_channel", "progress_callback", "evaluation_progress",
           "TrainingProgress", "verbose_requested"]
