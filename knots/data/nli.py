"""Natural language inference tasks as premise/hypothesis pairs in one shared 3-way label space.

:func:`nli_task` is a task builder (``source: task`` in a task config): it reads a Hugging Face dataset
(from the hub or its cache, or a local copy), maps each row to ``((premise, hypothesis), class)`` and
returns the dataset's own splits as a :class:`~knots.data.tasks.TaskSource`. Everything else is config:
``conf/task/{snli,mnli,sick,qnli,rte,scitail}.yaml`` define the six tasks of the paper's Llama3-8B
benchmark (Table 3) exactly as the reference implementation (gstoica27/KnOTS,
``dataset/huggingface_datasets.py`` and the per-task files next to it) loads them, and each task's
``split`` settings express the reference's validation cuts (``knots.data.splits.carved_parts``).

- classes: ``NLI_CLASSES`` = (entailment, neutral, contradiction), in head order; the label keys
  ``nli/<class>`` are shared by every task (the heads still differ per task);
- ``classes`` maps each class the task has to its raw label values (compared as strings); a class the
  task lacks is ``masked`` (its logit is -inf in training and evaluation);
- rows without a gold label (``unlabelled`` values such as -1, or a missing label) are dropped before
  any split is cut; any other unknown label value is an error, never silently dropped;
- the input is the pair as it is, with no template: the tokenizer formats it with its own pair template.

Every check of a task's definition (a class outside the 3-way space, a two-class task without its
mask, a value in two classes) runs before any data is read, with a one-line ``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knots.data.tasks import Example, LabelledPool, TaskSource
from knots.errors import ConfigError

#: The shared 3-way label space, in head order (index 0, 1, 2).
NLI_CLASSES: tuple[str, str, str] = ("entailment", "neutral", "contradiction")
#: Label keys: the tasks share their labels (the heads still differ per task).
NLI_LABEL_KEYS: list[str] = [f"nli/{c}" for c in NLI_CLASSES]

Pair = tuple[str, str]


@dataclass(frozen=True)
class NLISpec:
    """How one NLI task is read.

    Attributes:
        name: task identifier.
        dataset: Hugging Face dataset id; ``config``: its configuration name (or None).
        premise, hypothesis, label: column names in the dataset.
        classes: class name (one of ``NLI_CLASSES``) -> the raw label values that mean it.
        masked: classes the task never has; the head's logits for them are masked.
        unlabelled: raw values that mean "no gold label"; such rows (and missing labels) are dropped.
    """

    name: str
    dataset: str
    premise: str
    hypothesis: str
    classes: Mapping[str, Sequence[Any]]
    masked: tuple[str, ...] = ()
    unlabelled: tuple[Any, ...] = (-1,)
    label: str = "label"
    config: str | None = None
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "masked", tuple(self.masked))
        object.__setattr__(self, "unlabelled", tuple(self.unlabelled))
        object.__setattr__(self, "_lookup", check_spec(self))

    @property
    def class_mask(self) -> list[bool]:
        """Per class of ``NLI_CLASSES``, whether the task has it."""
        return [c not in self.masked for c in NLI_CLASSES]


def check_spec(spec: NLISpec) -> dict[str, int]:
    """The spec's label lookup ``str(raw) -> class index``; one-line ``ConfigError`` when inconsistent."""
    task, space = spec.name, ", ".join(NLI_CLASSES)
    if not spec.classes:
        raise ConfigError(f"task {task}: no classes given")
    lookup: dict[str, int] = {}
    for target, values in spec.classes.items():
        if target not in NLI_CLASSES:
            raise ConfigError(f"task {task}: label values {list(values)} map to {target!r}, not one of {space}")
        if not values:
            raise ConfigError(f"task {task}: class {target!r} has no label values; a class the task lacks is masked")
        for raw in values:
            if str(raw) in lookup and lookup[str(raw)] != NLI_CLASSES.index(target):
                raise ConfigError(f"task {task}: label value {raw!r} maps to two classes")
            lookup[str(raw)] = NLI_CLASSES.index(target)
    for c in spec.masked:
        if c not in NLI_CLASSES:
            raise ConfigError(f"task {task}: masked class {c!r} is not one of {space}")
    clash = sorted(set(spec.classes) & set(spec.masked))
    if clash:
        raise ConfigError(f"task {task}: class {clash[0]!r} is masked but label values map to it")
    missing = [c for c in NLI_CLASSES if c not in spec.classes and c not in spec.masked]
    if missing:
        raise ConfigError(f"task {task}: no label value maps to {', '.join(missing)}; a task with fewer than "
                          f"three classes must mask the missing ones (masked: [{', '.join(missing)}])")
    both = sorted({str(v) for v in spec.unlabelled} & set(lookup))
    if both:
        raise ConfigError(f"task {task}: label value {both[0]!r} is both a class and a no-gold marker")
    return lookup


def label_index(raw: Any, spec: NLISpec) -> int | None:
    """Class index of a raw label; None for a missing or no-gold label; ``ConfigError`` for an unknown value."""
    if raw is None:
        return None
    key = str(raw).strip()
    y = spec._lookup.get(key)
    if y is not None:
        return y
    if key in {str(v) for v in spec.unlabelled}:
        return None
    known = ", ".join(f"{v} -> {c}" for c, values in spec.classes.items() for v in values)
    raise ConfigError(f"task {spec.name}: label value {raw!r} maps to no class (known: {known}; no gold label: "
                      f"{', '.join(map(str, spec.unlabelled)) or 'none'})")


def map_row(row: Mapping[str, Any], spec: NLISpec) -> tuple[Pair, int] | None:
    """One dataset row -> ``((premise, hypothesis), class index)``, or None when it has no gold label."""
    try:
        premise, hypothesis, raw = row[spec.premise], row[spec.hypothesis], row[spec.label]
    except KeyError as e:
        raise ConfigError(f"task {spec.name}: column {e.args[0]!r} not in the data (columns: {', '.join(map(str, row))})") from None
    y = label_index(raw, spec)
    return None if y is None else ((str(premise), str(hypothesis)), y)


def to_examples(rows: Iterable[Mapping[str, Any]], spec: NLISpec) -> list[Example]:
    """Map rows in order, dropping those without a gold label (no deduplication, as in the reference)."""
    names = getattr(rows, "column_names", None)
    if names is not None:  # a datasets.Dataset: read the three columns at once
        missing = [c for c in (spec.premise, spec.hypothesis, spec.label) if c not in names]
        if missing:
            raise ConfigError(f"task {spec.name}: column {missing[0]!r} not in the data (columns: {', '.join(names)})")
        rows = ({spec.premise: p, spec.hypothesis: h, spec.label: y}
                for p, h, y in zip(rows[spec.premise], rows[spec.hypothesis], rows[spec.label]))
    return [ex for ex in (map_row(r, spec) for r in rows) if ex is not None]


def nli_source(spec: NLISpec, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> TaskSource:
    """The task built from its source splits: every split's labelled pairs, the 3-way classes and mask."""
    pools = {name: LabelledPool.from_examples(to_examples(rows, spec)) for name, rows in splits.items()}
    return TaskSource(name=spec.name, class_names=list(NLI_CLASSES), templates=["{}"], splits=pools,
                      label_keys=list(NLI_LABEL_KEYS), class_mask=spec.class_mask if spec.masked else None)


def load_nli_source(spec: NLISpec, path: str | os.PathLike | None = None, cache_dir: str | None = None,
                    revision: str | None = None) -> Mapping[str, Any]:
    """The task's splits from ``path`` (a ``save_to_disk`` directory or a folder of split files) or from
    the Hugging Face hub (downloaded once into ``cache_dir``, then read from there, also offline).

    Fails with one line naming the dataset id when it cannot be loaded (e.g. offline and not cached).
    """
    import datasets

    where = str(path) if path is not None else spec.dataset
    try:
        if path is not None and Path(path, "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(where, spec.config if path is None else None, cache_dir=cache_dir, revision=revision)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        config = f" ({spec.config})" if spec.config and path is None else ""
        raise ConfigError(f"task {spec.name}: cannot load dataset {where!r}{config}: {first}") from None


def nli_task(name: str, dataset: str, premise: str, hypothesis: str, classes: Mapping[str, Sequence[Any]],
             masked: Sequence[str] = (), unlabelled: Sequence[Any] = (-1,), label: str = "label",
             config: str | None = None, path: str | None = None, revision: str | None = None,
             cache_dir: str | None = None) -> TaskSource:
    """Task builder: an NLI dataset as a ``TaskSource`` of its own splits (roles and cuts: the task's ``split``).

    ``dataset`` (with ``config`` and ``revision``) is read from the hub or the cache in ``cache_dir``;
    ``path`` reads a local copy instead. The definition is checked before any data is read.
    """
    spec = NLISpec(name=name, dataset=dataset, premise=premise, hypothesis=hypothesis, classes=dict(classes),
                   masked=tuple(masked), unlabelled=tuple(unlabelled), label=label, config=config)
    return nli_source(spec, load_nli_source(spec, path, cache_dir, revision))
