"""Hyperparameter search on validation data: the paper's coordinate-wise linear search, or a grid.

``evaluate(params) -> score`` is maximized; repeated points are evaluated once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Params = dict[str, Any]


@dataclass
class SearchResult:
    """The selected point, its score, and every evaluated point in order."""

    params: Params
    score: float
    history: list[tuple[Params, float]] = field(default_factory=list)


class _Memo:
    def __init__(self, evaluate: Callable[[Params], float]) -> None:
        self.evaluate = evaluate
        self.seen: dict[tuple, float] = {}
        self.history: list[tuple[Params, float]] = []

    def __call__(self, params: Params) -> float:
        key = tuple(sorted(params.items()))
        if key not in self.seen:
            self.seen[key] = self.evaluate(params)
            self.history.append((dict(params), self.seen[key]))
        return self.seen[key]


def linear_search(
    evaluate: Callable[[Params], float],
    base: Params,
    coordinates: Sequence[tuple[str, Sequence[Any]]],
    patience: int | None = None,
) -> SearchResult:
    """Tune one coordinate at a time, in order, the others fixed at their best (or base) values.

    Values are scanned in list order; ``patience`` stops a coordinate after that many consecutive
    points without improvement (1 reproduces the reference's stop at the first drop).
    """
    memo = _Memo(evaluate)
    current = dict(base)
    best_score = float("-inf")
    for name, values in coordinates:
        coord_best, choice, misses = float("-inf"), current.get(name), 0
        for value in values:
            score = memo({**current, name: value})
            if score > coord_best:
                coord_best, choice, misses = score, value, 0
            else:
                misses += 1
                if patience is not None and misses >= patience:
                    break
        current[name] = choice
        best_score = coord_best
    if not coordinates:
        best_score = memo(current)
    return SearchResult(current, best_score, memo.history)


def grid_search(evaluate: Callable[[Params], float], base: Params, coordinates: Sequence[tuple[str, Sequence[Any]]]) -> SearchResult:
    """Evaluate every combination of the coordinates' values; keep the best (first on ties)."""
    memo = _Memo(evaluate)
    names = [n for n, _ in coordinates]
    best: SearchResult | None = None
    for combo in itertools.product(*(v for _, v in coordinates)):
        params = {**base, **dict(zip(names, combo))}
        score = memo(params)
        if best is None or score > best.score:
            best = SearchResult(params, score)
    assert best is not None
    return SearchResult(best.params, best.score, memo.history)


def select(
    evaluate: Callable[[Params], float],
    start: Params,
    coordinates: Sequence[tuple[str, Sequence[Any]]],
    repeated: Sequence[tuple[str, Sequence[Any]]] = (),
    strategy: str = "linear",
    patience: int | None = None,
) -> SearchResult:
    """Select hyperparameters: search ``coordinates`` with ``strategy`` (``linear``, ``grid`` or
    ``none``), then try every value of each ``repeated`` hyperparameter at the selected point and keep
    the best (e.g. DARE's seed: the paper reports the best of three seeds).

    ``start`` holds every hyperparameter; a repeated one starts at its first value.
    """
    base = {**start, **{name: list(values)[0] for name, values in repeated}}
    if strategy == "grid" and coordinates:
        result = grid_search(evaluate, base, coordinates)
    elif strategy == "linear":
        result = linear_search(evaluate, base, coordinates, patience)
    else:
        result = linear_search(evaluate, base, [])
    for name, values in repeated:
        if len(values) > 1:
            again = linear_search(evaluate, result.params, [(name, list(values))])
            result = SearchResult(again.params, again.score, result.history + again.history)
    return result
