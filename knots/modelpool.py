"""The model pool: the backbone, and one adapter per task (finetuned and cached, or given).

An adapter is a PEFT LoRA directory. With trained heads it also holds the task's head, saved by PEFT as
a ``modules_to_save`` module (``base_model.model.<module>.weight``, and ``.bias`` if any), which is read
back here and checked against the task's classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knots.data.tasks import TaskData
from knots.errors import AdapterError, ConfigError
from knots.heads import Head, HeadSet, class_mask
from knots.lora import PEFT_PREFIX, load_adapter, read_weights
from knots.methods.base import TaskAdapter
from knots.models import build_backbone
from knots.models.base import Backbone
from knots.pipeline.finetune import TrainedHeadSpec, TrainingHead


def read_trained_head(path: str | Path, module: str, task: TaskData) -> Head:
    """The head a PEFT adapter saved as ``modules_to_save`` module ``module``, checked against ``task``."""
    weights = read_weights(Path(path))
    prefix = f"{PEFT_PREFIX}{module}."
    weight = weights.get(f"{prefix}weight")
    if weight is None:
        raise AdapterError(f"{path}: no trained head {module!r} ({prefix}weight) in the adapter")
    if weight.dim() != 2 or weight.shape[0] != task.num_classes:
        raise AdapterError(f"{path}: head {module!r} has shape {tuple(weight.shape)}, but task {task.name} has "
                           f"{task.num_classes} classes")
    bias = weights.get(f"{prefix}bias")
    return Head(weight.float(), None if bias is None else bias.float(), 1.0, class_mask(task))


@dataclass
class ModelPool:
    """The backbone (on its device), the LoRA settings and the kind of per-task heads."""

    backbone: Backbone
    settings: Any  # ModelConfig

    @classmethod
    def build(cls, cfg: Any, device: str) -> ModelPool:
        if str(device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():  # before loading (or downloading) any weights
                raise ConfigError(f"device {device!r} is not available (no CUDA device); set device=cpu")
        backbone = build_backbone(cfg)
        if getattr(backbone, "dispatched", False):  # placed by the backbone's own device_map
            return cls(backbone, cfg)
        try:
            backbone.encoder.to(device)
        except (RuntimeError, AssertionError) as error:  # an unavailable device
            raise ConfigError(f"device {device!r} is not available ({str(error).splitlines()[0]})") from None
        return cls(backbone, cfg)

    @property
    def trains_heads(self) -> bool:
        return self.settings.head.kind == "trained"

    def check_tasks(self, tasks: Sequence[TaskData]) -> None:
        """With ``head.num_labels``: every task has that many classes in one label space shared by all
        (equal label keys, in head order), and masks exactly the classes none of its training examples
        has. One-line ``ConfigError`` otherwise, before any training."""
        n = self.settings.head.num_labels
        if n is None:
            return
        first = tasks[0]
        for task in tasks:
            if task.num_classes != n:
                raise ConfigError(f"task {task.name} has {task.num_classes} classes, but model.head.num_labels is {n}: "
                                  "a task lacking classes of the shared label space declares them masked")
            if task.label_keys != first.label_keys:
                raise ConfigError(f"task {task.name}: label keys {task.label_keys} differ from task {first.name}'s "
                                  f"{first.label_keys}; with model.head.num_labels the tasks share one label space")
            labels = getattr(task.train, "labels", None)
            present = set(labels if labels is not None else (y for _, y in task.train))
            valid = task.class_mask or [True] * n
            absent = [c for i, c in enumerate(task.class_names) if valid[i] and i not in present]
            if absent:
                raise ConfigError(f"task {task.name}: no training example has class {absent[0]!r}; "
                                  "a class the task does not have must be masked")
            clash = [c for i, c in enumerate(task.class_names) if not valid[i] and i in present]
            if clash:
                raise ConfigError(f"task {task.name}: class {clash[0]!r} is masked but training examples have it")

    def training_head(self, task: TaskData, zero_shot: HeadSet | None, seed: int) -> TrainingHead:
        """What finetuning trains ``task`` against: its zero-shot head, or a fresh trained head."""
        if not self.trains_heads:
            assert zero_shot is not None
            return zero_shot.per_task[task.name]
        head = self.settings.head
        return TrainedHeadSpec(module=head.module, num_classes=task.num_classes, bias=head.bias, seed=seed, mask=class_mask(task))

    def load(self, task: TaskData, path: str | Path, info: Mapping[str, Any] | None = None) -> TaskAdapter:
        """A task's adapter (and trained head) from its PEFT directory."""
        head = read_trained_head(path, self.settings.head.module, task) if self.trains_heads else None
        if head is not None and head.weight.shape[1] != self.backbone.feature_dim:
            raise AdapterError(f"{path}: head {self.settings.head.module!r} takes {head.weight.shape[1]} features, "
                               f"but model {self.backbone.name} gives {self.backbone.feature_dim}")
        return TaskAdapter(task=task.name, path=str(path), adapter=load_adapter(path, name=task.name), head=head, info=dict(info or {}))

    def heads(self, tasks: Sequence[TaskData], adapters: Sequence[TaskAdapter], zero_shot: HeadSet | None) -> HeadSet:
        """The heads merged models are evaluated with: zero-shot ones, or each task's trained head."""
        if not self.trains_heads:
            assert zero_shot is not None
            return zero_shot
        return HeadSet.trained({a.task: a.head for a in adapters}, tasks)  # type: ignore[misc]


def given_adapters(spec: Any, tasks: Sequence[str], cache_dir: str) -> dict[str, Path]:
    """Task -> adapter directory from ``adapters.paths`` or the instantiated ``adapters.loader``."""
    if spec.paths:
        found = {k: Path(v) for k, v in spec.paths.items()}
    else:
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            loaded = instantiate(spec.loader, tasks=list(tasks), cache_dir=cache_dir, _convert_="all")
        except InstantiationException as error:
            cause = error.__cause__
            if isinstance(cause, (ConfigError, AdapterError)):
                raise cause from None
            raise ConfigError(f"adapters.loader failed ({str(cause or error).splitlines()[0]})") from None
        found = {k: Path(v) for k, v in loaded.items()}
    missing = [n for n in tasks if n not in found]
    if missing:
        raise ConfigError(f"adapters: no adapter for task {missing[0]!r}")
    return {n: found[n] for n in tasks}


__all__ = ["ModelPool", "given_adapters", "read_trained_head"]
