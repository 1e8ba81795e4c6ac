"""The figures: the headline figure against training cost (E3VA's Figure 1), and over two swept
hyperparameters (LoRand's Figure 6)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from detectors.errors import UserInputError
from orchestrator.compare.rows import SEED_PARAM, Group, Row, _mean, _sort_key, headline_column
from orchestrator.tasks import Column


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ap_vs_memory(groups: list[Group], path: Path) -> str | None:
    """The headline figure (box AP, mask AP or mIoU) against peak training memory, one point per group (its
    means, a bar of ± std where it has several seeds), bubble area = trainable parameters. Returns a note, if any."""
    plt = _pyplot()
    rows = [r for g in groups for r in g.rows]
    x_of, xlabel, note = _cost_axis(rows)
    headline = headline_column(rows)
    shown = [g for g in groups if x_of(g) is not None and g.stats(headline) is not None]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    if shown:
        _draw_bubbles(plt, fig, ax, shown, x_of, headline)
    else:
        ax.text(0.5, 0.5, f"no run has both {headline.header} and the x figure", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(headline.header)
    title = f"{headline.header} vs training cost (bubble area = trainable backbone parameters"
    title += "; bars: ± std over seeds)" if any(g.n > 1 for g in shown) else ")"
    ax.set_title(title if note is None else f"{title}\n{note}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return note


def _cost_axis(rows: list[Row]) -> tuple[Callable[[Group], float | None], str, str | None]:
    """The x axis: a group's figure, its label, and a note where it cannot be memory."""
    if any(r.memory is not None for r in rows):
        keys = {r.memory_key for r in rows if r.memory_key}
        xlabel = "peak training memory (MB)" if keys == {"peak_memory_mb"} else "training memory (MB)"
        return (lambda g: g.memory), xlabel, None
    return ((lambda g: g.seconds), "seconds per iteration",
            "no run recorded peak memory (CPU runs): x axis is seconds per iteration")


def _draw_bubbles(plt, fig, ax, shown: list[Group], x_of: Callable[[Group], float | None], headline: Column) -> None:
    """One colour per method, one marker per setting."""
    biggest = max((g.trainable or 0) for g in shown) or 1
    methods = sorted({g.method for g in shown})
    colours = plt.get_cmap("tab10")
    marker_of = {setting: "osD^vP*X"[i % 8] for i, setting in enumerate(sorted({g.setting for g in shown}))}
    for i, method in enumerate(methods):
        for setting, marker in marker_of.items():
            mine = [g for g in shown if g.method == method and g.setting == setting]
            xs, ys = [x_of(g) for g in mine], [g.stats(headline) for g in mine]
            sizes = [60 + 1500 * (g.trainable or 0) / biggest for g in mine]
            ax.scatter(xs, [y.mean for y in ys], marker=marker, s=sizes, alpha=0.55, color=colours(i % 10),
                       edgecolors="black")
            if any(y.std for y in ys):
                ax.errorbar(xs, [y.mean for y in ys], yerr=[y.std or 0 for y in ys], fmt="none",
                            ecolor=colours(i % 10), capsize=3)
            for g, y in zip(mine, ys):  # with several settings the marker says which: the method name is enough
                ax.annotate(g.method if len(marker_of) > 1 else g.name, (x_of(g), y.mean), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
    _bubble_legend(fig, ax, methods, colours, marker_of)


def _bubble_legend(fig, ax, methods: list[str], colours, marker_of: dict[str, str]) -> None:
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", linestyle="", color=colours(i % 10), label=method)
               for i, method in enumerate(methods)]
    if len(marker_of) > 1:
        handles += [Line2D([], [], marker=marker, linestyle="", color="grey", label=setting)
                    for setting, marker in marker_of.items()]
    if len(marker_of) > 1:  # the settings' names are long: the legend goes beside the axes
        fig.set_size_inches(11, 5)
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(handles=handles, fontsize=7, loc="best")


def swept_keys(rows: list[Row], parent) -> list[str]:
    """Params that take more than one value among the rows, the sweep's space first."""
    def varies(key: str) -> bool:
        return len({r.params.get(key) for r in rows if key in r.params}) > 1

    space = json.loads(parent.data.tags.get("sweep.space", "[]")) if parent is not None else []
    keys = [k for k in space if k != SEED_PARAM and varies(k)]
    if not keys:  # runs from outside a sweep: dotted (sweep) params, then the methods' hyperparameters
        keys = sorted({k for r in rows for k in r.params if "." in k and k != "sweep.trial_id" and varies(k)})
    if len(keys) < 2:
        hyper = sorted({k for r in rows for k in r.hyperparameters() if varies(k)})
        keys += [k for k in hyper if not any(s.rsplit(".", 1)[-1] == k for s in keys)]
    return keys


def plot_heatmap(rows: list[Row], keys: tuple[str, str], path: Path) -> None:
    """The mean headline figure of the runs with each pair of values of ``keys`` (LoRand's Figure 6)."""
    plt = _pyplot()
    import numpy as np
    first, second = keys
    ys = sorted({r.params[first] for r in rows if first in r.params}, key=_sort_key)
    xs = sorted({r.params[second] for r in rows if second in r.params}, key=_sort_key)
    headline = headline_column(rows)
    grid = np.full((len(ys), len(xs)), np.nan)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            values = [r.figure(headline) for r in rows
                      if r.params.get(first) == y and r.params.get(second) == x]
            mean = _mean(values)
            if mean is not None:
                grid[i, j] = mean
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 1.0 * len(ys) + 2.5), dpi=100)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    low, high = (np.nanmin(grid), np.nanmax(grid)) if not np.isnan(grid).all() else (0.0, 0.0)
    for i in range(len(ys)):
        for j in range(len(xs)):
            value = grid[i, j]
            light = math.isnan(value) or (high > low and (value - low) / (high - low) > 0.6)
            ax.text(j, i, "-" if math.isnan(value) else f"{value:.1f}", ha="center", va="center",
                    color="black" if light else "white", fontsize=9)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(second)
    ax.set_ylabel(first)
    ax.set_title(f"{headline.header} over {first.rsplit('.', 1)[-1]} x {second.rsplit('.', 1)[-1]}", fontsize=10)
    fig.colorbar(image, ax=ax, label=headline.header)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pick_heatmap_keys(rows: list[Row], parent, requested: str | None) -> tuple[str, str]:
    available = swept_keys(rows, parent)
    if requested is not None:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        if len(names) != 2:
            raise UserInputError(f"--heatmap {requested!r}: give two params, e.g. branches,kernel")
        keys = []
        for name in names:
            match = [k for k in available if k == name or k.rsplit(".", 1)[-1] == name]
            if not match:
                raise UserInputError(f"--heatmap: {name!r} does not vary among these runs "
                                     f"(varied: {', '.join(available) or 'none'})")
            keys.append(match[0])
        return keys[0], keys[1]
    if len(available) < 2:
        raise UserInputError(f"a heat map needs two swept hyperparameters; these runs vary "
                             f"{len(available)}: {', '.join(available) or 'none'}")
    return available[0], available[1]
