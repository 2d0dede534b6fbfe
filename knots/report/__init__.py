"""``knots-report``: the paper's tables (Table 1 / A1, Tables 2 and 3, Table 4 / A2) from runs' results.json,
with the paper's numbers beside measured ones, as markdown, LaTeX and CSV."""

from knots.report.paper import PaperBenchmark, PaperNumbers, load_paper_numbers
from knots.report.runs import Run, RunGroup, Stat, find_runs, group_runs
from knots.report.tables import Table, build_tables, to_csv, to_latex, to_markdown

__all__ = [
    "PaperBenchmark",
    "PaperNumbers",
    "Run",
    "RunGroup",
    "Stat",
    "Table",
    "build_tables",
    "find_runs",
    "group_runs",
    "load_paper_numbers",
    "to_csv",
    "to_latex",
    "to_markdown",
]
