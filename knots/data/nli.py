"""The six NLI tasks of the paper's language benchmark (Table 3) as premise/hypothesis pairs.

SNLI, MNLI, SICK, QNLI, RTE and SciTail come from Hugging Face ``datasets`` and share one 3-way
label space, ``NLI_CLASSES`` = (entailment, neutral, contradiction). Every choice below follows the
reference implementation (gstoica27/KnOTS, ``dataset/huggingface_datasets.py`` and the per-task
files next to it):

- dataset ids and columns: ``task_ids`` / ``task_to_keys``; SciTail uses the ``tsv_format`` config;
- labels: SNLI, MNLI and SICK are already 0/1/2 = entailment/neutral/contradiction; QNLI and RTE
  map not-entailment (1) to contradiction (2) and mask neutral; SciTail maps ``entails`` to
  entailment and ``neutral`` to neutral and masks contradiction;
- rows without a gold label (-1: SNLI pairs without annotator majority, GLUE test rows) are dropped
  before any split is cut;
- splits: the source's train split trains; SNLI, SICK and SciTail use their own validation and test
  splits; MNLI (unshuffled), QNLI and RTE (shuffled, seed 42) cut their validation split with
  ``Dataset.train_test_split(test_size=f)``: the ``test_size`` part validates, the rest tests;
- input formatting: no template; the pair goes to the tokenizer as a text pair (truncation at
  2000 tokens, 1000 for SciTail).

Everything here is a pure function of the rows, so it is tested on hand-made rows in each
dataset's real column layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knots.data.tasks import Example, TaskData
from knots.errors import ConfigError

#: The shared 3-way label space, in head order (index 0, 1, 2).
NLI_CLASSES: tuple[str, str, str] = ("entailment", "neutral", "contradiction")
#: Label keys: the six tasks share their labels (the heads still differ per task).
NLI_LABEL_KEYS: list[str] = [f"nli/{c}" for c in NLI_CLASSES]

Pair = tuple[str, str]


@dataclass(frozen=True)
class ValidationCut:
    """Validation and test carved out of the source's validation split.

    Index-exact with ``datasets.Dataset.train_test_split(test_size=fraction, shuffle=shuffle,
    seed=seed)``, whose ``test`` part is our validation split and whose ``train`` part is our test split.
    """

    fraction: float
    shuffle: bool
    seed: int = 42


@dataclass(frozen=True)
class NLISpec:
    """How one NLI task is read.

    Attributes:
        name: task identifier.
        hub_id: Hugging Face dataset id; ``config``: its configuration name (or None).
        premise, hypothesis, label: column names in the dataset.
        labels: raw label value -> class name in ``NLI_CLASSES``. Values compare as strings,
            so ``1`` and ``"1"`` are the same value.
        masked: classes the task never has; the head's logits for them are masked.
        unlabelled: raw values that mean "no gold label"; such rows (and missing labels) are dropped.
        cut: how validation and test come out of the source's validation split; None: the
            source's own validation and test splits are used.
        max_length: the reference's tokenizer truncation length, in tokens.
    """

    name: str
    hub_id: str
    config: str | None
    premise: str
    hypothesis: str
    label: str
    labels: Mapping[Any, str]
    masked: tuple[str, ...] = ()
    unlabelled: tuple[Any, ...] = (-1,)
    cut: ValidationCut | None = None
    max_length: int = 2000
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "masked", tuple(self.masked))
        object.__setattr__(self, "unlabelled", tuple(self.unlabelled))
        object.__setattr__(self, "_lookup", check_spec(self))

    @property
    def mask(self) -> tuple[int, ...]:
        """Indices (into ``NLI_CLASSES``) of the masked classes, ascending."""
        return tuple(sorted(NLI_CLASSES.index(c) for c in self.masked))


def check_spec(spec: NLISpec) -> dict[str, int]:
    """The spec's label lookup ``str(raw) -> class index``; one-line ``ConfigError`` when inconsistent."""
    task = spec.name
    if not spec.labels:
        raise ConfigError(f"task {task}: no label values given")
    lookup: dict[str, int] = {}
    for raw, target in spec.labels.items():
        if target not in NLI_CLASSES:
            raise ConfigError(f"task {task}: label value {raw!r} maps to {target!r}, not one of {', '.join(NLI_CLASSES)}")
        if str(raw) in lookup and lookup[str(raw)] != NLI_CLASSES.index(target):
            raise ConfigError(f"task {task}: label value {raw!r} maps to two classes")
        lookup[str(raw)] = NLI_CLASSES.index(target)
    for c in spec.masked:
        if c not in NLI_CLASSES:
            raise ConfigError(f"task {task}: masked class {c!r} is not one of {', '.join(NLI_CLASSES)}")
    present = {NLI_CLASSES[i] for i in lookup.values()}
    clash = present & set(spec.masked)
    if clash:
        raise ConfigError(f"task {task}: class {sorted(clash)[0]!r} is masked but a label value maps to it")
    missing = [c for c in NLI_CLASSES if c not in present and c not in spec.masked]
    if missing:
        raise ConfigError(f"task {task}: no label value maps to {', '.join(missing)}; a task with fewer than "
                          f"three classes must mask the missing ones (masked: [{', '.join(missing)}])")
    both = {str(v) for v in spec.unlabelled} & set(lookup)
    if both:
        raise ConfigError(f"task {task}: label value {sorted(both)[0]!r} is both a class and a no-gold marker")
    if spec.cut is not None and not 0.0 < spec.cut.fraction < 1.0:
        raise ConfigError(f"task {task}: validation cut fraction must be in (0, 1), got {spec.cut.fraction}")
    return lookup


_E, _N, _C = NLI_CLASSES
_THREE_WAY = {0: _E, 1: _N, 2: _C}

#: The six tasks as the reference loads them (dataset/huggingface_datasets.py, dataset/{qnli,rte,scitail,mnli}.py,
#: dataset/configs.py). SICK's hub id "sick" now resolves to "RobZamp/sick".
NLI_SPECS: dict[str, NLISpec] = {
    spec.name: spec
    for spec in (
        NLISpec("snli", "stanfordnlp/snli", None, "premise", "hypothesis", "label", _THREE_WAY),
        NLISpec("mnli", "SetFit/mnli", None, "text1", "text2", "label", _THREE_WAY,
                cut=ValidationCut(0.2, shuffle=False)),
        NLISpec("sick", "RobZamp/sick", None, "sentence_A", "sentence_B", "label", _THREE_WAY),
        NLISpec("qnli", "SetFit/qnli", None, "text1", "text2", "label", {0: _E, 1: _C}, masked=(_N,),
                cut=ValidationCut(0.2, shuffle=True)),
        NLISpec("rte", "SetFit/rte", None, "text1", "text2", "label", {0: _E, 1: _C}, masked=(_N,),
                cut=ValidationCut(0.5, shuffle=True)),
        NLISpec("scitail", "allenai/scitail", "tsv_format", "premise", "hypothesis", "label",
                {"entails": _E, "neutral": _N}, masked=(_C,), unlabelled=(), max_length=1000),
    )
}


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
    known = ", ".join(f"{k} -> {v}" for k, v in spec.labels.items())
    raise ConfigError(f"task {spec.name}: label value {raw!r} maps to no class (known: {known})")


def map_row(row: Mapping[str, Any], spec: NLISpec) -> tuple[Pair, int] | None:
    """One dataset row -> ``((premise, hypothesis), class index)``, or None when it has no gold label."""
    try:
        premise, hypothesis, raw = row[spec.premise], row[spec.hypothesis], row[spec.label]
    except KeyError as e:
        raise ConfigError(f"task {spec.name}: column {e.args[0]!r} not in the data (columns: {', '.join(map(str, row))})") from None
    y = label_index(raw, spec)
    return None if y is None else ((str(premise), str(hypothesis)), y)


def _columns(rows: Any) -> list[str] | None:
    names = getattr(rows, "column_names", None)
    return list(names) if names is not None else None


def to_examples(rows: Iterable[Mapping[str, Any]], spec: NLISpec) -> list[Example]:
    """Map rows in order, dropping those without a gold label (no deduplication, as in the reference)."""
    names = _columns(rows)
    if names is not None:  # a datasets.Dataset: read the three columns at once
        missing = [c for c in (spec.premise, spec.hypothesis, spec.label) if c not in names]
        if missing:
            raise ConfigError(f"task {spec.name}: column {missing[0]!r} not in the data (columns: {', '.join(names)})")
        rows = ({spec.premise: p, spec.hypothesis: h, spec.label: y}
                for p, h, y in zip(rows[spec.premise], rows[spec.hypothesis], rows[spec.label]))
    return [ex for ex in (map_row(r, spec) for r in rows) if ex is not None]


def cut_validation(n: int, cut: ValidationCut) -> tuple[list[int], list[int]]:
    """Indices ``(validation, test)`` of a validation split of ``n`` labelled rows.

    The validation part has ``ceil(fraction * n)`` rows. Unshuffled: the test part is the first rows,
    validation the last ones. Shuffled: ``numpy.random.default_rng(seed).permutation(n)``, whose head
    validates and whose tail tests.
    """
    n_val = math.ceil(cut.fraction * n)
    n_test = n - n_val
    if n_val <= 0 or n_test <= 0:
        raise ConfigError(f"cannot cut {n} examples into validation and test with fraction {cut.fraction}")
    if not cut.shuffle:
        return list(range(n_test, n)), list(range(n_test))
    import numpy as np

    perm = np.random.default_rng(cut.seed).permutation(n).tolist()
    return perm[:n_val], perm[n_val:]


@dataclass(frozen=True)
class NLITask:
    """A built NLI task: its examples (inputs are ``(premise, hypothesis)``) and its masked classes."""

    data: TaskData
    mask: tuple[int, ...]


def build_nli_task(spec: NLISpec, source: Mapping[str, Iterable[Mapping[str, Any]]]) -> NLITask:
    """Build the task from its source splits (``train``, ``validation`` and, without a cut, ``test``)."""
    needed = ("train", "validation") if spec.cut is not None else ("train", "validation", "test")
    absent = [s for s in needed if s not in source]
    if absent:
        raise ConfigError(f"task {spec.name}: the data has no {absent[0]!r} split (has: {', '.join(source)})")
    splits = {"train": to_examples(source["train"], spec)}
    pool = to_examples(source["validation"], spec)
    if spec.cut is None:
        splits["validation"], splits["test"] = pool, to_examples(source["test"], spec)
    else:
        try:
            val_idx, test_idx = cut_validation(len(pool), spec.cut)
        except ConfigError as e:
            raise ConfigError(f"task {spec.name}: {e}") from None
        splits["validation"], splits["test"] = [pool[i] for i in val_idx], [pool[i] for i in test_idx]
    for role, examples in splits.items():
        if not examples:
            raise ConfigError(f"task {spec.name}: the {role} split has no labelled examples")
    data = TaskData(name=spec.name, class_names=list(NLI_CLASSES), templates=[], label_keys=list(NLI_LABEL_KEYS),
                    train=splits["train"], validation=splits["validation"], test=splits["test"])
    return NLITask(data=data, mask=spec.mask)


def load_nli_source(spec: NLISpec, path: str | os.PathLike | None = None, cache_dir: str | None = None) -> Mapping[str, Any]:
    """The task's splits from ``path`` (a ``save_to_disk`` directory) or the Hugging Face hub/cache.

    Fails with one line naming the dataset id when it cannot be loaded (e.g. offline and not cached).
    """
    import datasets

    try:
        if path is not None and Path(path, "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path) if path is not None else spec.hub_id, spec.config, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        where = path if path is not None else spec.hub_id
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"task {spec.name}: cannot load dataset {str(where)!r}{f' ({spec.config})' if spec.config else ''}: {first}") from None


def load_nli_task(name: str, path: str | os.PathLike | None = None, cache_dir: str | None = None) -> NLITask:
    """One of the six tasks by name (``NLI_SPECS``), loaded and built."""
    if name not in NLI_SPECS:
        raise ConfigError(f"unknown NLI task {name!r}; expected one of {', '.join(NLI_SPECS)}")
    spec = NLI_SPECS[name]
    return build_nli_task(spec, load_nli_source(spec, path, cache_dir))

