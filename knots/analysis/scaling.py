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
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

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
) -> dict:
    """JSON-ready summary of ``scores[method][subset] = score`` (one score per merged subset).

    ``methods[m]``: one point per subset size with ``mean``, ``low``, ``high``, ``std``, ``count``
    (subsets merged) and ``possible`` (C(n_tasks, n)); ``subsets[m]``: every subset's score.
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
        subsets[method] = [{"tasks": list(s), "score": float(v)} for s, v in sorted(by_subset.items(), key=lambda kv: (len(kv[0]), kv[0]))]
    return {
        "confidence": confidence,
        "interval": "student-t over task subsets",
        "n_tasks": n_tasks,
        "methods": methods,
        "subsets": subsets,
    }
