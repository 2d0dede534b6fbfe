"""The eight image classification tasks of the paper, read through Hugging Face ``datasets``.

Class names come from each dataset's own ``ClassLabel`` feature (in its label order), tidied for
prompts (``baseball_diamond`` -> ``baseball diamond``); where the standard prompts use descriptive
names instead (EuroSAT, GTSRB), ``prompt_names`` maps each label, and every mapping is checked
against the feature so that a reordered or different mirror fails loudly instead of mislabelling.

The builder returns a ``TaskSource`` holding the dataset's own splits as lazy pools; the pipeline
splits them with the task's ``split`` settings (``knots.data.splits``), like every other task.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


from knots.data.tasks import LabelledPool, LazyInput, TaskSource
from knots.errors import ConfigError
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
    """A label name as prompts use it: SUN397-style paths lose their letter folder, separators become spaces."""
    if raw.startswith("/"):  # "/b/bakery/shop" -> "bakery shop"
        raw = raw.strip("/").split("/", 1)[-1]
    return " ".join(raw.replace("/", " ").replace("_", " ").split())


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


def task_from_splits(name: str, splits: Mapping[str, Any], *, template_set: str | None = None,
                     image_key: str = "image", label_key: str = "label", num_classes: int | None = None,
                     prompt_names: Sequence[Sequence[str]] | None = None, label_namespace: str | None = None) -> TaskSource:
    """A task source from loaded ``datasets`` splits (a ``DatasetDict`` or a plain mapping): every split
    as a lazy pool, class names checked against the label features (equal in every split)."""
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
    pools = {split: LabelledPool(LazyImages(data.select_columns([image_key]), image_key), list(data[label_key]))
             for split, data in splits.items()}
    namespace = label_namespace or name
    return TaskSource(name=name, class_names=class_names, templates=templates_for(template_set or name), splits=pools,
                      label_keys=[f"{namespace}/{c}" for c in class_names])


def hf_image_task(name: str, hf_path: str, hf_name: str | None = None, cache_dir: str | None = None,
                  revision: str | None = None, **options: Any) -> TaskSource:
    """Load ``hf_path`` (``load_dataset``, cached in ``cache_dir``) and build the task; see
    :func:`task_from_splits` for ``options``."""
    import datasets

    try:
        data = datasets.load_dataset(hf_path, hf_name, cache_dir=cache_dir, revision=revision)
    except Exception as error:  # network, missing config and cache errors come in many types
        raise ConfigError(f"task {name}: cannot load dataset {hf_path!r} ({str(error).splitlines()[0]})") from None
    return task_from_splits(name, data, **options)
