"""results.json and results.md: the run's numbers (percent) as data and as tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from knots.atomic import write_json, write_text


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def _joint(m: dict[str, Any], k: str) -> Any:
    """A method's pooled joint Hits@k, or None where the joint task does not apply."""
    return None if m["joint"] is None else m["joint"][k]


def method_rows(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per-task test table: accuracy and normalized accuracy per task, then the averages."""
    tasks = list(results["finetuned"])
    header = ["method", *tasks, "avg acc", "avg norm acc", "joint hits@1", "joint hits@3", "joint hits@5"]
    rows = [["finetuned (own task)", *[results["finetuned"][t]["test_accuracy"] for t in tasks],
             sum(results["finetuned"][t]["test_accuracy"] for t in tasks) / len(tasks), 100.0, "", "", ""]]
    for name, m in results["methods"].items():
        cells = [f"{m['per_task'][t]['accuracy']:.1f} ({m['per_task'][t]['normalized_accuracy']:.1f})" for t in tasks]
        joint = [_joint(m, k) if m["joint"] is not None else "n/a" for k in ("hits@1", "hits@3", "hits@5")]
        rows.append([name, *cells, m["avg_accuracy"], m["avg_normalized_accuracy"], *joint])
    return header, rows


def results_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One numeric row per method (for trackers): averages, joint Hits@k, per-task normalized accuracy."""
    tasks = list(results["finetuned"])
    header = ["method", "avg_accuracy", "avg_normalized_accuracy", "hits@1", "hits@3", "hits@5", *[f"{t}/normalized_accuracy" for t in tasks]]
    rows = [[name, m["avg_accuracy"], m["avg_normalized_accuracy"], _joint(m, "hits@1"), _joint(m, "hits@3"), _joint(m, "hits@5"),
             *[m["per_task"][t]["normalized_accuracy"] for t in tasks]] for name, m in results["methods"].items()]
    return header, rows


def to_markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    tasks = list(results["finetuned"])
    parts = [f"# Results: {meta.get('benchmark', '')} / {meta.get('model', '')}", ""]
    parts.append("Test accuracy (normalized accuracy in parentheses), percent; hyperparameters selected on "
                 f"validation by {meta.get('selection_metric', '?')}.")
    parts.append("")
    header, rows = method_rows(results)
    parts += [md_table(header, rows), ""]
    parts.append("## Hyperparameters and validation scores")
    parts.append("")
    parts.append(md_table(["method", "hyperparameters", "validation score"],
                          [[n, _fmt_params(m["hyperparameters"]), m.get("val_score", "")] for n, m in results["methods"].items()]))
    if meta.get("joint_labels") is None:
        parts += ["", "## Joint task", "", "Not applicable: each task has its own trained head, so the tasks share no label space.", ""]
    else:
        parts += ["", f"## Joint task (one label space of {meta.get('joint_labels', '?')} labels): Hits@1/3/5 per task", ""]
        jrows = []
        for name, m in results["methods"].items():
            pt = m["joint"]["per_task"]
            jrows.append([name, *[f"{pt[t]['hits@1']:.1f}/{pt[t]['hits@3']:.1f}/{pt[t]['hits@5']:.1f}" for t in tasks]])
        parts += [md_table(["method", *tasks], jrows), ""]
    parts += ["## Finetuned models", ""]
    parts.append(md_table(["task", "validation accuracy", "test accuracy"],
                          [[t, v["val_accuracy"], v["test_accuracy"]] for t, v in results["finetuned"].items()]))
    return "\n".join(parts) + "\n"


def adapters_markdown(results: dict[str, Any]) -> str:
    """results.md of a run that stopped after finetuning: the adapters it trained or reused."""
    meta = results["meta"]
    rows = [[a["task"], a["path"], a["status"]] for a in meta["adapters"]]
    return (f"# Finetuning: {meta['benchmark']} / {meta['model']}\n\n"
            + md_table(["task", "adapter", "status"], rows) + "\n")


def write_results(output_dir: Path, results: dict[str, Any]) -> None:
    write_json(output_dir / "results.json", results)
    write_text(output_dir / "results.md", to_markdown(results) if "methods" in results else adapters_markdown(results))
