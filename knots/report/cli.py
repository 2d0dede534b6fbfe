"""``knots-report RUN_DIR...``: the paper's table layouts from knots-run outputs.

Writes ``report.md``, ``report.tex`` (booktabs) and ``report.csv`` (one tidy record per number) into
``--out`` (default: ``RUN_DIR/report`` for a single RUN_DIR), with the figures (PNG and PDF) in
``--out/figures``, and prints the markdown. Each RUN_DIR is a run directory (with ``results.json``) or a
multirun directory (job directories below it); runs that differ only by seed are averaged, with the
standard deviation.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from knots.errors import KnotsError
from knots.report.paper import PaperNumbers, load_paper_numbers
from knots.report.runs import RunGroup, find_runs, group_runs
from knots.report.tables import build_tables, csv_records, has_joint, latex_escape, to_csv, to_latex, to_markdown

PROGRAM = "knots-report"
FORMATS = {"md": "report.md", "tex": "report.tex", "csv": "report.csv"}


def render(groups: Sequence[RunGroup], failed: Sequence[Path], paper: PaperNumbers,
           figures: Sequence[Sequence[Path]] | None = None, base: Path | None = None) -> dict[str, str]:
    """The report in every format: ``{"md": ..., "tex": ..., "csv": ...}``; ``figures[i]``: group i's
    figure files, linked from the markdown (relative to ``base``, where report.md goes)."""
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
        if not has_joint(group):
            md += ["Joint task: not applicable (no method has joint-task numbers: with trained heads the tasks share "
                   "no label space).", ""]
        pngs = [p for p in (figures[index] if figures else []) if p.suffix == ".png"]
        if pngs:
            md += ["**Figures** (PNG and PDF):", ""]
            md += [f"![{p.stem}]({os.path.relpath(p, base) if base else p})" for p in pngs] + [""]
    if cited:
        md += ["## Paper numbers", "", f"From {paper.citation} (`knots/report/paper_numbers.yaml`, which cites each table).", ""]
        md += [f"- {note}" for note in paper.notes] + [""]
    if failed:
        md += ["## Failed jobs", "", "No results.json in: " + ", ".join(str(p) for p in failed), ""]
    return {"md": "\n".join(md).rstrip() + "\n", "tex": "\n".join(tex), "csv": to_csv(records)}


def group_figures(group: RunGroup, directory: Path, dpi: int = 150) -> list[Path]:
    """A group's figures in ``directory`` (PNG and PDF): per-task normalized accuracy over its runs (with
    the standard deviation over seeds as error bars), and each run's search curves and analyses' figures
    (suffixed by the run's directory name when the group has several runs)."""
    from knots.analyses.figures import per_task_figure, results_figures, write_figures

    def stat(*key: str) -> tuple[float | None, float | None]:
        value = group.get(*key)
        return value.mean, value.std

    per_task, errors = {}, {}
    for method in group.methods:
        cells = {t: stat("methods", method, "per_task", t, "normalized_accuracy") for t in group.tasks}
        cells["avg"] = stat("methods", method, "avg_normalized_accuracy")
        per_task[method] = {k: v[0] for k, v in cells.items()}
        errors[method] = {k: v[1] for k, v in cells.items()}
    figures = {"per_task": per_task_figure(per_task, group.tasks, errors=errors if len(group.runs) > 1 else None)}
    for run in group.runs:
        suffix = f"-{run.path.name}" if len(group.runs) > 1 else ""
        figures.update({f"{name}{suffix}": figure for name, figure in results_figures(run.results, per_task=False).items()})
    return write_figures(figures, directory, dpi=dpi)


def check_outputs(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise KnotsError(f"{existing[0]} exists; pass --overwrite to replace the report files")


def write_report(texts: dict[str, str], out: Path, formats: Sequence[str], overwrite: bool) -> list[Path]:
    from knots.atomic import write_text

    paths = [out / FORMATS[f] for f in formats]
    check_outputs(paths, overwrite)
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
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="do not draw the figures (per-task bars, search curves, CKA heatmaps, scaling curves)")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG figures (default: 150)")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise KnotsError(f"unknown format {unknown[0] if unknown else '(none)'!r}; choose from md, tex, csv")
    if args.dpi < 10:
        raise KnotsError(f"--dpi must be at least 10, got {args.dpi}")
    if args.out is None and len(args.runs) > 1:
        raise KnotsError("several RUN_DIRs: say where the report goes with --out")
    out = args.out or args.runs[0] / "report"
    runs, failed = find_runs(args.runs)
    if not runs:
        raise KnotsError(f"no finished runs: every job lacks results.json ({', '.join(str(p) for p in failed)})")
    groups = group_runs(runs)
    check_outputs([out / FORMATS[f] for f in formats] + ([out / "figures"] if args.figures else []), args.overwrite)
    figures: list[list[Path]] = []
    if args.figures:
        for index, group in enumerate(groups):
            figures.append(group_figures(group, out / "figures" / (f"group-{index}" if len(groups) > 1 else ""), args.dpi))
    texts = render(groups, failed, load_paper_numbers(), figures, out)
    paths = write_report(texts, out, formats, args.overwrite)
    drawn = [p for group in figures for p in group]
    if not args.quiet:
        print(texts["md"], end="")
    if drawn:
        print(f"{PROGRAM}: {len(drawn)} figure files in {out / 'figures'}", file=sys.stderr)
    return paths + drawn


def main(argv: Sequence[str] | None = None) -> int:
    from knots.cli.common import fail, full_errors

    try:
        paths = run(argv)
    except KnotsError as error:
        if full_errors():
            raise
        fail(PROGRAM, str(error))
    print(f"{PROGRAM}: wrote {', '.join(str(p) for p in paths if p.suffix not in ('.png', '.pdf'))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
