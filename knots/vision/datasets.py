"""The eight image classification tasks of the paper, read through Hugging Face ``datasets``.

Class names come from each dataset's own ``ClassLabel`` feature (in its label order), tidied for
prompts (``baseball_diamond`` -> ``baseball diamond``); where the standard prompts use descriptive
names instead (EuroSAT, GTSRB), ``prompt_names`` maps each label, and every mapping is checked
against the feature so that a reordered or different mirror fails loudly instead of mislabelling.

Splits (``split``):

- ``seeded`` (default): the dataset's validation split where it has one; otherwise a fixed, seeded
  20% of the test split is the validation set and the remaining 80% the test set.
- ``reference``: the authors' splits (:mod:`knots.vision.paper`). Cars, GTSRB, MNIST, SUN397 and
  SVHN carve validation out of the test split with the authors' fixed permutation (first
  ``int(0.2 n)`` indices; :mod:`knots.vision.reference_split`), DTD, EuroSAT and RESISC45 need the
  dataset's own validation split. The official validation and test sizes are checked: another size
  is an error.

The built task (:class:`ImageTask`) records how its splits were made and their sizes in ``info``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from knots.data.tasks import TaskData
from knots.errors import ConfigError
from knots.vision.paper import VALIDATION_FRACTION, reference_split
from knots.vision.reference_split import (authors_order, fetch_index_file, file_names, index_url, load_permutation,
                                          permutation_split)
from knots.vision.templates import templates_for

#: How validation and test are made (see the module docstring).
SPLIT_RULES = ("seeded", "reference")


@dataclass
class ImageTask(TaskData):
    """A :class:`TaskData` that says how its splits were made.

    ``info``: ``split`` (the rule), ``validation`` (where validation came from), ``sizes`` (images per
    split as built), ``full_sizes`` (before the ``max_*`` caps), and under the reference rule
    ``expected`` (the official validation / test sizes), ``test_order`` and ``index_file``.
    """

    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LazyImage:
    """One image of a ``datasets.Dataset``, decoded only when the backbone preprocesses it."""

    data: Any
    index: int
    key: str

    def load(self) -> Any:
        return self.data[self.index][self.key]


class ImageSplit(Sequence):
    """``(LazyImage, label)`` pairs for selected rows of a ``datasets.Dataset`` (labels read once)."""

    def __init__(self, data: Any, rows: Sequence[int], image_key: str, labels: Sequence[int]) -> None:
        self.data, self.rows, self.image_key = data, np.asarray(rows, dtype=np.int64), image_key
        self.labels = np.asarray(labels, dtype=np.int64)[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[LazyImage, int]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]  # type: ignore[return-value]
        return LazyImage(self.data, int(self.rows[i]), self.image_key), int(self.labels[i])


def carve_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint ``(carved, rest)`` row indices: ``round(fraction * n)`` rows are carved out.

    Both parts are sorted, so the result depends only on ``(n, fraction, seed)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(fraction * n))
    return np.sort(perm[:k]), np.sort(perm[k:])


def subsample(rows: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """At most ``cap`` rows, chosen with a seeded permutation (kept in dataset order)."""
    if cap is None or cap >= len(rows):
        return rows
    return np.sort(np.random.default_rng(seed).permutation(rows)[:cap])


def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(text).lower())


def prompt_name(raw: str) -> str:
    """A label name as prompts use it: underscores become spaces; SUN397-style paths
    (``/b/bakery/shop``) lose their letter folder and their slashes (``bakery shop``). Other slashes
    are part of the name (Stanford Cars' ``Ram C/V Cargo Van Minivan 2012``) and stay."""
    if raw.startswith("/"):
        raw = raw.strip("/").split("/", 1)[-1].replace("/", " ")
    return " ".join(raw.replace("_", " ").split())


def class_names_from_feature(task: str, feature_names: Sequence[str], num_classes: int | None,
                             prompt_names: Sequence[Sequence[str]] | None) -> list[str]:
    """Prompt class names, in the dataset's label order, checked against its ``ClassLabel`` names.

    ``prompt_names``: optional ``[raw, prompt]`` pairs in label order. Label ``i`` matches pair ``i``
    when its name equals ``raw`` or ``prompt`` up to case and punctuation (mirrors spell names
    differently), so a mirror with another order or other classes is an error, not a silent mislabel.
    """
    names = [str(n) for n in feature_names]
    if num_classes is not None and len(names) != num_classes:
        raise ConfigError(f"task {task}: the dataset's label feature has {len(names)} classes, expected {num_classes}")
    if len(set(names)) != len(names):
        raise ConfigError(f"task {task}: the dataset's label feature has duplicate class names")
    if not prompt_names:
        return [prompt_name(n) for n in names]
    if len(prompt_names) != len(names):
        raise ConfigError(f"task {task}: {len(prompt_names)} prompt names for {len(names)} dataset classes")
    out = []
    for i, (feature, pair) in enumerate(zip(names, prompt_names)):
        raw, prompt = pair
        if _norm(feature) not in (_norm(raw), _norm(prompt)):
            raise ConfigError(f"task {task}: label {i} of the dataset is {feature!r}, expected {raw!r} ({prompt!r})")
        out.append(str(prompt))
    return out


def label_feature_names(data: Any, label_key: str, task: str) -> list[str]:
    """The class names of a ``datasets`` split's ``ClassLabel`` column."""
    feature = data.features.get(label_key) if hasattr(data, "features") else None
    names = getattr(feature, "names", None)
    if not names:
        raise ConfigError(f"task {task}: column {label_key!r} is not a ClassLabel feature with class names")
    return list(names)


def _reference_rows(name: str, paper_task: str, splits: Mapping[str, Any], names: Mapping[str, str],
                    test: Any, test_labels: list[int], image_key: str, test_order: str | None,
                    cache_dir: str | None) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """The authors' ``(validation rows of the test split or None, test rows, info)`` of one task.

    ``None`` validation rows: the dataset's own validation split is the validation set.
    """
    spec = reference_split(paper_task)
    info: dict[str, Any] = {"expected": {"validation": spec.validation, "test": spec.test}}
    n = len(test_labels)
    if spec.index_file is None:
        if names["validation"] not in splits:
            raise ConfigError(f"task {name}: the reference split uses the official validation split, and this dataset "
                              f"has none (splits: {', '.join(splits)}); load one that has it, e.g. {spec.mirror}")
        info["validation"] = f"the dataset's {names['validation']!r} split"
        return None, np.arange(n), info
    if n != spec.permutation_length:
        raise ConfigError(f"task {name}: the authors' permutation covers {spec.permutation_length} test images, this "
                          f"dataset's {names['test']!r} split has {n} (another mirror or revision?)")
    order = test_order or spec.test_order
    rows = authors_order(order, n, test_labels, file_names(test, image_key) if order != "dataset" else None, name)
    perm = load_permutation(fetch_index_file(spec.index_file, spec.sha256, cache_dir), spec.permutation_length)
    val_pos, test_pos = permutation_split(perm, VALIDATION_FRACTION)
    info.update(validation=f"the first {len(val_pos)} of the authors' permutation of the test split",
                test_order=order, index_file={"url": index_url(spec.index_file), "sha256": spec.sha256})
    return rows[val_pos], rows[test_pos], info


def task_from_splits(name: str, splits: Mapping[str, Any], *, template_set: str | None = None,
                     image_key: str = "image", label_key: str = "label", num_classes: int | None = None,
                     prompt_names: Sequence[Sequence[str]] | None = None, label_namespace: str | None = None,
                     split_names: Mapping[str, str] | None = None, split: str = "seeded",
                     validation_fraction: float = 0.2, seed: int = 0, paper_task: str | None = None,
                     test_order: str | None = None, cache_dir: str | None = None, max_train: int | None = None,
                     max_validation: int | None = None, max_test: int | None = None) -> ImageTask:
    """Build a task from loaded ``datasets`` splits (a ``DatasetDict`` or a plain mapping).

    ``split``: ``seeded`` or ``reference`` (module docstring). ``validation_fraction`` and ``seed``
    make the seeded split (``seed + 1`` also draws the ``max_*`` subsamples). Under ``reference``,
    ``paper_task`` names the paper's task (default: ``name``), ``test_order`` overrides the order
    the authors' permutation is applied in (``paper.TEST_ORDERS``), and the index files are cached
    under ``cache_dir``. The size checks apply before the ``max_*`` caps.
    """
    if split not in SPLIT_RULES:
        raise ConfigError(f"task {name}: split must be one of {', '.join(SPLIT_RULES)}, got {split!r}")
    names = {"train": "train", "validation": "validation", "test": "test", **(split_names or {})}
    for role in ("train", "test"):
        if names[role] not in splits:
            raise ConfigError(f"task {name}: the dataset has no {names[role]!r} split (has: {', '.join(splits)})")
    feature_names = label_feature_names(splits[names["test"]], label_key, name)
    for role in ("train", "validation"):
        if names[role] in splits and label_feature_names(splits[names[role]], label_key, name) != feature_names:
            raise ConfigError(f"task {name}: the {names[role]!r} and {names['test']!r} splits have different label features")
    class_names = class_names_from_feature(name, feature_names, num_classes, prompt_names)

    def columns(role: str) -> tuple[Any, list[int]]:
        data = splits[names[role]]
        if image_key not in data.column_names:
            raise ConfigError(f"task {name}: column {image_key!r} not in split {names[role]!r} (columns: {', '.join(data.column_names)})")
        return data.select_columns([image_key]), list(data[label_key])

    train, train_labels = columns("train")
    test, test_labels = columns("test")
    info: dict[str, Any] = {"split": split}
    if split == "reference":
        val_rows, test_rows, extra = _reference_rows(name, paper_task or name, splits, names, test, test_labels,
                                                     image_key, test_order, cache_dir)
        info.update(extra)
    elif names["validation"] in splits:
        val_rows, test_rows = None, np.arange(len(test_labels))
        info["validation"] = f"the dataset's {names['validation']!r} split"
    else:
        val_rows, test_rows = carve_split(len(test_labels), validation_fraction, seed)
        info["validation"] = f"a seeded {validation_fraction:g} of the test split (seed {seed})"
    if val_rows is None:
        val, val_labels = columns("validation")
        val_rows = np.arange(len(val_labels))
    else:
        val, val_labels = test, test_labels
    rows = {"train": np.arange(len(train_labels)), "validation": val_rows, "test": test_rows}
    info["full_sizes"] = {role: len(r) for role, r in rows.items()}
    expected = info.get("expected")
    if expected and any(info["full_sizes"][role] != size for role, size in expected.items()):
        found = ", ".join(f"{info['full_sizes'][role]} {role}" for role in expected)
        raise ConfigError(f"task {name}: the reference protocol expects {expected['validation']} validation and "
                          f"{expected['test']} test images, the data gives {found} (another mirror or revision?)")
    caps = {"train": max_train, "validation": max_validation, "test": max_test}
    sources = {"train": (train, train_labels), "validation": (val, val_labels), "test": (test, test_labels)}
    parts = {role: ImageSplit(sources[role][0], subsample(rows[role], caps[role], seed + 1), image_key, sources[role][1])
             for role in rows}
    info["sizes"] = {role: len(part) for role, part in parts.items()}
    namespace = label_namespace or name
    return ImageTask(name=name, class_names=class_names, templates=templates_for(template_set or name),
                     label_keys=[f"{namespace}/{c}" for c in class_names], info=info, **parts)


def hf_image_task(name: str, hf_path: str, hf_name: str | None = None, cache_dir: str | None = None,
                  revision: str | None = None, **options: Any) -> ImageTask:
    """Load ``hf_path`` (``load_dataset``, cached in ``cache_dir``) and build the task; see
    :func:`task_from_splits` for ``options`` (the reference split's index files share ``cache_dir``)."""
    import datasets

    try:
        data = datasets.load_dataset(hf_path, hf_name, cache_dir=cache_dir, revision=revision)
    except Exception as error:  # network, missing config and cache errors come in many types
        raise ConfigError(f"task {name}: cannot load dataset {hf_path!r} ({str(error).splitlines()[0]})") from None
    task = task_from_splits(name, data, cache_dir=cache_dir, **options)
    task.info["source"] = {"hf_path": hf_path, "hf_name": hf_name, "revision": revision}
    return task
