"""The paper's numbers (``paper_numbers.yaml``, one file citing its tables) and which runs they apply to."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_FILE = Path(__file__).with_name("paper_numbers.yaml")


def _canonical(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class PaperBenchmark:
    """One of the paper's settings: its tasks, model names, and numbers per table."""

    id: str
    name: str
    tasks: tuple[str, ...]
    models: tuple[str, ...]
    finetuned: dict[str, Any] = field(default_factory=dict)
    per_task: dict[str, Any] = field(default_factory=dict)
    joint: dict[str, Any] = field(default_factory=dict)

    def matches(self, tasks: Sequence[str], model: str | None) -> bool:
        """Same task set and a known name of the same model."""
        return set(tasks) == set(self.tasks) and model is not None and _canonical(model) in {_canonical(m) for m in self.models}

    def normalized(self, method: str, task: str | None = None) -> float | None:
        """The paper's normalized accuracy of ``method`` on ``task`` (``None``: the average)."""
        entry = self.per_task.get("methods", {}).get(method, {})
        return entry.get("average") if task is None else entry.get("per_task", {}).get(task)

    def hits(self, method: str, k: str) -> float | None:
        return self.joint.get("methods", {}).get(method, {}).get(k)

    def finetuned_accuracy(self, task: str | None = None) -> float | None:
        accuracies = self.finetuned.get("test_accuracy", {})
        if task is not None:
            return accuracies.get(task)
        return sum(accuracies[t] for t in self.tasks) / len(self.tasks) if set(self.tasks) <= set(accuracies) else None


@dataclass(frozen=True)
class PaperNumbers:
    citation: str
    benchmarks: tuple[PaperBenchmark, ...]
    notes: tuple[str, ...]

    def find(self, tasks: Sequence[str], model: str | None) -> PaperBenchmark | None:
        return next((b for b in self.benchmarks if b.matches(tasks, model)), None)


@functools.cache
def load_paper_numbers(path: Path = DATA_FILE) -> PaperNumbers:
    data = yaml.safe_load(path.read_text())
    benchmarks = tuple(
        PaperBenchmark(
            id=b["id"], name=b["name"], tasks=tuple(b["tasks"]), models=tuple(b["models"]),
            finetuned=b.get("finetuned", {}), per_task=b.get("per_task", {}), joint=b.get("joint", {}),
        )
        for b in data["benchmarks"]
    )
    return PaperNumbers(citation=" ".join(data["paper"].split()), benchmarks=benchmarks, notes=tuple(" ".join(n.split()) for n in data.get("notes", [])))
