"""``knots-report RUN_DIR...``: the paper's table layouts from knots-run outputs.

Writes ``report.md``, ``report.tex`` (booktabs) and ``report.csv`` (one tidy record per number) into
``--out`` (default: ``RUN_DIR/report`` for a single RUN_DIR) and prints the markdown. Each RUN_DIR is
a run directory (with ``results.json``) or a multirun directory (job directories below it); runs that
differ only by seed are averaged, with the standard deviation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from knots.errors import KnotsError
from knots.report.paper import PaperNumbers, load_paper_numbers
from knots.report.runs import RunGroup, find_runs, group_runs
from knots.report.tables import build_tables, csv_records, latex_escape, to_csv, to_latex, to_markdown

PROGRAM = "knots-report"
FORMATS = {"md": "report.md", "tex": "report.tex", "csv": "report.csv"}


def render(groups: Sequence[RunGroup], failed: Sequence[Path], paper: PaperNumbers) -> dict[str, str]:
    """The report in every format: ``{"md": ..., "tex": ..., "csv": ...}``."""
    md, tex, records = ["# knots-report", ""], [f"% knots-report: needs \\usepackage{{booktabs}}. Paper numbers: {paper.citation}", ""], []
    cited = False
    for index, group in enumerate(groups):
        match = paper.find(group.tasks, group.model)
        cited = cited or match is not None
        heading = group.label or f"{group.benchmark} / {group.model}"
        md += [f"## {heading}", "", f"Runs: {', '.join(str(r.path) for r in group.runs)}", ""]
        if len(groups) > 1:
            tex.append(f"% {latex_escape(heading)}")
        for table in build_tables(group, match):
            md += [to_markdown(table)]
            tex += [to_latex(table, label_prefix=f"tab:knots-{index}" if len(groups) > 1 else "tab:knots")]
            records += csv_records(table, group.label)
    if cited:
        md += ["## Paper numbers", "", f"From {paper.citation} (`knots/report/paper_numbers.yaml`, which cites each table).", ""]
        md += [f"- {note}" for note in paper.notes] + [""]
    if failed:
        md += ["## Failed jobs", "", "No results.json in: " + ", ".join(str(p) for p in failed), ""]
    return {"md": "\n".join(md).rstrip() + "\n", "tex": "\n".join(tex), "csv": to_csv(records)}


def write_report(texts: dict[str, str], out: Path, formats: Sequence[str], overwrite: bool) -> list[Path]:
    from knots.pipeline.io import write_text

    paths = [out / FORMATS[f] for f in formats]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise KnotsError(f"{existing[0]} exists; pass --overwrite to replace the report files")
    for fmt, path in zip(formats, paths):
        write_text(path, texts[fmt])
    return paths


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="knots-run output directories or multirun directories")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/report with one RUN_DIR)")
    parser.add_argument("--formats", default="md,tex,csv", help="comma-separated subset of md,tex,csv (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing report files in --out")
    parser.add_argument("--quiet", action="store_true", help="do not print the markdown")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise KnotsError(f"unknown format {unknown[0] if unknown else '(none)'!r}; choose from md, tex, csv")
    if args.out is None and len(args.runs) > 1:
        raise KnotsError("several RUN_DIRs: say where the report goes with --out")
    out = args.out or args.runs[0] / "report"
    runs, failed = find_runs(args.runs)
    if not runs:
        raise KnotsError(f"no finished runs: every job lacks results.json ({', '.join(str(p) for p in failed)})")
    texts = render(group_runs(runs), failed, load_paper_numbers())
    paths = write_report(texts, out, formats, args.overwrite)
    if not args.quiet:
        print(texts["md"], end="")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    from knots.cli.common import fail, full_errors

    try:
        paths = run(argv)
    except KnotsError as error:
        if full_errors():
            raise
        fail(PROGRAM, str(error))
    print(f"{PROGRAM}: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
