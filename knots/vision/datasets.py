"""The eight image classification tasks of the paper, read through Hugging Face ``datasets``.

Class names come from each dataset's own ``ClassLabel`` feature (in its label order), tidied for
prompts (``baseball_diamond`` -> ``baseball diamond``); where the standard prompts use descriptive
names instead (EuroSAT, GTSRB), ``prompt_names`` maps each label, and every mapping is checked
against the feature so that a reordered or different mirror fails loudly instead of mislabelling.

The builder returns a ``TaskSource`` holding lazy pools; the pipeline splits them with the task's
``split`` settings (``knots.data.splits``), like every other task. Which pools:

- by default, the dataset's own splits (``train``, ``test`` and ``validation`` where it has one);
- with ``reference_split``, the authors' splits (:mod:`knots.vision.paper`) as ``train``,
  ``validation`` and ``test``, which the task's ``split.source_splits`` then maps one to one. Cars,
  GTSRB, MNIST, SUN397 and SVHN take validation and test from the dataset's test split with the
  authors' fixed permutation (the first ``int(0.2 n)`` indices are validation, the rest test;
  :mod:`knots.vision.reference_split`); DTD, EuroSAT and RESISC45 use the dataset's own validation
  split. The official sizes are checked: another size is a one-line error.

``TaskSource.info`` says where the pools came from (the dataset, and under ``reference_split`` the
rule, the expected sizes, the row order and the index file); it reaches the run log and results.json.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from knots.data.tasks import LabelledPool, LazyInput, TaskSource
from knots.errors import ConfigError
from knots.vision import paper
from knots.vision.reference_split import (authors_order, fetch_index_file, file_names, index_url, load_permutation,
                                          permutation_split)
from knots.vision.templates import templates_for


@dataclass(frozen=True)
class LazyImage(LazyInput):
    """One image of a ``datasets.Dataset``, decoded only when the backbone preprocesses it."""

    data: Any
    index: int
    key: str

    def load(self) -> Any:
        return self.data[self.index][self.key]


class LazyImages(Sequence):
    """Every image of a ``datasets.Dataset`` column as a :class:`LazyImage` (nothing decoded)."""

    def __init__(self, data: Any, image_key: str) -> None:
        self.data, self.image_key = data, image_key

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> LazyImage:  # type: ignore[override]
        return LazyImage(self.data, int(i), self.image_key)


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


def _pool(data: Any, image_key: str, label_key: str) -> LabelledPool:
    return LabelledPool(LazyImages(data.select_columns([image_key]), image_key), list(data[label_key]))


def reference_pools(name: str, splits: Mapping[str, Any], *, image_key: str = "image", label_key: str = "label",
                    paper_task: str | None = None, split_names: Mapping[str, str] | None = None,
                    test_order: str | None = None, cache_dir: str | None = None) -> tuple[dict[str, LabelledPool], dict[str, Any]]:
    """The authors' ``train`` / ``validation`` / ``test`` pools of one task, and how they were made.

    ``paper_task``: the paper's task name (default ``name``); ``split_names``: the dataset's names of
    the roles where they differ; ``test_order``: overrides the row order the permutation indexes
    (``paper.TEST_ORDERS``); the index files are cached under ``cache_dir``. Sizes are checked
    against the official ones.
    """
    spec = paper.reference_split(paper_task or name)
    names = {"train": "train", "validation": "validation", "test": "test", **(split_names or {})}
    for role in ("train", "test"):
        if names[role] not in splits:
            raise ConfigError(f"task {name}: the dataset has no {names[role]!r} split (splits: {', '.join(splits)})")
    train = _pool(splits[names["train"]], image_key, label_key)
    info: dict[str, Any] = {"split": "reference", "expected": {"validation": spec.validation, "test": spec.test}}
    if spec.index_file is None:
        if names["validation"] not in splits:
            raise ConfigError(f"task {name}: the reference split uses the official validation split, and this dataset "
                              f"has none (splits: {', '.join(splits)}); load one that has it, e.g. {spec.mirror}")
        validation = _pool(splits[names["validation"]], image_key, label_key)
        test = _pool(splits[names["test"]], image_key, label_key)
        info.update(validation=f"the dataset's {names['validation']!r} split", test=f"the dataset's {names['test']!r} split")
    else:
        data = splits[names["test"]]
        n = len(data)
        if n != spec.permutation_length:
            raise ConfigError(f"task {name}: the authors' permutation covers {spec.permutation_length} test images, this "
                              f"dataset's {names['test']!r} split has {n} (another mirror or revision?)")
        full = _pool(data, image_key, label_key)
        order = test_order or spec.test_order
        rows = authors_order(order, n, full.labels, file_names(data, image_key) if order != "dataset" else None, name)
        perm = load_permutation(fetch_index_file(spec.index_file, spec.sha256, cache_dir), spec.permutation_length)
        val_positions, test_positions = permutation_split(perm, paper.VALIDATION_FRACTION)
        validation, test = full.subset(rows[val_positions].tolist()), full.subset(rows[test_positions].tolist())
        info.update(validation=f"the first {len(validation)} of the authors' permutation of the {names['test']!r} split",
                    test=f"the other {len(test)} of that permutation", test_order=order,
                    index_file={"url": index_url(spec.index_file), "sha256": spec.sha256})
    found = {"validation": len(validation), "test": len(test)}
    if found != info["expected"]:
        raise ConfigError(f"task {name}: the reference protocol expects {spec.validation} validation and {spec.test} test "
                          f"images, the data gives {found['validation']} validation, {found['test']} test "
                          f"(another mirror or revision?)")
    return {"train": train, "validation": validation, "test": test}, info


def task_from_splits(name: str, splits: Mapping[str, Any], *, template_set: str | None = None,
                     image_key: str = "image", label_key: str = "label", num_classes: int | None = None,
                     prompt_names: Sequence[Sequence[str]] | None = None, label_namespace: str | None = None,
                     reference_split: bool = False, paper_task: str | None = None,
                     split_names: Mapping[str, str] | None = None, test_order: str | None = None,
                     cache_dir: str | None = None) -> TaskSource:
    """A task source from loaded ``datasets`` splits (a ``DatasetDict`` or a plain mapping): every split
    as a lazy pool, or with ``reference_split`` the authors' three (:func:`reference_pools`, which the
    remaining options configure); class names checked against the label features (equal in every split)."""
    if not splits:
        raise ConfigError(f"task {name}: the dataset has no splits")
    first = next(iter(splits))
    feature_names = label_feature_names(splits[first], label_key, name)
    for split, data in splits.items():
        if label_feature_names(data, label_key, name) != feature_names:
            raise ConfigError(f"task {name}: the {split!r} and {first!r} splits have different label features")
        if image_key not in data.column_names:
            raise ConfigError(f"task {name}: column {image_key!r} not in split {split!r} (columns: {', '.join(data.column_names)})")
    class_names = class_names_from_feature(name, feature_names, num_classes, prompt_names)
    if reference_split:
        pools, info = reference_pools(name, splits, image_key=image_key, label_key=label_key, paper_task=paper_task,
                                      split_names=split_names, test_order=test_order, cache_dir=cache_dir)
    else:
        unused = [k for k, v in (("paper_task", paper_task), ("split_names", split_names), ("test_order", test_order)) if v]
        if unused:
            raise ConfigError(f"task {name}: {', '.join(unused)} applies only with reference_split: true")
        pools, info = {split: _pool(data, image_key, label_key) for split, data in splits.items()}, {"split": "dataset"}
    namespace = label_namespace or name
    return TaskSource(name=name, class_names=class_names, templates=templates_for(template_set or name), splits=pools,
                      label_keys=[f"{namespace}/{c}" for c in class_names], info=info)


def hf_image_task(name: str, hf_path: str, hf_name: str | None = None, cache_dir: str | None = None,
                  revision: str | None = None, **options: Any) -> TaskSource:
    """Load ``hf_path`` (``load_dataset``, cached in ``cache_dir``) and build the task; see
    :func:`task_from_splits` for ``options`` (the reference split's index files share ``cache_dir``)."""
    import datasets

    try:
        data = datasets.load_dataset(hf_path, hf_name, cache_dir=cache_dir, revision=revision)
    except Exception as error:  # network, missing config and cache errors come in many types
        raise ConfigError(f"task {name}: cannot load dataset {hf_path!r} ({str(error).splitlines()[0]})") from None
    source = task_from_splits(name, data, cache_dir=cache_dir, **options)
    source.info["dataset"] = {"hf_path": hf_path, "hf_name": hf_name, "revision": revision}
    return source
