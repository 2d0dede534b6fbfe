"""Per-task accuracy and joint-task Hits@k from encoder features, CLIP-style.

Features of one model state are computed once per split (all tasks' inputs together, batched by
length) and then scored against each task's own class heads (per-task) and against the heads of the
joint label space (joint task), so both evaluations cost one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from knots.data.tasks import JointLabelSpace, TaskData
from knots.models.base import Backbone, encode

HITS_AT = (1, 3, 5)


@contextmanager
def applied(encoder: nn.Module, delta: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily add ``delta`` (``{"<module>.weight": dW}``) to the encoder's weights."""
    params = dict(encoder.named_parameters())
    missing = [k for k in delta if k not in params]
    if missing:
        raise KeyError(f"update for unknown parameter {missing[0]!r}")
    saved = {k: params[k].detach().clone() for k in delta}
    try:
        with torch.no_grad():
            for k, d in delta.items():
                params[k].add_(d.to(params[k].dtype).to(params[k].device))
        yield
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                params[k].copy_(w)


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
    def features(self, backbone: Backbone, desc: str | None = None) -> torch.Tensor:
        """L2-normalized ``(N, D)`` features of the encoder in its current state, in input order."""
        backbone.encoder.eval()
        out = torch.empty(len(self), backbone.feature_dim)
        batches = zip(self.chunks, self.batches)
        if desc:
            batches = tqdm(batches, total=len(self.batches), desc=desc, leave=False)
        for chunk, batch in batches:
            out[chunk] = encode(backbone, batch).float().cpu()
        return out


@dataclass
class Heads:
    """Class heads of every task and of the joint label space (all L2-normalized, frozen)."""

    per_task: dict[str, torch.Tensor]
    joint: torch.Tensor
    space: JointLabelSpace
    scale: float

    @classmethod
    def build(cls, backbone: Backbone, tasks: Sequence[TaskData]) -> Heads:
        per_task = {t.name: backbone.class_embeddings(t.class_names, t.templates).float().cpu() for t in tasks}
        space = JointLabelSpace.from_tasks(tasks)
        # a joint label shared by several tasks gets the normalized mean of their class embeddings
        joint = torch.stack([
            nn.functional.normalize(torch.stack([per_task[t][c] for t, c in members]).mean(0), dim=0)
            for members in space.members
        ])
        return cls(per_task=per_task, joint=joint, space=space, scale=backbone.logit_scale)

    def joint_labels(self, data: EvalSet) -> torch.Tensor:
        """The joint-space label of every example of ``data``."""
        out = torch.empty_like(data.labels)
        for name, sl in data.slices.items():
            out[sl] = torch.tensor(self.space.task_to_joint[name])[data.labels[sl]]
        return out


def hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = HITS_AT) -> dict[str, float]:
    """Percent of rows whose label is among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    found = top == labels[:, None]
    return {f"hits@{k}": 100.0 * found[:, :k].any(1).float().mean().item() for k in ks}


def score_features(feats: torch.Tensor, data: EvalSet, heads: Heads) -> dict:
    """Per-task accuracy (percent) and joint Hits@k (pooled and per task) of one model's features."""
    per_task = {}
    for name, sl in data.slices.items():
        pred = (feats[sl] @ heads.per_task[name].T).argmax(1)
        per_task[name] = 100.0 * (pred == data.labels[sl]).float().mean().item()
    joint_logits = heads.scale * feats @ heads.joint.T
    return {"per_task": per_task, "joint": joint_metrics(joint_logits, data, heads)}


def joint_metrics(joint_logits: torch.Tensor, data: EvalSet, heads: Heads) -> dict:
    labels = heads.joint_labels(data)
    out: dict = hits(joint_logits, labels)
    out["per_task"] = {name: hits(joint_logits[sl], labels[sl]) for name, sl in data.slices.items()}
    return out


def ensemble_scores(feats: Sequence[torch.Tensor], data: EvalSet, heads: Heads) -> dict:
    """The ensemble of finetuned models: per input, the prediction of the most confident model.

    ``feats[i]`` are model i's features of every input of ``data``. Confidence is the largest softmax
    probability over the label set being evaluated (the task's labels, or the joint label space).
    """
    per_task = {}
    for name, sl in data.slices.items():
        logits = torch.stack([heads.scale * f[sl] @ heads.per_task[name].T for f in feats])  # (M, n, C)
        pred = pick_most_confident(logits).argmax(1)
        per_task[name] = 100.0 * (pred == data.labels[sl]).float().mean().item()
    joint = pick_most_confident(torch.stack([heads.scale * f @ heads.joint.T for f in feats]))
    return {"per_task": per_task, "joint": joint_metrics(joint, data, heads)}


def pick_most_confident(logits: torch.Tensor) -> torch.Tensor:
    """``(M, n, C)`` logits of M models -> ``(n, C)``: per row, the logits of the most confident model."""
    conf = logits.softmax(-1).amax(-1)  # (M, n)
    best = conf.argmax(0)  # (n,)
    return logits[best, torch.arange(logits.shape[1])]


def summarize(scores: dict, normalizers: dict[str, float] | None) -> dict:
    """Add normalized accuracy and averages: the ``methods.<name>`` block of results.json."""
    per_task = {}
    for name, acc in scores["per_task"].items():
        entry = {"accuracy": acc}
        if normalizers is not None:
            entry["normalized_accuracy"] = 100.0 * acc / normalizers[name] if normalizers[name] > 0 else 0.0
        per_task[name] = entry
    out = {"per_task": per_task, "avg_accuracy": sum(e["accuracy"] for e in per_task.values()) / len(per_task)}
    if normalizers is not None:
        out["avg_normalized_accuracy"] = sum(e["normalized_accuracy"] for e in per_task.values()) / len(per_task)
    out["joint"] = scores["joint"]
    return out


def selection_score(summary: dict, metric: str) -> float:
    """The validation number a search maximizes."""
    if metric == "avg_normalized_accuracy":
        return summary["avg_normalized_accuracy"]
    if metric == "joint_hits@3":
        return summary["joint"]["hits@3"]
    raise ValueError(f"unknown selection metric {metric!r}")
