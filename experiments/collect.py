"""Collect a ``knots-run -m`` sweep into one comparison table (markdown and LaTeX).

Usage: ``python -m experiments.collect <multirun dir> [--out DIR]``

Every job directory holding a ``results.json`` gives one row per method, labelled by the job's
overrides (from ``.hydra/overrides.yaml``); jobs without results are listed as failed, with the path of
their scheduler log when the sweep ran through a submitit launcher (``hydra/launcher=slurm`` or
``local``: ``<sweep>/.submitit/<job id>/``). Writes ``comparison.md`` and ``comparison.tex`` into the
sweep directory (or ``--out``) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from knots.atomic import write_text

COLUMNS = ["avg acc", "avg norm acc", "joint hits@1", "joint hits@3", "joint hits@5"]


def job_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(i) for i in OmegaConf.to_container(OmegaConf.load(path)) or []]


def submitit_log(sweep: Path, job: Path) -> Path | None:
    """The stderr log a submitit launcher kept for ``job`` (its id is Hydra's ``hydra.job.id``), if any."""
    path = job / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    job_id = OmegaConf.select(OmegaConf.load(path), "hydra.job.id", default=None)
    logs = sorted((sweep / ".submitit" / str(job_id)).glob("*_log.err")) if job_id else []
    return logs[0] if logs else None


def job_labels(jobs: list[Path]) -> dict[Path, str]:
    """Each job's label: its overrides that differ across the sweep (else the job directory's name)."""
    overrides = {job: job_overrides(job) for job in jobs}
    common = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    return {job: " ".join(o for o in ov if o not in common) or job.name for job, ov in overrides.items()}


def collect(sweep: Path) -> tuple[list[list[Any]], list[str]]:
    """Rows ``[job, method, *COLUMNS]`` for every finished job, and the labels of failed jobs."""
    rows, failed = [], []
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir()), key=lambda p: (len(p.name), p.name))
    labels = job_labels(jobs)
    for job in jobs:
        result = job / "results.json"
        if not result.is_file():
            log = submitit_log(sweep, job)
            failed.append(labels[job] + (f" (log: {log.relative_to(sweep)})" if log else ""))
            continue
        data = json.loads(result.read_text())
        for method, m in data["methods"].items():
            j = m["joint"]
            rows.append([labels[job], method, m["avg_accuracy"], m["avg_normalized_accuracy"], j["hits@1"], j["hits@3"], j["hits@5"]])
    return rows, failed


def to_markdown(rows: list[list[Any]], failed: list[str]) -> str:
    lines = ["| job | method | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join([str(r[0]), str(r[1]), *[f"{v:.1f}" for v in r[2:]]]) + " |" for r in rows]
    if failed:
        lines += ["", "Failed jobs (no results.json): " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    """Escape LaTeX's special characters."""
    return "".join({"_": "\\_", "%": "\\%", "&": "\\&", "#": "\\#", "$": "\\$", "{": "\\{", "}": "\\}"}.get(c, c) for c in text)


def to_latex(rows: list[list[Any]]) -> str:
    best = {c: max((r[2 + c] for r in rows), default=None) for c in range(len(COLUMNS))}
    out = ["\\begin{tabular}{ll" + "r" * len(COLUMNS) + "}", "\\toprule",
           "Job & Method & " + " & ".join(_tex(c) for c in COLUMNS) + " \\\\", "\\midrule"]
    for r in rows:
        cells = [f"\\textbf{{{v:.1f}}}" if v == best[i] else f"{v:.1f}" for i, v in enumerate(r[2:])]
        out.append(f"{_tex(str(r[0]))} & {_tex(str(r[1]))} & " + " & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a knots-run -m output directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write comparison.md/.tex (default: the sweep dir)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"error: {args.sweep}: not a directory", file=sys.stderr)
        return 2
    rows, failed = collect(args.sweep)
    if not rows and not failed:
        print(f"error: {args.sweep}: no knots-run jobs found", file=sys.stderr)
        return 2
    out = args.out or args.sweep
    md = to_markdown(rows, failed)
    write_text(out / "comparison.md", md)
    write_text(out / "comparison.tex", to_latex(rows))
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
