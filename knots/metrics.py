"""Metrics of the task pool: per-task accuracy, joint-task Hits@k, normalized accuracy, selection scores.

All numbers are percentages. Logits come from :mod:`knots.heads`; nothing here computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

HITS_AT = (1, 3, 5)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of rows whose highest logit is the label."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = HITS_AT) -> dict[str, float]:
    """Percent of rows whose label is among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    found = top == labels[:, None]
    return {f"hits@{k}": 100.0 * found[:, :k].any(1).float().mean().item() for k in ks}


def joint_hits(logits: torch.Tensor, labels: torch.Tensor, slices: Mapping[str, slice]) -> dict[str, Any]:
    """Hits@k pooled over every row (sample-weighted) and per task."""
    out: dict[str, Any] = hits(logits, labels)
    out["per_task"] = {name: hits(logits[sl], labels[sl]) for name, sl in slices.items()}
    return out


def most_confident(logits: torch.Tensor) -> torch.Tensor:
    """``(M, n, C)`` logits of M models -> ``(n, C)``: per row, the logits of the most confident model
    (the largest softmax probability)."""
    conf = logits.softmax(-1).amax(-1)  # (M, n)
    best = conf.argmax(0)  # (n,)
    return logits[best, torch.arange(logits.shape[1])]


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """``(M, n, C)`` logits of M models -> ``(n, C)``: the element-wise maximum over models."""
    return logits.amax(0)


#: How an ensemble of finetuned models combines their logits.
ENSEMBLE_RULES = {"most_confident": most_confident, "max_logit": max_logit}


def summarize(scores: Mapping[str, Any], normalizers: Mapping[str, float] | None) -> dict[str, Any]:
    """Add normalized accuracy and averages: the ``methods.<name>`` block of results.json.

    ``scores["joint"]`` is carried over as it is: None where the joint task does not apply.
    """
    per_task = {}
    for name, acc in scores["per_task"].items():
        entry = {"accuracy": acc}
        if normalizers is not None:
            entry["normalized_accuracy"] = 100.0 * acc / normalizers[name] if normalizers[name] > 0 else 0.0
        per_task[name] = entry
    out: dict[str, Any] = {"per_task": per_task, "avg_accuracy": sum(e["accuracy"] for e in per_task.values()) / len(per_task)}
    if normalizers is not None:
        out["avg_normalized_accuracy"] = sum(e["normalized_accuracy"] for e in per_task.values()) / len(per_task)
    out["joint"] = scores["joint"]
    return out


def selection_score(summary: Mapping[str, Any], metric: str) -> float:
    """The validation number a search maximizes."""
    if metric == "avg_normalized_accuracy":
        return summary["avg_normalized_accuracy"]
    if metric == "joint_hits@3":
        if summary["joint"] is None:
            raise ValueError("joint_hits@3 is not defined: the joint task does not apply to these heads")
        return summary["joint"]["hits@3"]
    raise ValueError(f"unknown selection metric {metric!r}")
