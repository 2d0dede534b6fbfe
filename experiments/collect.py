"""Collect a ``knots-run -m`` sweep into one comparison table (markdown and LaTeX).

Usage: ``python -m experiments.collect <multirun dir> [--out DIR]``

Every job directory holding a ``results.json`` gives one row per method, labelled by the job's
overrides (from ``.hydra/overrides.yaml``); jobs without results are listed as failed, with the path of
their scheduler log when the sweep ran through a submitit launcher (``hydra/launcher=slurm`` or
``local``: ``<sweep>/.submitit/<job id>/``). Writes ``comparison.md`` and ``comparison.tex`` into the
sweep directory (or ``--out``) and prints the markdown. Reading runs and rendering tables is
:mod:`knots.report`'s (``knots-report`` gives the paper's tables and figures of the same sweep).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from knots.atomic import write_text
from knots.errors import KnotsError
from knots.report.runs import find_runs, job_labels
from knots.report.tables import comparison_table, to_latex, to_markdown


def submitit_log(sweep: Path, job: Path) -> Path | None:
    """The stderr log a submitit launcher kept for ``job`` (its id is Hydra's ``hydra.job.id``), if any."""
    path = job / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    job_id = OmegaConf.select(OmegaConf.load(path), "hydra.job.id", default=None)
    logs = sorted((sweep / ".submitit" / str(job_id)).glob("*_log.err")) if job_id else []
    return logs[0] if logs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a knots-run -m output directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write comparison.md/.tex (default: the sweep dir)")
    args = parser.parse_args(argv)
    try:
        runs, failed = find_runs([args.sweep])
    except KnotsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    labels = job_labels([*(run.path for run in runs), *failed])
    table = comparison_table(runs, labels)
    md = to_markdown(table)
    if failed:
        logs = {job: submitit_log(args.sweep, job) for job in failed}
        md += "\nFailed jobs (no results.json): " + "; ".join(
            labels[job] + (f" (log: {logs[job].relative_to(args.sweep)})" if logs[job] else "") for job in failed) + "\n"
    out = args.out or args.sweep
    write_text(out / "comparison.md", md)
    write_text(out / "comparison.tex", to_latex(table, label_prefix="tab:sweep"))
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
