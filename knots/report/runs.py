"""Finding runs' ``results.json``, grouping runs that differ only by seed, and averaging them.

A run directory holds ``results.json`` (and, from Hydra, ``.hydra/overrides.yaml``). A multirun
directory holds numbered job directories; a job with ``.hydra/`` but no ``results.json`` failed.
Runs are grouped by benchmark, model, tasks and their overrides other than seeds (an override whose
key is ``seed`` or ends in ``.seed`` or ``_seed``); a run without ``overrides.yaml`` is its own group,
since nothing says which settings it shares with another.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from knots.errors import KnotsError

Key = tuple[str, ...]


@dataclass(frozen=True)
class Run:
    path: Path
    results: dict[str, Any]
    overrides: tuple[str, ...] | None

    @property
    def meta(self) -> dict[str, Any]:
        return self.results.get("meta", {})

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.results["finetuned"])


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def read_overrides(run_dir: Path) -> tuple[str, ...] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as error:
        raise KnotsError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    return tuple(str(item) for item in items)


def read_run(run_dir: Path) -> Run:
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise KnotsError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(results, dict) or not isinstance(results.get("finetuned"), dict) or not isinstance(results.get("methods"), dict):
        raise KnotsError(f"{path}: not a knots-run results.json (needs 'finetuned' and 'methods')")
    return Run(run_dir, results, read_overrides(run_dir))


def find_runs(paths: Sequence[Path]) -> tuple[list[Run], list[Path]]:
    """Every run under ``paths`` (run directories or multirun directories), and the failed jobs."""
    runs, failed = [], []
    for path in paths:
        if not path.is_dir():
            raise KnotsError(f"{path}: not a directory")
        if (path / "results.json").is_file():
            runs.append(read_run(path))
            continue
        found = False
        for job in sorted((p for p in path.iterdir() if p.is_dir()), key=_job_order):
            if (job / "results.json").is_file():
                runs.append(read_run(job))
                found = True
            elif (job / ".hydra").is_dir():
                failed.append(job)
                found = True
        if not found:
            raise KnotsError(f"{path}: no results.json here or in its job directories (expected a knots-run output or a multirun directory)")
    return runs, failed


def job_labels(paths: Sequence[Path]) -> dict[Path, str]:
    """Each job's label: its overrides that differ across ``paths`` (else its directory's name)."""
    overrides = {path: read_overrides(path) or () for path in paths}
    common = set.intersection(*(set(o) for o in overrides.values())) if len(paths) > 1 else set()
    return {path: " ".join(o for o in items if o not in common) or path.name for path, items in overrides.items()}


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_seed(override: str) -> bool:
    key = override_key(override)
    return re.search(r"(^|[._])seed$", key) is not None


@dataclass(frozen=True)
class Stat:
    """A number over runs: mean, sample standard deviation (``None`` for one run) and the run count.

    ``mean`` is ``None`` when the number does not apply (e.g. ``"joint": null``) in any run.
    """

    mean: float | None
    std: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "Stat":
        if not values or any(v is None for v in values):
            return cls(None, None, len(values))
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        return cls(mean, std, len(values))


def flatten(results: dict[str, Any]) -> dict[Key, float | None]:
    """Every number of a results.json under a key path; a ``null`` section is kept as ``None``."""
    out: dict[Key, float | None] = {}

    def walk(prefix: Key, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk((*prefix, str(key)), value)
        elif node is None or (isinstance(node, (int, float)) and not isinstance(node, bool)):
            out[prefix] = None if node is None else float(node)

    walk(("finetuned",), results["finetuned"])
    walk(("methods",), results["methods"])
    accuracies = [out.get(("finetuned", t, "test_accuracy")) for t in results["finetuned"]]
    out[("finetuned", "avg", "test_accuracy")] = None if None in accuracies or not accuracies else sum(accuracies) / len(accuracies)
    out.update(analysis_numbers(results.get("analyses") or {}))
    return out


def analysis_numbers(analyses: dict[str, Any]) -> dict[Key, float | None]:
    """The numbers the report tabulates from the ``analyses`` block: per CKA view, each task's mean CKA
    with the other tasks and the mean over pairs; per scaling method and size n, the mean over subsets
    and the half-width of its confidence interval."""
    out: dict[Key, float | None] = {}
    cka = analyses.get("cka")
    if isinstance(cka, dict) and isinstance(cka.get("views"), dict):
        tasks = cka.get("tasks", [])
        for view, matrix in cka["views"].items():
            for i, task in enumerate(tasks):
                others = [row[i] for j, row in enumerate(matrix) if j != i and row[i] is not None]
                out[("analyses", "cka", view, task)] = sum(others) / len(others) if others else None
            out[("analyses", "cka", view, "avg")] = (cka.get("mean_pairwise") or {}).get(view)
    scaling = analyses.get("scaling")
    if isinstance(scaling, dict) and isinstance(scaling.get("methods"), dict):
        for method, points in scaling["methods"].items():
            for point in points:
                n = str(point["n"])
                out[("analyses", "scaling", method, n, "mean")] = point["mean"]
                low, high = point.get("low"), point.get("high")
                out[("analyses", "scaling", method, n, "half")] = None if low is None or high is None else (high - low) / 2
    return out


@dataclass
class RunGroup:
    """Runs of one setting (they differ at most by seed), with every number averaged over them."""

    label: str
    runs: list[Run]
    seeds: list[str]
    benchmark: str | None
    model: str | None
    tasks: list[str]
    methods: list[str]
    stats: dict[Key, Stat] = field(default_factory=dict)

    def get(self, *key: str) -> Stat:
        """The number at ``key``; n/a (mean ``None``) when it, or a section above it, is null or missing."""
        if key in self.stats:
            return self.stats[key]
        return Stat(None, None, len(self.runs))

    @property
    def description(self) -> str:
        if len(self.runs) == 1:
            return "one run"
        return f"mean ± std over {len(self.runs)} runs" + (f" ({', '.join(self.seeds)})" if self.seeds else "")


def _build_group(label: str, runs: list[Run]) -> RunGroup:
    flats = [flatten(run.results) for run in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    stats = {key: Stat.of([flat.get(key) for flat in flats]) for key in keys}
    methods = list(dict.fromkeys(m for run in runs for m in run.results["methods"]))
    seeds = sorted({o for run in runs for o in run.overrides or () if is_seed(o)}, key=lambda o: (override_key(o), o))
    meta = runs[0].meta
    return RunGroup(label, runs, seeds, meta.get("benchmark"), meta.get("model"), list(runs[0].tasks), methods, stats)


def group_runs(runs: Sequence[Run]) -> list[RunGroup]:
    """Group runs that share benchmark, model, tasks and non-seed overrides; label groups by what differs."""
    groups: dict[Any, list[Run]] = {}
    for run in runs:
        settings = None if run.overrides is None else frozenset(o for o in run.overrides if not is_seed(o))
        key = (run.meta.get("benchmark"), run.meta.get("model"), run.tasks, settings if settings is not None else str(run.path))
        groups.setdefault(key, []).append(run)
    settings_of = {key: (set(key[3]) if isinstance(key[3], frozenset) else set()) for key in groups}
    common = set.intersection(*settings_of.values()) if len(groups) > 1 else set().union(*settings_of.values())
    out = []
    for key, members in groups.items():
        differing = sorted(settings_of[key] - common)
        label = ""
        if len(groups) > 1:
            label = str(members[0].path) if isinstance(key[3], str) else " ".join(differing) or f"{key[0]} / {key[1]}"
        out.append(_build_group(label, members))
    return out
