"""The one splitting implementation, for every kind of task (text rows, image datasets, anything).

Everything works on positions and labels only, so lazy pools (images decoded on demand) are split
without being read. Each function is seeded and deterministic: the same labels and seed give the same
positions, whatever else happens in the process.

- :func:`stratified_parts`: split into fractions, keeping class proportions (seeded shuffles);
- :func:`capped`: at most ``cap`` positions, stratified or balanced over classes;
- :func:`carved_parts`: a fraction carved out of one split: stratified, or exactly the rows
  ``datasets.Dataset.train_test_split`` puts in its ``test`` part (shuffled or not);
- :func:`assign_roles`: train / validation / test from one pool or from a source's own splits, with a
  missing role carved out of another, then capped (``SplitConfig``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from knots.data.tasks import SPLITS, LabelledPool
from knots.errors import ConfigError


def _groups(positions: Sequence[int], labels: Sequence[int], rng: random.Random) -> dict[int, list[int]]:
    """Positions grouped by label (groups in order of first appearance), each group shuffled in label order."""
    groups: dict[int, list[int]] = {}
    for p in positions:
        groups.setdefault(int(labels[p]), []).append(p)
    for y in sorted(groups):
        rng.shuffle(groups[y])
    return groups


def stratified_parts(labels: Sequence[int], fractions: Sequence[float], seed: int,
                     positions: Sequence[int] | None = None) -> list[list[int]]:
    """Split ``positions`` (default: all) into parts with the given fractions, per class (seeded)."""
    positions = range(len(labels)) if positions is None else positions
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    total = sum(fractions)
    for _, group in sorted(_groups(positions, labels, rng).items()):
        start, acc = 0, 0.0
        for i, f in enumerate(fractions):
            acc += f / total
            end = len(group) if i == len(fractions) - 1 else int(round(acc * len(group)))
            parts[i].extend(group[start:end])
            start = end
    for part in parts:
        rng.shuffle(part)
    return parts


def carved_parts(labels: Sequence[int], fraction: float, seed: int, method: str = "stratified") -> tuple[list[int], list[int]]:
    """Positions ``(carved, rest)`` of a split of ``len(labels)`` rows, ``fraction`` of them carved.

    ``stratified``: per class, seeded (:func:`stratified_parts`). ``random`` and ``tail`` carve
    ``ceil(fraction * n)`` rows, the ``test`` part of ``datasets.Dataset.train_test_split(test_size=
    fraction, seed=seed)``: ``random`` is its shuffled cut (the head of
    ``numpy.random.default_rng(seed).permutation(n)`` is carved, its tail is the rest), ``tail`` its
    unshuffled cut (the last rows are carved). This is how the KnOTS reference cuts the validation sets of
    MNLI (unshuffled), QNLI and RTE (shuffled, seed 42).
    """
    if method == "stratified":
        carved, rest = stratified_parts(labels, [fraction, 1 - fraction], seed)
        return carved, rest
    n = len(labels)
    n_carved = math.ceil(fraction * n)
    if not 0 < n_carved < n:
        raise ConfigError(f"cannot carve {fraction} of {n} examples into two non-empty parts")
    if method == "tail":
        return list(range(n - n_carved, n)), list(range(n - n_carved))
    if method == "random":
        import numpy as np

        permutation = np.random.default_rng(seed).permutation(n).tolist()
        return permutation[:n_carved], permutation[n_carved:]
    raise ConfigError(f"unknown carve method {method!r}; expected stratified, random or tail")


def capped(labels: Sequence[int], positions: Sequence[int], cap: int | None, seed: int, balance: bool) -> list[int]:
    """At most ``cap`` of ``positions``: stratified, or round-robin over classes with ``balance``."""
    if cap is None or cap >= len(positions):
        return list(positions)
    if not balance:
        return stratified_parts(labels, [cap, len(positions) - cap], seed, positions)[0]
    rng = random.Random(seed)
    groups = list(_groups(positions, labels, rng).values())
    out: list[int] = []
    i = 0
    while len(out) < cap:
        group = groups[i % len(groups)]
        if i // len(groups) < len(group):
            out.append(group[i // len(groups)])
        i += 1
    rng.shuffle(out)
    return out


def assign_roles(pools: LabelledPool | Mapping[str, LabelledPool], split: Any, task: str) -> dict[str, LabelledPool]:
    """Train / validation / test pools following a ``SplitConfig``.

    ``pools`` is one pool (split by ``split.fractions``) or the source's named splits; with
    ``split.source_splits`` the roles come from those splits and a missing role is carved out of
    ``split.carve_from``; without it, named splits are pooled. Each role is then capped (``max_*``).
    """
    if isinstance(pools, Mapping) and split.source_splits:
        missing = [s for s in split.source_splits.values() if s not in pools]
        if missing:
            raise ConfigError(f"task {task}: source has no split {missing[0]!r} (has: {', '.join(pools)})")
        sets = {role: pools[name] for role, name in split.source_splits.items()}
        for role in SPLITS:
            if role not in sets:
                source = sets.get(split.carve_from)
                if source is None:
                    raise ConfigError(f"task {task}: cannot carve {role} from missing split {split.carve_from}")
                try:
                    carved, rest = carved_parts(source.labels, split.carve_fraction, split.seed, getattr(split, "carve", "stratified"))
                except ConfigError as error:
                    raise ConfigError(f"task {task}: {error}") from None
                sets[role], sets[split.carve_from] = source.subset(carved), source.subset(rest)
    else:
        pool = pools if not isinstance(pools, Mapping) else LabelledPool.concat(list(pools.values()))
        parts = stratified_parts(pool.labels, [split.fractions[r] for r in SPLITS], split.seed)
        sets = {role: pool.subset(part) for role, part in zip(SPLITS, parts)}
    out = {}
    for role in SPLITS:
        pool = sets[role]
        keep = capped(pool.labels, range(len(pool)), getattr(split, f"max_{role}"), split.seed + 1, split.balance)
        out[role] = pool.subset(keep)
        if len(out[role]) == 0:
            raise ConfigError(f"task {task}: the {role} split is empty (check the label values and split rules)")
    return out
