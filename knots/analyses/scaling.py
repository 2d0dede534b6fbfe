"""Scaling with the number of merged tasks (paper Sec. 5.4, Fig. 3): task subsets and confidence intervals.

For every subset size n from 2 to N, up to M subsets of the N tasks are merged (M = 28 in the paper;
all C(N, n) subsets when there are no more than M). Each merge is scored by its mean normalized
accuracy over the tasks in its subset only, and every method gets the mean over subsets with a 95%
confidence interval per n.

**Subsets.** The sample for one n depends only on (seed, N, n): M distinct ranks are drawn from
``range(C(N, n))`` by a ``random.Random`` seeded with a string (deterministic across Python processes
and platforms) and unranked in lexicographic order, so no list of all subsets is ever formed.

**Interval.** Student's t-interval over the subsets of one size: ``mean +- t_{(1+c)/2, k-1} s / sqrt(k)``
for k subsets with sample standard deviation s. The scores are means of bounded accuracies, near
symmetric, and k is small (28), where the t quantile matters and a bootstrap (seaborn's default) would
make the bands depend on a random seed. The subsets share tasks, so they are not independent draws:
read the interval as the spread of the mean over task combinations, as the paper's does. With a single
subset (n = N) there is no interval (``None``).

**The analysis** ``scaling`` (``knots-run 'analyses=[scaling]'``, options in ``conf/analysis/scaling.yaml``)
runs, for every subset and method, the run's own validation search and test
(:func:`knots.pipeline.stages.search_method`, :func:`~knots.pipeline.stages.test_method`) on merge
inputs and an evaluator cut down to the subset's tasks: the cached adapters, the already collated
inputs and the finetuned models' cached features. Nothing is retrained or re-encoded but the merges.
The merge of all N tasks is the run's own when the search is the run's.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from knots.analyses import AnalysisContext, register_analysis
from knots.errors import ConfigError

PAPER_SUBSETS_PER_SIZE = 28


def unrank_combination(rank: int, n: int, k: int) -> tuple[int, ...]:
    """The ``rank``-th k-subset of ``range(n)`` in lexicographic order (0-based)."""
    if not 0 <= rank < math.comb(n, k):
        raise ValueError(f"rank {rank} out of range for C({n}, {k})")
    out, start = [], 0
    for slot in range(k):
        for item in range(start, n):
            below = math.comb(n - item - 1, k - slot - 1)
            if rank < below:
                out.append(item)
                start = item + 1
                break
            rank -= below
    return tuple(out)


def subsets_of_size(tasks: Sequence[str], size: int, max_subsets: int = PAPER_SUBSETS_PER_SIZE, seed: int = 0) -> list[tuple[str, ...]]:
    """Up to ``max_subsets`` distinct size-``size`` subsets of ``tasks`` (all when fewer), in lexicographic order."""
    n = len(tasks)
    if not 1 <= size <= n:
        raise ValueError(f"subset size {size} out of range for {n} tasks")
    if max_subsets < 1:
        raise ValueError(f"max_subsets must be at least 1, got {max_subsets}")
    total = math.comb(n, size)
    if total <= max_subsets:
        ranks: Iterable[int] = range(total)
    else:
        ranks = sorted(random.Random(f"knots-scaling:{seed}:{n}:{size}").sample(range(total), max_subsets))
    return [tuple(tasks[i] for i in unrank_combination(r, n, size)) for r in ranks]


def enumerate_subsets(
    tasks: Sequence[str],
    max_subsets: int = PAPER_SUBSETS_PER_SIZE,
    seed: int = 0,
    sizes: Iterable[int] | None = None,
) -> dict[int, list[tuple[str, ...]]]:
    """Subsets per size, for every size from 2 to ``len(tasks)`` (or the ``sizes`` given)."""
    if len(set(tasks)) != len(tasks):
        raise ValueError("task names must be distinct")
    if len(tasks) < 2:
        raise ValueError(f"scaling needs at least 2 tasks, got {len(tasks)}")
    chosen = range(2, len(tasks) + 1) if sizes is None else sorted(set(sizes))
    return {size: subsets_of_size(tasks, size, max_subsets, seed) for size in chosen}


def subset_score(per_task: Mapping[str, float], subset: Sequence[str]) -> float:
    """The mean of ``per_task`` (e.g. normalized accuracy) over the tasks of ``subset``."""
    return sum(per_task[t] for t in subset) / len(subset)


@dataclass(frozen=True)
class Interval:
    """Mean with a two-sided confidence interval (``None`` bounds when there is a single value)."""

    mean: float
    low: float | None
    high: float | None
    std: float | None
    count: int


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student's t-interval for the mean of ``values``."""
    from scipy.stats import t

    if not values:
        raise ValueError("no values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k = len(values)
    mean = sum(values) / k
    if k == 1:
        return Interval(mean, None, None, None, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = float(t.ppf((1 + confidence) / 2, k - 1)) * std / math.sqrt(k)
    return Interval(mean, mean - half, mean + half, std, k)


def summarize_scaling(
    scores: Mapping[str, Mapping[tuple[str, ...], float]],
    n_tasks: int,
    confidence: float = 0.95,
    details: Mapping[str, Mapping[tuple[str, ...], Mapping[str, Any]]] | None = None,
) -> dict:
    """JSON-ready summary of ``scores[method][subset] = score`` (one score per merged subset).

    ``methods[m]``: one point per subset size with ``mean``, ``low``, ``high``, ``std``, ``count``
    (subsets merged) and ``possible`` (C(n_tasks, n)); ``subsets[m]``: every subset's score, with
    ``details[m][subset]`` (e.g. the selected hyperparameters) when given.
    """
    methods, subsets = {}, {}
    for method, by_subset in scores.items():
        sizes: dict[int, list[float]] = {}
        for subset, score in by_subset.items():
            sizes.setdefault(len(subset), []).append(float(score))
        methods[method] = [
            {"n": n, **asdict(t_interval(values, confidence)), "possible": math.comb(n_tasks, n)}
            for n, values in sorted(sizes.items())
        ]
        extra = (details or {}).get(method, {})
        subsets[method] = [{"tasks": list(s), "score": float(v), **extra.get(s, {})}
                           for s, v in sorted(by_subset.items(), key=lambda kv: (len(kv[0]), kv[0]))]
    return {
        "confidence": confidence,
        "interval": "student-t over task subsets",
        "n_tasks": n_tasks,
        "methods": methods,
        "subsets": subsets,
    }


# -- the registered analysis ----------------------------------------------------------------------
def subset_evaluator(evaluator: Any, names: Sequence[str]) -> Any:
    """The run's evaluator restricted to tasks ``names``: their inputs (batches already collated),
    their heads (no joint head: the joint task is not scored on subsets), the finetuned models'
    features of those inputs, cut from the cached ones (nothing is recomputed), and the run's normalizers."""
    from knots.heads import HeadSet
    from knots.pipeline.evaluate import Evaluator, FinetunedOutputs

    run_tasks = list(evaluator.finetuned.accuracies)  # the run's task order, that of the finetuned features
    order = [n for n in run_tasks if n in names]
    models = [i for i, n in enumerate(run_tasks) if n in names]
    data, features = {}, {}
    for split, full in evaluator.data.items():
        data[split] = full.subset(order)
        rows = torch.cat([torch.arange(full.slices[n].start, full.slices[n].stop) for n in order])
        features[split] = [evaluator.finetuned.features[split][i][rows] for i in models]
    heads = HeadSet(evaluator.heads.kind, {n: evaluator.heads.per_task[n] for n in order}, evaluator.heads.normalize)
    finetuned = FinetunedOutputs(features, {n: evaluator.finetuned.accuracies[n] for n in order}, evaluator.finetuned.fixed)
    return Evaluator(evaluator.backbone, heads, data, finetuned, progress=False)


def subset_inputs(inputs: Any, names: Sequence[str], heads: Any) -> Any:
    """The run's merge inputs restricted to tasks ``names`` (the cached adapters; a new merge session,
    whose KnOTS alignment covers these tasks only)."""
    from knots.methods import MergeInputs

    chosen = [i for i, a in enumerate(inputs.adapters) if a.task in names]
    return MergeInputs([inputs.adapters[i] for i in chosen], inputs.backbone, [inputs.tasks[i] for i in chosen],
                       inputs.batch_size, progress=False, heads=heads)


def scaling_search(run_search: Any, overrides: Mapping[str, Any] | None) -> Any:
    """The search of every subset: the run's (strategy, patience, ranges) with ``overrides`` on top,
    always selecting by average normalized accuracy over the subset's tasks."""
    overrides = dict(overrides or {})
    ranges = {**run_search.ranges, **overrides.pop("ranges", {})}
    search = dataclasses.replace(run_search, **overrides, ranges=ranges, metric="avg_normalized_accuracy")
    search.validate()
    return search


def check(options: Mapping[str, Any], cfg: Any = None) -> None:
    """The scaling analysis's options, checked before any work; with the run config ``cfg``, also the
    sizes' upper bound and the methods' heads (the sizes' bound is checked again at run time)."""
    from knots.config.schema import SEARCH_STRATEGIES, ZERO_SHOT_ONLY_METHODS
    from knots.methods import method_names

    known = method_names()
    methods = list(options.get("methods", ()))
    if not methods:
        raise ConfigError("scaling methods: none given")
    for name in methods:
        if name not in known:
            raise ConfigError(f"scaling: unknown method {name!r}; known: {', '.join(known)}")
    if options.get("max_subsets", PAPER_SUBSETS_PER_SIZE) < 1:
        raise ConfigError(f"scaling max_subsets must be >= 1, got {options['max_subsets']}")
    if any(n < 2 for n in options.get("sizes") or ()):
        raise ConfigError(f"scaling sizes must be >= 2, got {list(options['sizes'])}")
    if not 0 < options.get("confidence", 0.95) < 1:
        raise ConfigError(f"scaling confidence must be in (0, 1), got {options['confidence']}")
    search = dict(options.get("search") or {})
    unknown = sorted(set(search) - {"strategy", "patience", "ranges"})
    if unknown:
        raise ConfigError(f"scaling search: unknown setting {unknown[0]!r}; expected strategy, patience or ranges")
    if "strategy" in search and search["strategy"] not in SEARCH_STRATEGIES:
        raise ConfigError(f"scaling search.strategy: unknown {search['strategy']!r}; expected one of {SEARCH_STRATEGIES}")
    if cfg is None:
        return
    n_tasks = len(cfg.benchmark.task_names)
    if any(n > n_tasks for n in options.get("sizes") or ()):
        raise ConfigError(f"scaling sizes must lie in 2..{n_tasks} (the run's tasks), got {list(options['sizes'])}")
    if cfg.model.head.kind == "trained":
        for name in methods:
            if name in ZERO_SHOT_ONLY_METHODS:
                raise ConfigError(f"scaling: method {name} needs zero-shot heads (this run trains a head per task): "
                                  f"drop it from analysis_params.scaling.methods")


@register_analysis("scaling", reference="Stoica, Ramesh et al., ICLR 2025, Sec. 5.4, Fig. 3", check=check)
def scaling_analysis(context: AnalysisContext, methods: Sequence[str] = ("ta", "ties", "knots_ties"),
                     max_subsets: int = PAPER_SUBSETS_PER_SIZE, sizes: Sequence[int] | None = None, seed: int = 0,
                     search: Mapping[str, Any] | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """Merge task subsets of every size with each method (validation search per subset) and score each
    on its own tasks: mean normalized accuracy and confidence interval per number of merged tasks."""
    from tqdm.auto import tqdm

    from knots.analyses.figures import scaling_figure, write_figures
    from knots.pipeline.logger import NullLogger
    from knots.pipeline.stages import search_method, test_method

    cfg = context.cfg
    check({"methods": methods, "max_subsets": max_subsets, "sizes": sizes, "confidence": confidence, "search": search}, cfg)
    tasks = [t.name for t in context.tasks.tasks]
    if sizes is not None and any(not 2 <= n <= len(tasks) for n in sizes):
        raise ConfigError(f"scaling sizes must lie in 2..{len(tasks)}, got {list(sizes)}")
    subset_search = scaling_search(cfg.search, search)
    reuse = not search and cfg.search.metric == "avg_normalized_accuracy"
    plan = enumerate_subsets(tasks, max_subsets, seed, sizes)
    jobs = [(subset, name) for subsets in plan.values() for subset in subsets for name in methods]
    scores: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in methods}
    details: dict[str, dict[tuple[str, ...], dict[str, Any]]] = {name: {} for name in methods}
    seconds: dict[str, float] = {name: 0.0 for name in methods}
    cpu_seconds: dict[str, float] = {name: 0.0 for name in methods}
    merges = 0
    quiet = NullLogger()
    bar = tqdm(total=len(jobs), desc="scaling", disable=not cfg.progress)
    start, cpu = time.perf_counter(), time.process_time()
    for subset in (s for subsets in plan.values() for s in subsets):
        evaluator = inputs = None
        for name in methods:
            t, c = time.perf_counter(), time.process_time()
            if reuse and len(subset) == len(tasks) and name in context.methods:  # the run's own merge of every task
                result = context.methods[name]
                details[name][subset] = {"hyperparameters": result["hyperparameters"], "val_score": result["val_score"], "from_run": True}
            else:
                if evaluator is None:
                    evaluator = subset_evaluator(context.evaluator, subset)
                    inputs = subset_inputs(context.inputs, subset, evaluator.heads)
                selection = search_method(name, inputs, evaluator, subset_search, cfg.method_params.get(name, {}), quiet,
                                          extra_dirs=cfg.config_dirs)
                result = test_method(selection, inputs, evaluator)
                merges += len(selection.history) + 1
                details[name][subset] = {"hyperparameters": result["hyperparameters"], "val_score": result["val_score"]}
            scores[name][subset] = result["avg_normalized_accuracy"]
            seconds[name] += time.perf_counter() - t
            cpu_seconds[name] += time.process_time() - c
            bar.update(1)
    bar.close()
    out = summarize_scaling(scores, len(tasks), confidence, details)
    out.update({"tasks": tasks, "max_subsets": max_subsets, "seed": seed,
                "search": {"strategy": subset_search.strategy, "patience": subset_search.patience,
                           "metric": subset_search.metric},
                "merges_evaluated": merges,
                "seconds": {"total": time.perf_counter() - start, "total_cpu": time.process_time() - cpu,
                            **{f"method/{k}": v for k, v in seconds.items()}, **{f"method/{k}/cpu": v for k, v in cpu_seconds.items()}}})
    figure = scaling_figure(out)
    out["files"] = [str(p) for p in write_figures({"scaling": figure}, context.directory("scaling"), context.logger, "analysis/scaling")]
    rows = [[name, p["n"], p["mean"], p["low"], p["high"], p["count"], p["possible"]] for name, points in out["methods"].items() for p in points]
    context.logger.table("analysis/scaling/summary", ["method", "n", "mean", "low", "high", "subsets", "possible"], rows)
    return out
