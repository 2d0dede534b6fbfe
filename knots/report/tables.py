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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from knots.report.paper import PaperBenchmark
from knots.report.runs import Run, RunGroup, Stat, flatten

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
    prefix: tuple[str, ...] = ()  # label cells before ``label`` (a sweep's job), one per extra ``row_header``


@dataclass
class Table:
    key: str
    title: str
    caption: str
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    digits: int = 1
    row_header: tuple[str, ...] = ("method",)
    highlight_best: bool = False  # LaTeX: the largest measured value of each column in bold

    def best(self) -> list[float | None]:
        """The largest measured value of each column."""
        values = [[r.cells[i].mean for r in self.rows if r.kind == "measured" and r.cells[i].mean is not None]
                  for i in range(len(self.columns))]
        return [max(v) if v else None for v in values]

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


def has_joint(group: RunGroup) -> bool:
    """Whether any method has joint-task numbers (``"joint": null`` everywhere with trained heads)."""
    return any(group.get("methods", m, "joint", "hits@1").mean is not None for m in group.methods)


CKA_VIEWS = {"full": "Full finetuning", "lora": "LoRA", "knots": "KnOTS"}


def cka_table(group: RunGroup) -> Table | None:
    """The CKA analysis (paper Fig. 2): per view, each task's mean CKA with the others and the mean over pairs."""
    views = [v for v in CKA_VIEWS if group.get("analyses", "cka", v, "avg").mean is not None]
    if not views:
        return None
    columns = [Column(t, t, "cka") for t in group.tasks] + [Column("avg pairwise", "avg", "cka")]
    caption = (f"{group.benchmark or '?'} / {group.model or '?'}; {group.description}. Linear CKA between the tasks' "
               "update outputs on the validation inputs, per targeted module, averaged over modules; a task's cell is "
               "its mean CKA with the other tasks.")
    table = Table("cka", "CKA alignment of task updates (Fig. 2)", caption, columns, digits=2, row_header=("view",))
    for view in views:
        table.add(CKA_VIEWS[view], view, [group.get("analyses", "cka", view, c.task) for c in columns], None)
    return table


def scaling_table(group: RunGroup) -> Table | None:
    """The scaling analysis (paper Fig. 3): mean normalized accuracy over task subsets per method and size."""
    keys = [k for k in group.stats if k[:2] == ("analyses", "scaling") and k[-1] == "mean"]
    if not keys:
        return None
    methods = list(dict.fromkeys(k[2] for k in keys))
    sizes = sorted({int(k[3]) for k in keys})
    columns = [Column(f"n={n}", str(n), "normalized_accuracy") for n in sizes]
    single = len(group.runs) == 1
    spread = ("± is the half-width of the 95% Student-t interval over the subsets (none for a single subset)" if single
              else "± is the standard deviation over runs")
    caption = (f"{group.benchmark or '?'} / {group.model or '?'}; {group.description}. Average normalized accuracy (%) of "
               f"merges of n tasks, each scored on its own tasks, averaged over task subsets; {spread}.")
    table = Table("scaling", "Scaling with the number of merged tasks (Fig. 3)", caption, columns)
    for method in methods:
        cells = []
        for n in sizes:
            mean = group.get("analyses", "scaling", method, str(n), "mean")
            if single and mean.mean is not None:
                mean = Stat(mean.mean, group.get("analyses", "scaling", method, str(n), "half").mean, mean.n)
            cells.append(mean)
        table.add(display_name(method), method, cells, None)
    return table


def comparison_table(runs: Sequence[Run], labels: Mapping[Path, str]) -> Table:
    """One row per job of a sweep and method: averages and pooled joint Hits@k (n/a where null); the
    best value of each column is bold in LaTeX."""
    columns = [Column("avg acc", "avg", "accuracy"), Column("avg norm acc", "avg", "normalized_accuracy"),
               *(Column(f"joint {k}", "pooled", k) for k in HITS)]
    caption = "Test numbers (%) of every job and method; jobs are labelled by the overrides that differ."
    table = Table("comparison", "Sweep comparison", caption, columns, row_header=("job", "method"), highlight_best=True)
    for run in runs:
        flat = flatten(run.results)
        for method in run.results["methods"]:
            keys = [("methods", method, "avg_accuracy"), ("methods", method, "avg_normalized_accuracy"),
                    *(("methods", method, "joint", k) for k in HITS)]
            table.rows.append(Row(method, method, "measured", [Stat.of([flat.get(k)]) for k in keys], prefix=(labels[run.path],)))
    return table


def build_tables(group: RunGroup, paper: PaperBenchmark | None) -> list[Table]:
    """The per-task and average tables, the joint-task tables where any method has joint numbers, and
    the analyses' tables where the runs hold them."""
    tables = [per_task_table(group, paper), averages_table(group, paper)]
    if has_joint(group):
        tables += [joint_table(group, paper), joint_per_task_table(group)]
    return tables + [t for t in (cka_table(group), scaling_table(group)) if t is not None]


# -- rendering ------------------------------------------------------------------------------------
def format_stat(stat: Stat, kind: RowKind, plus_minus: str = "±", digits: int = 1) -> str:
    if stat.mean is None:
        return "" if kind != "measured" else "n/a"
    if kind == "diff":
        return f"{stat.mean:+.{digits}f}"
    text = f"{stat.mean:.{digits}f}"
    return f"{text} {plus_minus} {stat.std:.{digits}f}" if stat.std is not None else text


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
        headers, cells = _grouped(table.columns, [format_stat(s, row.kind, digits=table.digits) for s in row.cells])
        header = header or headers
        label = row.label if row.kind == "measured" else f"↳ {row.label}"
        lines.append("| " + " | ".join([*row.prefix, label, *cells]) + " |")
    header = header or _grouped(table.columns, [""] * len(table.columns))[0]
    top = ["| " + " | ".join([*table.row_header, *header]) + " |", "|" + "---|" * len(table.row_header) + "---:|" * len(header)]
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
           r"\begin{tabular}{" + "l" * len(table.row_header) + "r" * len(headers) + "}", r"\toprule",
           " & ".join([*(latex_escape(h.capitalize()) for h in table.row_header), *(latex_escape(h) for h in headers)]) + r" \\",
           r"\midrule"]
    best = table.best() if table.highlight_best else []
    for row in table.rows:
        _, cells = _grouped(table.columns, [format_stat(s, row.kind, digits=table.digits) for s in row.cells])
        label = " & ".join(latex_escape(text) for text in (*row.prefix, row.label))
        cells = [latex_escape(c) for c in cells]
        if best and row.kind == "measured" and len(cells) == len(best):
            cells = [rf"\textbf{{{c}}}" if b is not None and s.mean == b else c for c, s, b in zip(cells, row.cells, best)]
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
