"""The task pool: the tasks of a run, their splits, evaluation sets, zero-shot heads and metrics.

Features of one model state are computed once per split (all tasks' inputs together, batched by
length) and then scored against each task's own head (per-task) and against the joint head (joint
task), so both evaluations cost one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from knots.data.build import build_task
from knots.data.sources import check_source
from knots.data.tasks import SPLITS, TaskData
from knots.heads import HeadSet
from knots.metrics import ENSEMBLE_RULES, accuracy, joint_hits
from knots.models.base import Backbone, to_device


class EvalSet:
    """One split of every task, concatenated, collated once into length-sorted batches."""

    def __init__(self, backbone: Backbone, tasks: Sequence[TaskData], split: str, batch_size: int) -> None:
        self.split = split
        self.task_names = [t.name for t in tasks]
        inputs, labels, self.slices = [], [], {}
        for t in tasks:
            examples = t.split(split)
            start = len(inputs)
            inputs.extend(x for x, _ in examples)
            labels.extend(y for _, y in examples)
            self.slices[t.name] = slice(start, len(inputs))
        self.labels = torch.tensor(labels, dtype=torch.long)
        order = sorted(range(len(inputs)), key=lambda i: backbone.sort_key(inputs[i]))
        self.chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.batches = [backbone.collate([inputs[i] for i in chunk]) for chunk in self.chunks]

    def __len__(self) -> int:
        return len(self.labels)

    @torch.no_grad()
    def features(self, backbone: Backbone, heads: HeadSet, desc: str | None = None) -> torch.Tensor:
        """Head inputs ``(N, D)`` (see ``HeadSet.prepare``) of the encoder in its current state, in input order."""
        backbone.encoder.eval()
        out = torch.empty(len(self), backbone.feature_dim)
        batches = zip(self.chunks, self.batches)
        if desc:
            batches = tqdm(batches, total=len(self.batches), desc=desc, leave=False)
        for chunk, batch in batches:
            out[chunk] = heads.prepare(backbone.encoder(to_device(batch, backbone.device))).float().cpu()
        return out

    def subset(self, names: Sequence[str]) -> EvalSet:
        """The examples of tasks ``names`` only (kept in this set's task order), from the batches
        already collated: each batch keeps its rows of those tasks (tensors and lists indexed along
        their first dimension), so nothing is decoded or tokenized again."""
        unknown = [n for n in names if n not in self.slices]
        if unknown:
            raise KeyError(f"no task {unknown[0]!r} in this evaluation set")
        kept = [n for n in self.task_names if n in names]
        position: dict[int, int] = {}
        slices = {}
        for name in kept:
            sl = self.slices[name]
            start = len(position)
            position.update((i, start + k) for k, i in enumerate(range(sl.start, sl.stop)))
            slices[name] = slice(start, len(position))
        out = object.__new__(EvalSet)
        out.split, out.task_names, out.slices = self.split, kept, slices
        out.labels = torch.cat([self.labels[self.slices[n]] for n in kept]) if kept else self.labels[:0]
        out.chunks, out.batches = [], []
        for chunk, batch in zip(self.chunks, self.batches):
            rows = [r for r, i in enumerate(chunk) if i in position]
            if not rows:
                continue
            index = torch.tensor(rows)
            out.chunks.append([position[chunk[r]] for r in rows])
            out.batches.append({k: v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == len(chunk)
                                else [v[r] for r in rows] if isinstance(v, list) and len(v) == len(chunk) else v
                                for k, v in batch.items()})
        return out

    def joint_labels(self, heads: HeadSet) -> torch.Tensor:
        """The joint-space label of every example."""
        assert heads.space is not None
        out = torch.empty_like(self.labels)
        for name, sl in self.slices.items():
            out[sl] = torch.tensor(heads.space.task_to_joint[name])[self.labels[sl]]
        return out


def score_features(feats: torch.Tensor, data: EvalSet, heads: HeadSet) -> dict[str, Any]:
    """Per-task accuracy with each task's own head, and joint Hits@k (None without a joint head)."""
    per_task = {name: accuracy(heads.per_task[name].logits(feats[sl]), data.labels[sl]) for name, sl in data.slices.items()}
    joint = None
    if heads.joint is not None:
        joint = joint_hits(heads.joint.logits(feats), data.joint_labels(heads), data.slices)
    return {"per_task": per_task, "joint": joint}


def ensemble_scores(feats: Sequence[torch.Tensor], data: EvalSet, heads: HeadSet, rule: str = "most_confident") -> dict[str, Any]:
    """The ensemble of finetuned models: ``feats[i]`` are model i's head inputs for every example.

    ``rule`` combines the models' logits over the label set being evaluated (the task's labels, or
    the joint label space): ``most_confident`` takes the logits of the model with the largest softmax
    probability, ``max_logit`` the element-wise maximum.
    """
    combine = ENSEMBLE_RULES[rule]
    per_task = {}
    for name, sl in data.slices.items():
        logits = torch.stack([heads.per_task[name].logits(f[sl]) for f in feats])  # (M, n, C)
        per_task[name] = accuracy(combine(logits), data.labels[sl])
    joint = None
    if heads.joint is not None:
        logits = combine(torch.stack([heads.joint.logits(f) for f in feats]))
        joint = joint_hits(logits, data.joint_labels(heads), data.slices)
    return {"per_task": per_task, "joint": joint}


@dataclass
class TaskPool:
    """The tasks of a run, in order."""

    tasks: list[TaskData]

    @classmethod
    def load(cls, benchmark: Any) -> TaskPool:
        """Check every data file first (a missing one fails before anything is read), then build the tasks."""
        names = benchmark.task_names
        for name in names:
            check_source(benchmark.tasks[name], name)
        return cls([build_task(name, benchmark.tasks[name]) for name in names])

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def zero_shot_heads(self, backbone: Backbone) -> HeadSet:
        """Heads built once by the frozen backbone from each task's class names and templates."""
        embeddings = {t.name: backbone.class_embeddings(t.class_names, t.templates).float().cpu() for t in self.tasks}
        return HeadSet.zero_shot(embeddings, self.tasks)

    def eval_sets(self, backbone: Backbone, batch_size: int, splits: Sequence[str] = ("validation", "test")) -> dict[str, EvalSet]:
        """Every task's examples of each split, collated once for repeated evaluation."""
        return {s: EvalSet(backbone, self.tasks, s, batch_size) for s in splits}

    def sizes(self) -> dict[str, dict[str, int]]:
        """Examples per task and split (for the run log and results.json)."""
        return {t.name: {s: len(t.split(s)) for s in SPLITS} for t in self.tasks}

    def split_info(self) -> dict[str, dict[str, Any]]:
        """Per task, how its splits were made (``TaskData.info``), with the sizes as used."""
        return {t.name: {**t.info, "sizes": {s: len(t.split(s)) for s in SPLITS}} for t in self.tasks}

    def row_counts(self) -> dict[str, dict[str, Any]]:
        """Per task: rows read, rows dropped (matching no class, repeated), examples per class (results.json)."""
        return {t.name: t.row_counts for t in self.tasks}

    def describe_splits(self) -> list[str]:
        """One line per task for the run log: the split sizes, where known their provenance, and the rows
        read (with those dropped for matching no class or repeating an input)."""
        lines = []
        for task, (name, info) in zip(self.tasks, self.split_info().items()):
            sizes = ", ".join(f"{n} {s}" for s, n in info["sizes"].items())
            origin = "; ".join(f"{role}: {info[role]}" for role in ("validation", "test") if isinstance(info.get(role), str))
            counts = f"; {describe_counts(task.row_counts)}" if task.row_counts else ""
            lines.append(f"task {name}: {sizes}" + (f" ({origin})" if origin else "") + counts)
        return lines


def describe_counts(counts: dict[str, Any]) -> str:
    """Rows read, what was dropped, examples per class (one phrase for the log)."""
    per_class = ", ".join(f"{name} {n}" for name, n in counts["per_class"].items())
    return (f"{counts['rows']} rows read, {counts['unmatched']} matching no class and {counts['repeated']} repeated "
            f"(dropped); examples per class: {per_class}")
