"""Build ``TaskData`` from a ``TaskConfig``: read rows, map raw labels to classes, split reproducibly.

Every task goes through :func:`knots.data.splits.assign_roles` with its ``split`` settings, whether its
rows come from a file, a loader function or a whole-task builder (``source: task``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from knots.data.sources import READERS, Row, instantiate_loader
from knots.data.splits import assign_roles
from knots.data.tasks import SPLITS, Example, LabelledPool, TaskData, TaskSource
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


def example_pools(rows: list[Row] | dict[str, list[Row]], classes: Sequence[Any], split: Any) -> LabelledPool | dict[str, LabelledPool]:
    """The labelled examples of a reader's rows: one pool, or one per named split when they are kept."""
    if isinstance(rows, dict) and split.source_splits:
        return {name: LabelledPool.from_examples(to_examples(part, classes)) for name, part in rows.items()}
    if isinstance(rows, dict):
        rows = [r for part in rows.values() for r in part]
    return LabelledPool.from_examples(to_examples(rows, classes))


def split_examples(rows: list[Row] | dict[str, list[Row]], classes: Sequence[Any], split: Any, task: str) -> dict[str, LabelledPool]:
    """Assign examples to train / validation / test following the task's split rules."""
    return assign_roles(example_pools(rows, classes, split), split, task)


def source_from_builder(name: str, cfg: Any) -> TaskSource:
    """A ``source: task`` task: the instantiated ``loader`` (with ``name=``) returns a ``TaskSource``."""
    source = instantiate_loader(cfg.loader, name, name=name)
    if not isinstance(source, TaskSource):
        raise ConfigError(f"task {name}: the loader returned {type(source).__name__}, expected TaskSource")
    if source.name != name:
        raise ConfigError(f"task {name}: the loader built a task named {source.name!r}")
    if len(source.class_names) < 2:
        raise ConfigError(f"task {name}: the loader built a task with fewer than 2 classes")
    return source


def count_rows(rows: list[Row] | dict[str, list[Row]], classes: Sequence[Any]) -> tuple[int, int]:
    """How many rows a reader gave, and how many of them match no class."""
    parts = list(rows.values()) if isinstance(rows, dict) else [rows]
    total = sum(len(part) for part in parts)
    return total, sum(1 for part in parts for _, raw in part if label_of(raw, classes) is None)


def class_counts(pools: LabelledPool | dict[str, LabelledPool], num_classes: int, task: str) -> list[int]:
    """Examples per class over every pool (before splitting and capping); a label outside the classes is an error."""
    counts = [0] * num_classes
    for pool in pools.values() if isinstance(pools, dict) else [pools]:
        for y in pool.labels:
            if not 0 <= y < num_classes:
                raise ConfigError(f"task {task}: label {y} is outside its {num_classes} classes")
            counts[y] += 1
    return counts


def check_classes(task: str, class_names: Sequence[str], counts: Sequence[int], mask: Sequence[bool] | None,
                  values: Sequence[str] | None = None) -> None:
    """An error naming every class (not masked out) that no example has."""
    empty = [i for i, n in enumerate(counts) if n == 0 and (mask is None or mask[i])]
    if not empty:
        return
    names = ", ".join(repr(class_names[i]) + (f" (values {values[i]})" if values else "") for i in empty)
    raise ConfigError(f"task {task}: no row has class {names}; fix the class values or remove the class")


def build_task(name: str, cfg: Any) -> TaskData:
    """Read and split one task; an empty class is an error, and what was dropped is counted."""
    if cfg.source == "task":
        source = source_from_builder(name, cfg)
        pools: LabelledPool | dict[str, LabelledPool] = source.splits
        class_names, templates, keys, mask = source.class_names, source.templates, source.label_keys, source.class_mask
        counts = class_counts(pools, len(class_names), name)
        check_classes(name, class_names, counts, mask)
        total, unmatched = sum(counts), 0
        info = {**source.info, "source_sizes": {split: len(pool) for split, pool in source.splits.items()}}
    else:
        rows = READERS[cfg.source](cfg, name)
        pools = example_pools(rows, cfg.classes, cfg.split)
        class_names, templates = [c.name for c in cfg.classes], list(cfg.templates)
        keys, mask, info = [c.key or f"{name}/{c.name}" for c in cfg.classes], None, {}
        masked = [bool(getattr(c, "masked", False)) for c in cfg.classes]
        if any(masked):
            mask = [not m for m in masked]
        counts = class_counts(pools, len(class_names), name)
        check_classes(name, class_names, counts, mask, [str(list(c.values) if c.values else f"[{c.min}, {c.max})") for c in cfg.classes])
        total, unmatched = count_rows(rows, cfg.classes)
    sets = assign_roles(pools, cfg.split, name)
    if len(set(sets["train"].labels)) < 2:
        raise ConfigError(f"task {name}: the training split has fewer than 2 classes")
    row_counts = {"rows": total, "unmatched": unmatched, "repeated": total - unmatched - sum(counts),
                  "per_class": dict(zip(class_names, counts))}
    return TaskData(name=name, class_names=list(class_names), templates=list(templates),
                    label_keys=list(keys) or [f"{name}/{c}" for c in class_names], class_mask=mask, info=info,
                    row_counts=row_counts, **{role: sets[role] for role in SPLITS})
