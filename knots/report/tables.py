"""The paper's table layouts from grouped runs, rendered as markdown, LaTeX (booktabs) and tidy CSV.

- ``per_task`` (Table 1 / A1): the finetuned models' absolute test accuracy per task, then each
  method's normalized accuracy per task and on average;
- ``averages`` (Tables 2 and 3): average accuracy and average normalized accuracy per method;
- ``joint`` (Table 4): pooled joint-task Hits@1/3/5, the ensemble included;
- ``joint_per_task`` (Table A2): joint-task Hits@1/3/5 per dataset.

Where the runs are one of the paper's benchmarks, a "paper" row and a "Δ" row (measured - paper)
follow each measured row the paper reports.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from knots.report.paper import PaperBenchmark
from knots.report.runs import RunGroup, Stat

RowKind = Literal["measured", "paper", "diff"]
HITS = ("hits@1", "hits@3", "hits@5")
_TOKENS = {"ta": "TA", "ties": "TIES", "dare": "DARE", "knots": "KnOTS", "regmean": "RegMean", "fisher": "Fisher", "ensemble": "Ensemble"}


def display_name(method: str) -> str:
    """``knots_dare_ties`` -> ``KnOTS-DARE-TIES``; unknown words are kept as they are."""
    return "-".join(_TOKENS.get(token, token) for token in method.split("_"))


@dataclass(frozen=True)
class Column:
    label: str
    task: str  # a task name, "avg", or "pooled"
    metric: str
    group: str | None = None  # consecutive columns of one group share a cell in markdown and LaTeX


@dataclass
class Row:
    label: str
    method: str
    kind: RowKind
    cells: list[Stat]
    metric: str | None = None  # overrides the columns' metric (the finetuned row's absolute accuracy)


@dataclass
class Table:
    key: str
    title: str
    caption: str
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)

    def add(self, label: str, method: str, measured: list[Stat], paper: list[float | None] | None, metric: str | None = None) -> None:
        """A measured row, then the paper's row and the difference where the paper has any of its numbers."""
        self.rows.append(Row(label, method, "measured", measured, metric))
        if paper is None or all(p is None for p in paper):
            return
        self.rows.append(Row("paper", method, "paper", [Stat(p, None, 1 if p is not None else 0) for p in paper]))
        diffs = [Stat(None) if m.mean is None or p is None else Stat(m.mean - p, None, m.n) for m, p in zip(measured, paper)]
        self.rows.append(Row("Δ", method, "diff", diffs))


def _caption(group: RunGroup, paper: PaperBenchmark | None, source: str | None) -> str:
    parts = [f"{group.benchmark or '?'} / {group.model or '?'}; {group.description}."]
    if paper is not None and source:
        parts.append(f"Paper: {source} ({paper.name}); Δ = measured - paper.")
    return " ".join(parts)


def per_task_table(group: RunGroup, paper: PaperBenchmark | None) -> Table:
    tasks = group.tasks
    columns = [Column(t, t, "normalized_accuracy") for t in tasks] + [Column("avg", "avg", "normalized_accuracy")]
    source = paper.per_task.get("source") if paper else None
    finetuned_source = paper.finetuned.get("source") if paper else None
    caption = _caption(group, paper, source) + " First row: finetuned models' absolute test accuracy" + (
        f" (paper row: {finetuned_source})." if paper and finetuned_source else ".")
    table = Table("per_task", "Per-task normalized accuracy (%) (Table 1 / A1 layout)", caption, columns)
    finetuned = [group.get("finetuned", t, "test_accuracy") for t in tasks] + [group.get("finetuned", "avg", "test_accuracy")]
    table.add("Finetuned (accuracy)", "finetuned", finetuned,
              None if paper is None else [paper.finetuned_accuracy(t) for t in tasks] + [paper.finetuned_accuracy()], metric="test_accuracy")
    for method in group.methods:
        cells = [group.get("methods", method, "per_task", t, "normalized_accuracy") for t in tasks]
        cells.append(group.get("methods", method, "avg_normalized_accuracy"))
        table.add(display_name(method), method, cells,
                  None if paper is None else [paper.normalized(method, t) for t in tasks] + [paper.normalized(method)])
    return table


def averages_table(group: RunGroup, paper: PaperBenchmark | None) -> Table:
    columns = [Column("avg accuracy", "avg", "accuracy"), Column("avg normalized accuracy", "avg", "normalized_accuracy")]
    source = paper.per_task.get("source") if paper else None
    table = Table("averages", "Average accuracy and normalized accuracy (%) (Tables 2 and 3 layout)", _caption(group, paper, source), columns)
    for method in group.methods:
        cells = [group.get("methods", method, "avg_accuracy"), group.get("methods", method, "avg_normalized_accuracy")]
        table.add(display_name(method), method, cells, None if paper is None else [None, paper.normalized(method)])
    return table


def joint_table(group: RunGroup, paper: PaperBenchmark | None) -> Table:
    columns = [Column(k.replace("hits", "Hits"), "pooled", k) for k in HITS]
    source = paper.joint.get("source") if paper else None
    caption = _caption(group, paper, source) + " Hits@k pooled over the test inputs of all tasks; n/a where the joint task does not apply."
    table = Table("joint", "Joint task: Hits@1/3/5 (%) (Table 4 layout)", caption, columns)
    for method in group.methods:
        cells = [group.get("methods", method, "joint", k) for k in HITS]
        table.add(display_name(method), method, cells, None if paper is None else [paper.hits(method, k) for k in HITS])
    return table


def joint_per_task_table(group: RunGroup) -> Table:
    columns = [Column(t, t, k, group=t) for t in group.tasks for k in HITS]
    caption = _caption(group, None, None) + " Cells: Hits@1 / Hits@3 / Hits@5 of each task's test inputs in the joint label space."
    table = Table("joint_per_task", "Joint task per dataset: Hits@1 / Hits@3 / Hits@5 (%) (Table A2 layout)", caption, columns)
    for method in group.methods:
        table.add(display_name(method), method, [group.get("methods", method, "joint", "per_task", t, k) for t in group.tasks for k in HITS], None)
    return table


def build_tables(group: RunGroup, paper: PaperBenchmark | None) -> list[Table]:
    return [per_task_table(group, paper), averages_table(group, paper), joint_table(group, paper), joint_per_task_table(group)]


# -- rendering ------------------------------------------------------------------------------------
def format_stat(stat: Stat, kind: RowKind, plus_minus: str = "±") -> str:
    if stat.mean is None:
        return "" if kind != "measured" else "n/a"
    if kind == "diff":
        return f"{stat.mean:+.1f}"
    text = f"{stat.mean:.1f}"
    return f"{text} {plus_minus} {stat.std:.1f}" if stat.std is not None else text


def _grouped(columns: Sequence[Column], texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Merge consecutive columns of one group into one header and one cell ``a / b / c``."""
    headers, cells, index = [], [], 0
    while index < len(columns):
        group = columns[index].group
        end = index + 1
        while group is not None and end < len(columns) and columns[end].group == group:
            end += 1
        headers.append(group if group is not None else columns[index].label)
        parts = texts[index:end]
        cells.append("n/a" if set(parts) == {"n/a"} else " / ".join(parts) if any(parts) else "")
        index = end
    return headers, cells


def to_markdown(table: Table) -> str:
    header = None
    lines = []
    for row in table.rows:
        headers, cells = _grouped(table.columns, [format_stat(s, row.kind) for s in row.cells])
        header = header or headers
        label = row.label if row.kind == "measured" else f"↳ {row.label}"
        lines.append("| " + " | ".join([label, *cells]) + " |")
    header = header or _grouped(table.columns, [""] * len(table.columns))[0]
    top = ["| method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    return f"**{table.title}.** {table.caption}\n\n" + "\n".join(top + lines) + "\n"


_LATEX_SPECIALS = {"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "\\": r"\textbackslash{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(c, c) for c in text).replace("Δ", r"$\Delta$").replace("±", r"$\pm$")


def to_latex(table: Table, label_prefix: str = "tab:knots") -> str:
    """A ``table`` environment with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    headers = _grouped(table.columns, [""] * len(table.columns))[0]
    out = [r"\begin{table}[t]", r"\centering", r"\small",
           rf"\caption{{{latex_escape(table.title)}. {latex_escape(table.caption)}}}",
           rf"\label{{{label_prefix}-{table.key}}}",
           r"\begin{tabular}{l" + "r" * len(headers) + "}", r"\toprule",
           "Method & " + " & ".join(latex_escape(h) for h in headers) + r" \\", r"\midrule"]
    for row in table.rows:
        _, cells = _grouped(table.columns, [format_stat(s, row.kind) for s in row.cells])
        label = latex_escape(row.label)
        cells = [latex_escape(c) for c in cells]
        if row.kind == "diff":
            cells = ["$-$" + c[1:] if c.startswith("-") else c for c in cells]
        if row.kind != "measured":
            label = r"\quad\textit{" + label + "}"
            cells = [r"\textit{" + c + "}" if c else "" for c in cells]
        out.append(" & ".join([label, *cells]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


CSV_FIELDS = ["group", "table", "method", "task", "metric", "value", "std", "runs", "paper", "diff"]


def csv_records(table: Table, group_label: str) -> list[dict[str, object]]:
    """One record per measured cell, with the paper's number and the difference where known."""
    records = []
    for index, row in enumerate(table.rows):
        if row.kind != "measured":
            continue
        paper = table.rows[index + 1] if index + 1 < len(table.rows) and table.rows[index + 1].kind == "paper" and table.rows[index + 1].method == row.method else None
        for position, (column, stat) in enumerate(zip(table.columns, row.cells)):
            paper_value = paper.cells[position].mean if paper else None
            records.append({
                "group": group_label, "table": table.key, "method": row.method, "task": column.task, "metric": row.metric or column.metric,
                "value": "" if stat.mean is None else round(stat.mean, 4), "std": "" if stat.std is None else round(stat.std, 4),
                "runs": stat.n, "paper": "" if paper_value is None else paper_value,
                "diff": "" if paper_value is None or stat.mean is None else round(stat.mean - paper_value, 4),
            })
    return records


def to_csv(records: Sequence[dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()
