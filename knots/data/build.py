"""Build ``TaskData`` from a ``TaskConfig``: read rows, map raw labels to classes, split reproducibly."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from knots.data.sources import READERS, Row, resolve_callable
from knots.data.tasks import SPLITS, Example, TaskData
from knots.errors import ConfigError


def label_of(raw: Any, classes: Sequence[Any]) -> int | None:
    """Index of the first class whose ``values`` hold ``raw`` (as strings) or whose ``[min, max)`` holds it."""
    text = str(raw).strip()
    for i, c in enumerate(classes):
        if any(text == str(v) for v in c.values):
            return i
        if c.min is not None or c.max is not None:
            try:
                x = float(raw)
            except (TypeError, ValueError):
                continue
            if (c.min is None or x >= c.min) and (c.max is None or x < c.max):
                return i
    return None


def to_examples(rows: Sequence[Row], classes: Sequence[Any]) -> list[Example]:
    """Map raw labels to class indices; rows matching no class, and repeated text inputs, are dropped."""
    out = []
    seen: set[str] = set()
    for x, raw in rows:
        y = label_of(raw, classes)
        if y is None:
            continue
        if isinstance(x, str):
            if x in seen:
                continue
            seen.add(x)
        out.append((x, y))
    return out


def _by_class(examples: Sequence[Example], rng: random.Random) -> dict[int, list[Example]]:
    groups: dict[int, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex[1]].append(ex)
    for y in sorted(groups):
        rng.shuffle(groups[y])
    return groups


def stratified_split(examples: Sequence[Example], fractions: Sequence[float], seed: int) -> list[list[Example]]:
    """Split into parts with the given fractions, keeping class proportions (seeded)."""
    rng = random.Random(seed)
    parts: list[list[Example]] = [[] for _ in fractions]
    total = sum(fractions)
    for _, group in sorted(_by_class(examples, rng).items()):
        start = 0
        acc = 0.0
        for i, f in enumerate(fractions):
            acc += f / total
            end = len(group) if i == len(fractions) - 1 else int(round(acc * len(group)))
            parts[i].extend(group[start:end])
            start = end
    for part in parts:
        rng.shuffle(part)
    return parts


def subsample(examples: Sequence[Example], cap: int | None, seed: int, balance: bool) -> list[Example]:
    """At most ``cap`` examples: stratified, or round-robin over classes with ``balance``."""
    if cap is None or cap >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    if not balance:
        return stratified_split(examples, [cap, len(examples) - cap], seed)[0]
    groups = list(_by_class(examples, rng).values())
    out: list[Example] = []
    i = 0
    while len(out) < cap:
        group = groups[i % len(groups)]
        if i // len(groups) < len(group):
            out.append(group[i // len(groups)])
        i += 1
    rng.shuffle(out)
    return out


def split_examples(rows: list[Row] | dict[str, list[Row]], classes: Sequence[Any], split: Any, task: str) -> dict[str, list[Example]]:
    """Assign examples to train / validation / test following the task's split rules."""
    if isinstance(rows, dict) and split.source_splits:
        missing = [s for s in split.source_splits.values() if s not in rows]
        if missing:
            raise ConfigError(f"task {task}: source has no split {missing[0]!r} (has: {', '.join(rows)})")
        sets = {role: to_examples(rows[name], classes) for role, name in split.source_splits.items()}
        for role in SPLITS:
            if role not in sets:
                source = sets.get(split.carve_from)
                if source is None:
                    raise ConfigError(f"task {task}: cannot carve {role} from missing split {split.carve_from}")
                carved, rest = stratified_split(source, [split.carve_fraction, 1 - split.carve_fraction], split.seed)
                sets[role], sets[split.carve_from] = carved, rest
    else:
        if isinstance(rows, dict):
            rows = [r for part in rows.values() for r in part]
        pool = to_examples(rows, classes)
        parts = stratified_split(pool, [split.fractions[r] for r in SPLITS], split.seed)
        sets = dict(zip(SPLITS, parts))
    out = {}
    for role in SPLITS:
        out[role] = subsample(sets[role], getattr(split, f"max_{role}"), split.seed + 1, split.balance)
        if not out[role]:
            raise ConfigError(f"task {task}: the {role} split is empty (check the label values and split rules)")
    return out


def task_from_builder(name: str, cfg: Any) -> TaskData:
    """A ``source: task`` task: ``builder(name=name, **read_options)`` returns the whole ``TaskData``."""
    task = resolve_callable(cfg.path, name)(name=name, **cfg.read_options)
    if not isinstance(task, TaskData):
        raise ConfigError(f"task {name}: {cfg.path!r} returned {type(task).__name__}, expected TaskData")
    if task.name != name:
        raise ConfigError(f"task {name}: {cfg.path!r} built a task named {task.name!r}")
    if task.num_classes < 2:
        raise ConfigError(f"task {name}: {cfg.path!r} built a task with fewer than 2 classes")
    for role in SPLITS:
        if len(task.split(role)) == 0:
            raise ConfigError(f"task {name}: the {role} split is empty")
    return task


def build_task(name: str, cfg: Any) -> TaskData:
    """Read and split one task (or, for ``source: task``, have its builder make it)."""
    if cfg.source == "task":
        return task_from_builder(name, cfg)
    rows = READERS[cfg.source](cfg, name)
    sets = split_examples(rows, cfg.classes, cfg.split, name)
    found = {y for ex in sets["train"] for y in [ex[1]]}
    if len(found) < 2:
        raise ConfigError(f"task {name}: the training split has fewer than 2 classes")
    return TaskData(
        name=name,
        class_names=[c.name for c in cfg.classes],
        templates=list(cfg.templates),
        label_keys=[c.key or f"{name}/{c.name}" for c in cfg.classes],
        **sets,
    )
