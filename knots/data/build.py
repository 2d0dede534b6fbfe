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


def build_task(name: str, cfg: Any) -> TaskData:
    """Read and split one task."""
    if cfg.source == "task":
        source = source_from_builder(name, cfg)
        sets = assign_roles(source.splits, cfg.split, name)
        class_names, templates, keys, mask = source.class_names, source.templates, source.label_keys, source.class_mask
        info = {**source.info, "source_sizes": {split: len(pool) for split, pool in source.splits.items()}}
    else:
        rows = READERS[cfg.source](cfg, name)
        sets = split_examples(rows, cfg.classes, cfg.split, name)
        class_names, templates = [c.name for c in cfg.classes], list(cfg.templates)
        keys, mask, info = [c.key or f"{name}/{c.name}" for c in cfg.classes], None, {}
        masked = [bool(getattr(c, "masked", False)) for c in cfg.classes]
        if any(masked):
            mask = [not m for m in masked]
    if len(set(sets["train"].labels)) < 2:
        raise ConfigError(f"task {name}: the training split has fewer than 2 classes")
    return TaskData(name=name, class_names=list(class_names), templates=list(templates),
                    label_keys=list(keys) or [f"{name}/{c}" for c in class_names], class_mask=mask, info=info,
                    **{role: sets[role] for role in SPLITS})
