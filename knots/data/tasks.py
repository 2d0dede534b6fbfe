"""Tasks as the pipeline sees them: labelled examples, class names and prompt templates.

Modality-agnostic: an input is whatever the backbone's ``collate`` accepts (``str``, PIL image, ...).
The joint label space of a task set is derived from the tasks' ``label_keys``; it is never written
by hand.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

#: One labelled example: (input, class index within its task).
Example = tuple[Any, int]

SPLITS = ("train", "validation", "test")


class LazyInput(ABC):
    """An input read only when a batch needs it (e.g. an image decoded from a dataset on demand).

    Caches key on its ``identity()`` if it defines one (plain data naming the input, e.g. a dataset
    fingerprint and a row index), else on its dataclass fields, else on the loaded input
    (:mod:`knots.data.digest`).
    """

    @abstractmethod
    def load(self) -> Any:
        """The input itself."""


def materialize(x: Any) -> Any:
    """The input itself: lazy inputs are loaded, others returned as they are."""
    return x.load() if isinstance(x, LazyInput) else x


class LabelledPool(Sequence):
    """Labelled examples whose labels are known without reading the inputs (which may be lazy).

    ``pool[i]`` is ``(input, label)``; ``labels`` holds every label; ``subset(positions)`` is a view in
    the given order. Splitting (``knots.data.splits``) only ever looks at ``labels``.
    """

    def __init__(self, inputs: Sequence[Any], labels: Sequence[int], positions: Sequence[int] | None = None) -> None:
        self._inputs = inputs
        self._all_labels = [int(y) for y in labels]
        self._positions = list(range(len(self._all_labels))) if positions is None else [int(p) for p in positions]
        self.labels = [self._all_labels[p] for p in self._positions]

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> LabelledPool:
        return cls([x for x, _ in examples], [y for _, y in examples])

    @classmethod
    def concat(cls, pools: Sequence[LabelledPool]) -> LabelledPool:
        """One pool holding every example of ``pools``, in order."""
        return cls([x for pool in pools for x, _ in pool], [y for pool in pools for y in pool.labels])

    def subset(self, positions: Sequence[int]) -> LabelledPool:
        return LabelledPool(self._inputs, self._all_labels, [self._positions[p] for p in positions])

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        p = self._positions[i]
        return self._inputs[p], self._all_labels[p]

    def __iter__(self) -> Iterator[Example]:
        for p in self._positions:
            yield self._inputs[p], self._all_labels[p]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


@dataclass
class TaskSource:
    """What a task builder (``source: task``) returns: the task's classes and its own named splits.

    The pipeline turns it into a :class:`TaskData` with the task's ``split`` settings, exactly as for
    tasks read from files, so every task is split by the same code. ``info`` says where the splits
    came from (plain JSON data: the dataset, a fixed split's rule and expected sizes...); it is
    carried to ``TaskData.info``, the run log and results.json.
    """

    name: str
    class_names: list[str]
    templates: list[str]
    splits: dict[str, LabelledPool]
    label_keys: list[str] = field(default_factory=list)
    class_mask: list[bool] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskData:
    """One classification task, split into train / validation / test.

    Attributes:
        name: task identifier (unique within a task set).
        class_names: per class, the text put into the templates (a label description).
        templates: prompt templates with one ``{}`` for the class name, e.g. ``"a photo of a {}."``.
        label_keys: per class, an identity key; classes of different tasks with the same key are
            one class of the joint label space (e.g. ``digit/3`` for MNIST and SVHN). Defaults to
            ``"<task>/<class name>"``: no sharing unless asked for.
        train, validation, test: sequences of ``(input, label)``; may be lazy.
        class_mask: per class, whether the task has it (None: all). A task inside a shared label
            space that lacks some classes (a two-class task in a three-way space) masks them out of
            its logits, in training and evaluation.
        row_counts: what reading the task found (for the log and results.json): ``rows`` read,
            rows that match no class (``unmatched``) and ``repeated`` inputs, both dropped, and the
            examples ``per_class`` before splitting.
        info: how the splits were made (plain JSON data, e.g. a builder's ``TaskSource.info`` and the
            sizes of the source's splits before any cap); reported in the run log and results.json.
    """

    name: str
    class_names: list[str]
    templates: list[str]
    train: Sequence[Example]
    validation: Sequence[Example]
    test: Sequence[Example]
    label_keys: list[str] = field(default_factory=list)
    class_mask: list[bool] | None = None
    row_counts: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.label_keys:
            self.label_keys = [f"{self.name}/{c}" for c in self.class_names]
        if len(self.label_keys) != len(self.class_names):
            raise ValueError(f"task {self.name}: {len(self.label_keys)} label keys for {len(self.class_names)} classes")
        if len(set(self.label_keys)) != len(self.label_keys):
            raise ValueError(f"task {self.name}: duplicate label keys")
        if self.class_mask is not None and len(self.class_mask) != len(self.class_names):
            raise ValueError(f"task {self.name}: class_mask has {len(self.class_mask)} entries for {len(self.class_names)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def digest(self) -> str:
        """sha256 of the resolved rows (inputs and labels of every split): what caches are keyed on
        (see :mod:`knots.data.digest`; lazy inputs count by a stable identity, without being read)."""
        from knots.data.digest import task_digest

        return task_digest({name: self.split(name) for name in SPLITS})

    def split(self, name: str) -> Sequence[Example]:
        """The examples of split ``name`` (one of ``SPLITS``)."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


@dataclass(frozen=True)
class JointLabelSpace:
    """The union of the labels of several tasks; equal label keys share one index.

    Attributes:
        keys: the joint labels, in order of first appearance over the tasks.
        task_to_joint: per task name, the joint index of each of its classes.
        members: per joint index, the (task name, class index) pairs that map to it.
    """

    keys: list[str]
    task_to_joint: dict[str, list[int]]
    members: list[list[tuple[str, int]]]

    @classmethod
    def from_tasks(cls, tasks: Sequence[TaskData]) -> JointLabelSpace:
        index: dict[str, int] = {}
        members: list[list[tuple[str, int]]] = []
        task_to_joint: dict[str, list[int]] = {}
        for task in tasks:
            ids = []
            for c, key in enumerate(task.label_keys):
                if key not in index:
                    index[key] = len(members)
                    members.append([])
                members[index[key]].append((task.name, c))
                ids.append(index[key])
            task_to_joint[task.name] = ids
        return cls(keys=list(index), task_to_joint=task_to_joint, members=members)

    def __len__(self) -> int:
        return len(self.keys)
