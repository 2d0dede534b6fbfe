"""The paper's figures from plain data, with matplotlib: CKA heatmaps (Fig. 2), scaling curves (Fig. 3),
validation score against each searched hyperparameter, and per-task normalized accuracy as grouped bars.

Each ``*_figure`` function takes dicts and lists (what results.json and the analyses' JSON hold) and
returns a :class:`matplotlib.figure.Figure` (no pyplot state, safe in threads and without a display);
:func:`save_figure` writes it as PNG and PDF. Categorical colours are the Okabe-Ito palette, with
markers, line styles and hatches as a second cue; heatmaps use ``cividis``. Both are readable with
the common colour-vision deficiencies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not when analyses are registered
    from matplotlib.figure import Figure

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":"]
HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "++", "--"]
VIEW_TITLES = {"full": r"Full finetuning: $(W_i - W_0)\,x$", "lora": r"LoRA: $\Delta W_i\,x$", "knots": r"KnOTS: $V_i^\top x$"}
VIEW_ORDER = ("full", "lora", "knots")


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _style(index: int) -> dict[str, Any]:
    return {"color": OKABE_ITO[index % len(OKABE_ITO)], "marker": MARKERS[index % len(MARKERS)], "linestyle": LINESTYLES[index % len(LINESTYLES)]}


def _label(method: str) -> str:
    from knots.report.tables import display_name

    return display_name(method)


def data_axes(figure: Figure) -> list:
    """The figure's panels, colour bars excluded."""
    return [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]


def save_figure(figure: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` (each atomically); return the paths."""
    from knots.atomic import atomic_path

    stem = Path(stem)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path, durable=False) as temporary:
            figure.savefig(temporary, format=fmt, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths


def write_figures(figures: Mapping[str, Figure], directory: str | Path, logger: Any = None, prefix: str = "figures",
                  dpi: int = 150) -> list[Path]:
    """Save every figure as ``directory/<name>.png`` and ``.pdf``; log each PNG to ``logger`` as ``<prefix>/<name>``."""
    paths = []
    for name, figure in figures.items():
        written = save_figure(figure, Path(directory) / name, dpi=dpi)
        if logger is not None:
            logger.image(f"{prefix}/{name}", written[0])
        paths += written
    return paths


def results_figures(results: Mapping[str, Any], analyses: bool = True, per_task: bool = True) -> dict[str, Figure]:
    """The figures a results.json gives: ``search`` (validation score against each searched
    hyperparameter, from the methods' search histories), ``per_task`` (normalized accuracy per task and
    method, unless ``per_task`` is false) and, with ``analyses``, ``cka`` and ``scaling`` from its
    analyses block."""
    figures: dict[str, Figure] = {}
    methods = results.get("methods", {})
    histories = {name: [(p["params"], p["val_score"]) for p in m.get("search", [])] for name, m in methods.items()}
    histories = {name: h for name, h in histories.items() if searched_parameters(h)}
    if histories:
        metric = results.get("meta", {}).get("selection_metric", "score")
        figures["search"] = search_figure(histories, ylabel=f"validation {metric}".replace("_", " "))
    if methods and per_task:
        normalized = {name: {**{t: v["normalized_accuracy"] for t, v in m["per_task"].items()}, "avg": m["avg_normalized_accuracy"]}
                      for name, m in methods.items()}
        figures["per_task"] = per_task_figure(normalized, list(results.get("finetuned", {})) or None)
    found = results.get("analyses", {}) if analyses else {}
    if "cka" in found:
        figures["cka"] = cka_figure(found["cka"]["views"], found["cka"]["tasks"])
    if "scaling" in found:
        figures["scaling"] = scaling_figure(found["scaling"])
    return figures


def cka_figure(matrices: Mapping[str, Sequence[Sequence[float | None]]], tasks: Sequence[str], title: str | None = None) -> Figure:
    """One n x n CKA heatmap per view, side by side (full finetuning, LoRA, KnOTS), one colour scale [0, 1].

    Off-diagonal means are given in each panel's title; NaN or ``None`` entries are grey.
    """
    import matplotlib
    import numpy as np

    views = [v for v in VIEW_ORDER if v in matrices] + [v for v in matrices if v not in VIEW_ORDER]
    if not views:
        raise ValueError("no CKA matrices to plot")
    n = len(tasks)
    size = max(3.2, 0.45 * n + 1.2)
    figure = _figure(figsize=(size * len(views) + 1.0, size + 0.6), layout="constrained")
    axes = figure.subplots(1, len(views), squeeze=False)[0]
    image = None
    for ax, view in zip(axes, views):
        values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrices[view]], dtype=float)
        if values.shape != (n, n):
            raise ValueError(f"CKA matrix {view!r} has shape {values.shape}, expected ({n}, {n}) for {n} tasks")
        masked = np.ma.masked_invalid(values)
        cmap = matplotlib.colormaps["cividis"].with_extremes(bad="#bbbbbb")
        image = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap=cmap)
        off = values[~np.eye(n, dtype=bool)]
        off = off[~np.isnan(off)]
        mean = f"mean off-diagonal {off.mean():.2f}" if off.size else "no pairs"
        ax.set_title(f"{VIEW_TITLES.get(view, view)}\n{mean}", fontsize=10)
        ax.set_xticks(range(n), tasks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), tasks, fontsize=8)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    v = values[i, j]
                    text = "n/a" if np.isnan(v) else f"{v:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if np.isnan(v) or v > 0.6 else "white")
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="linear CKA")
    if title:
        figure.suptitle(title)
    return figure


def scaling_figure(summary: Mapping[str, Any], ylabel: str = "avg. normalized accuracy (%)", title: str | None = None) -> Figure:
    """Mean score against the number of merged tasks per method, with its confidence band.

    ``summary``: :func:`knots.analyses.scaling.summarize_scaling`'s output.
    """
    import numpy as np

    methods = summary.get("methods", {})
    if not methods:
        raise ValueError("no scaling results to plot")
    figure = _figure(figsize=(6.0, 4.0), layout="constrained")
    ax = figure.subplots()
    sizes = sorted({p["n"] for points in methods.values() for p in points})
    for index, (method, points) in enumerate(methods.items()):
        style = _style(index)
        x = np.array([p["n"] for p in points], dtype=float)
        mean = np.array([p["mean"] for p in points], dtype=float)
        low = np.array([np.nan if p["low"] is None else p["low"] for p in points], dtype=float)
        high = np.array([np.nan if p["high"] is None else p["high"] for p in points], dtype=float)
        ax.plot(x, mean, label=_label(method), markersize=5, **style)
        ax.fill_between(x, low, high, color=style["color"], alpha=0.2, linewidth=0)
    confidence = summary.get("confidence", 0.95)
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sizes)
    ax.grid(alpha=0.3)
    ax.legend(title=f"bands: {confidence:.0%} CI over subsets", fontsize=8, title_fontsize=8)
    if title:
        ax.set_title(title)
    return figure


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def searched_parameters(history: Sequence[tuple[Mapping[str, Any], float]]) -> list[str]:
    """The numeric hyperparameters that take more than one value in a search history, in first-seen order."""
    names = list(dict.fromkeys(k for params, _ in history for k in params))
    return [k for k in names if len({params.get(k) for params, _ in history if _numeric(params.get(k))}) > 1]


def search_figure(histories: Mapping[str, Sequence[tuple[Mapping[str, Any], float]]], ylabel: str = "validation score") -> Figure:
    """Validation score against each searched hyperparameter, one panel per (method, hyperparameter).

    ``histories[method]``: the search's evaluated points ``(params, score)`` in order. A panel shows the
    sweeps of its hyperparameter: points that share every other hyperparameter, joined (one line for a
    linear search's coordinate, one per combination of the others in a grid, labelled by them); its
    best point is starred. Methods without a searched hyperparameter are left out.
    """
    panels = [(method, name) for method, history in histories.items() for name in searched_parameters(history)]
    if not panels:
        raise ValueError("no searched hyperparameters to plot")
    rows = list(dict.fromkeys(method for method, _ in panels))
    columns = max(sum(1 for m, _ in panels if m == method) for method in rows)
    figure = _figure(figsize=(3.4 * columns, 2.6 * len(rows)), layout="constrained")
    grid = figure.subplots(len(rows), columns, squeeze=False)
    for r, method in enumerate(rows):
        history = histories[method]
        names = [name for m, name in panels if m == method]
        for c in range(columns):
            ax = grid[r][c]
            if c >= len(names):
                figure.delaxes(ax)
                continue
            name = names[c]
            sweeps = _sweeps(history, name)
            varying = [k for k in dict.fromkeys(k for others in sweeps for k, _ in others)
                       if len({dict(others).get(k) for others in sweeps}) > 1]
            for index, (others, points) in enumerate(sweeps.items()):
                label = ", ".join(f"{k}={_value(v)}" for k, v in others if k in varying) or None
                ax.plot([p[0] for p in points], [p[1] for p in points], markersize=4, label=label, **_style(index))
            best_value, best_score = max((p for points in sweeps.values() for p in points), key=lambda p: p[1])
            ax.plot([best_value], [best_score], marker="*", markersize=13, color="#000000", linestyle="none",
                    label=f"best {name}={best_value:g}")
            ax.set_xlabel(name)
            ax.set_title(_label(method), fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    figure.supylabel(ylabel, fontsize=10)  # one label for every panel (per panel they crowd the columns)
    return figure


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sweeps(history: Sequence[tuple[Mapping[str, Any], float]], name: str) -> dict[tuple, list[tuple[float, float]]]:
    """The points of ``history`` grouped by their other hyperparameters, each group sorted by ``name``:
    the sweeps of ``name`` (groups where it takes several values), or every point when it never does."""
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for params, score in history:
        if _numeric(params.get(name)):
            others = tuple(sorted((k, v) for k, v in params.items() if k != name))
            groups.setdefault(others, []).append((float(params[name]), float(score)))
    sweeps = {k: sorted(v) for k, v in groups.items() if len({p[0] for p in v}) > 1}
    return sweeps or {k: sorted(v) for k, v in groups.items()}


def per_task_figure(per_task: Mapping[str, Mapping[str, float | None]], tasks: Sequence[str] | None = None, average: bool = True,
                    ylabel: str = "normalized accuracy (%)", reference: float | None = 100.0,
                    errors: Mapping[str, Mapping[str, float | None]] | None = None) -> Figure:
    """Grouped bars: per task (and the average), one bar per method; a dashed line at ``reference``.

    The average is ``per_task[method]["avg"]`` when given, else the mean over the tasks. ``errors``
    (same keys) draws error bars, e.g. the standard deviation over seeds.
    """
    import numpy as np

    if not per_task:
        raise ValueError("no per-task results to plot")
    tasks = list(tasks or dict.fromkeys(t for values in per_task.values() for t in values if t != "avg"))
    groups = tasks + (["avg"] if average else [])
    methods = list(per_task)
    width = 0.8 / len(methods)
    figure = _figure(figsize=(max(6.0, 0.55 * len(groups) * max(2, len(methods)) / 2 + 2), 4.0), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(groups))
    for index, method in enumerate(methods):
        values = [per_task[method].get(t) for t in tasks]
        if average:
            present = [v for v in values if v is not None]
            mean = sum(present) / len(present) if present and len(present) == len(tasks) else None
            values.append(per_task[method].get("avg", mean))
        heights = [math.nan if v is None else v for v in values]
        spread = None
        if errors is not None and method in errors:
            spread = [math.nan if errors[method].get(g) is None else errors[method][g] for g in groups]
        ax.bar(x - 0.4 + width * (index + 0.5), heights, width, label=_label(method), color=OKABE_ITO[index % len(OKABE_ITO)],
               hatch=HATCHES[index % len(HATCHES)], edgecolor="white", linewidth=0.5, yerr=spread,
               error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"})
    if reference is not None:
        ax.axhline(reference, color="#555555", linestyle="--", linewidth=1, label="finetuned")
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncols=min(len(methods) + 1, 4), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # above: clear of the tick labels
    return figure
