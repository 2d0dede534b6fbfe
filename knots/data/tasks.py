"""Tasks as the pipeline sees them: labelled examples, class names and prompt templates.

Modality-agnostic: an input is whatever the backbone's ``collate`` accepts (``str``, PIL image, ...).
The joint label space of a task set is derived from the tasks' ``label_keys``; it is never written
by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: One labelled example: (input, class index within its task).
Example = tuple[Any, int]

SPLITS = ("train", "validation", "test")


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
    """

    name: str
    class_names: list[str]
    templates: list[str]
    train: Sequence[Example]
    validation: Sequence[Example]
    test: Sequence[Example]
    label_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.label_keys:
            self.label_keys = [f"{self.name}/{c}" for c in self.class_names]
        if len(self.label_keys) != len(self.class_names):
            raise ValueError(f"task {self.name}: {len(self.label_keys)} label keys for {len(self.class_names)} classes")
        if len(set(self.label_keys)) != len(self.label_keys):
            raise ValueError(f"task {self.name}: duplicate label keys")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

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
