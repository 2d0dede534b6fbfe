"""knots-report against hand-made results.json files: single runs, the paper's benchmark, seeds, failures."""

import csv
import io
import json
import subprocess
import sys

import pytest

from knots.report.cli import main
from knots.report.paper import load_paper_numbers
from knots.report.runs import Stat, find_runs, group_runs, is_seed
from knots.report.tables import build_tables, display_name, to_latex, to_markdown

VISION = ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]


def method_entry(normalized: dict[str, float], finetuned: dict[str, float], joint: dict | None, **hp) -> dict:
    per_task = {t: {"accuracy": finetuned[t] * v / 100, "normalized_accuracy": v} for t, v in normalized.items()}
    return {
        "hyperparameters": hp,
        "per_task": per_task,
        "avg_accuracy": sum(p["accuracy"] for p in per_task.values()) / len(per_task),
        "avg_normalized_accuracy": sum(normalized.values()) / len(normalized),
        "joint": joint,
        "val_score": 50.0,
    }


def joint_entry(h1: float, tasks: list[str]) -> dict:
    return {"hits@1": h1, "hits@3": h1 + 20, "hits@5": h1 + 30, "per_task": {t: {"hits@1": h1 - i, "hits@3": h1 + 20 - i, "hits@5": h1 + 30 - i} for i, t in enumerate(tasks)}}


def results(tasks: list[str], benchmark: str, model: str, shift: float = 0.0, regmean_joint: bool = False) -> dict:
    finetuned = {t: 80.0 + i for i, t in enumerate(tasks)}
    return {
        "finetuned": {t: {"val_accuracy": a + 1, "test_accuracy": a} for t, a in finetuned.items()},
        "methods": {
            "ta": method_entry({t: 60.0 + i + shift for i, t in enumerate(tasks)}, finetuned, joint_entry(40.0 + shift, tasks), scaling=0.3),
            "knots_ties": method_entry({t: 70.0 + shift for t in tasks}, finetuned, joint_entry(45.0 + shift, tasks), scaling=0.6, top_k=20),
            "regmean": method_entry({t: 50.0 for t in tasks}, finetuned, joint_entry(30.0, tasks) if regmean_joint else None, alpha=0.5),
        },
        "meta": {"benchmark": benchmark, "model": model, "tasks": tasks},
    }


def write_run(directory, data: dict, overrides: list[str] | None = None):
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(data))
    if overrides is not None:
        (directory / ".hydra").mkdir()
        (directory / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return directory


def test_paper_numbers_file_is_consistent():
    paper = load_paper_numbers()
    assert "ICLR 2025" in paper.citation
    vitb = paper.find(VISION, "clip-vit-b-32")
    assert vitb is not None and vitb.id == "vitb32_vision8"
    assert paper.find(VISION, "ViT-L/14").id == "vitl14_vision8"
    assert paper.find(["snli", "mnli", "sick", "qnli", "rte", "scitail"], "meta-llama/Meta-Llama-3-8B").id == "llama3_nli6"
    assert paper.find(VISION[:7], "clip-vit-b-32") is None and paper.find(VISION, "minilm") is None
    for benchmark in paper.benchmarks:
        assert benchmark.per_task["source"] and benchmark.finetuned["source"]
        for method, entry in benchmark.per_task["methods"].items():
            if "per_task" in entry:  # every per-task row averages to its printed average (within rounding)
                assert set(entry["per_task"]) == set(benchmark.tasks)
                assert sum(entry["per_task"].values()) / len(benchmark.tasks) == pytest.approx(entry["average"], abs=0.15), method
    assert vitb.finetuned_accuracy() == pytest.approx(84.05)
    # the vision normalizers that runs use (normalizers=paper) are the same numbers, from the same file
    from knots.vision.paper import FINETUNED_ACCURACY

    for model, arch in (("clip-vit-b-32", "ViT-B-32"), ("clip-vit-l-14", "ViT-L-14")):
        shown = paper.find(VISION, model).finetuned["test_accuracy"]
        assert shown == pytest.approx({t: round(v, 2) for t, v in FINETUNED_ACCURACY[arch].items()}, abs=1e-9), model
    assert vitb.hits("knots_ties", "hits@3") == 67.2 and vitb.normalized("ties", "mnist") == 56.8


def test_single_run_tables_hand_made(tmp_path):
    run = write_run(tmp_path / "run", results(["a", "b"], "text6", "minilm"))
    (group,) = group_runs(find_runs([run])[0])
    per_task, averages, joint, joint_per_task = build_tables(group, None)
    md = to_markdown(per_task)
    # finetuned accuracies 80, 81 (avg 80.5); TA normalized 60, 61 (avg 60.5); no paper rows
    assert "| Finetuned (accuracy) | 80.0 | 81.0 | 80.5 |" in md
    assert "| TA | 60.0 | 61.0 | 60.5 |" in md
    assert "| KnOTS-TIES | 70.0 | 70.0 | 70.0 |" in md
    assert "paper" not in md and "±" not in md
    assert "| TA | 48.7 | 60.5 |" in to_markdown(averages)  # avg accuracy (80 * .60 + 81 * .61) / 2 = 48.705
    joint_md = to_markdown(joint)
    assert "| TA | 40.0 | 60.0 | 70.0 |" in joint_md and "| RegMean | n/a | n/a | n/a |" in joint_md
    assert "| TA | 40.0 / 60.0 / 70.0 | 39.0 / 59.0 / 69.0 |" in to_markdown(joint_per_task)
    assert "| RegMean | n/a | n/a |" in to_markdown(joint_per_task)


def test_average_accuracy_cell(tmp_path):
    data = results(["a", "b"], "text6", "minilm")
    run = write_run(tmp_path / "run", data)
    (group,) = group_runs(find_runs([run])[0])
    assert group.get("methods", "ta", "avg_accuracy").mean == pytest.approx(data["methods"]["ta"]["avg_accuracy"])
    assert group.get("methods", "regmean", "joint", "hits@1") == Stat(None, None, 1)


def test_paper_numbers_stand_beside_measured_ones(tmp_path):
    run = write_run(tmp_path / "run", results(VISION, "vision8", "clip-vit-b-32"))
    assert main([str(run), "--quiet"]) == 0
    md = (run / "report" / "report.md").read_text()
    # TA measured 60.0 on cars; paper 82.0 -> diff -22.0. KnOTS-TIES avg 70.0 vs 68.0 -> +2.0
    assert "| ↳ paper | 82.0 | 73.6 | 48.8 | 42.1 | 53.1 | 71.5 | 97.5 | 41.2 | 63.7 |" in md
    assert "| ↳ Δ | -22.0 |" in md
    assert "| ↳ Δ | -12.7 | -3.7 | +20.7 | +21.1 | +1.1 | -0.9 | -25.5 | +16.2 | +2.0 |" in md
    assert "| ↳ paper | 74.0 | 58.3 | 99.0 | 92.7 | 99.3 | 88.4 | 64.5 | 96.2 | 84.1 |" in md  # finetuned, mean 84.05
    assert "| ↳ paper | 46.4 | 67.2 | 75.8 |" in md  # Table 4, KnOTS-TIES
    assert "Table A2 gives KnOTS-TIES" in md and "ICLR 2025" in md
    assert "## vision8 / clip-vit-b-32" in md
    records = list(csv.DictReader(io.StringIO((run / "report" / "report.csv").read_text())))
    cars = next(r for r in records if r["table"] == "per_task" and r["method"] == "ta" and r["task"] == "cars")
    assert (float(cars["value"]), float(cars["paper"]), float(cars["diff"]), cars["runs"]) == (60.0, 82.0, -22.0, "1")
    regmean_joint = next(r for r in records if r["table"] == "joint" and r["method"] == "regmean" and r["metric"] == "hits@1")
    assert regmean_joint["value"] == "" and regmean_joint["paper"] == ""
    tex = (run / "report" / "report.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 4 and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"\quad\textit{$\Delta$} & \textit{$-$22.0} & " in tex and "KnOTS-TIES" in tex
    finetuned = next(r for r in records if r["method"] == "finetuned" and r["task"] == "avg")
    assert finetuned["metric"] == "test_accuracy" and float(finetuned["paper"]) == pytest.approx(84.05)


def test_multirun_seeds_are_averaged_with_spread(tmp_path):
    sweep = tmp_path / "multirun"
    for job, (seed, shift) in enumerate([(0, 0.0), (1, 2.0), (2, 4.0)]):
        write_run(sweep / str(job), results(["a", "b"], "text6", "minilm", shift=shift), ["search.metric=joint_hits@3", f"finetune.seed={seed}"])
    (sweep / "3" / ".hydra").mkdir(parents=True)  # a failed job
    runs, failed = find_runs([sweep])
    assert [r.path.name for r in runs] == ["0", "1", "2"] and [p.name for p in failed] == ["3"]
    (group,) = group_runs(runs)
    assert group.seeds == ["finetune.seed=0", "finetune.seed=1", "finetune.seed=2"]
    stat = group.get("methods", "ta", "avg_normalized_accuracy")
    assert stat.mean == pytest.approx(62.5) and stat.std == pytest.approx(2.0) and stat.n == 3  # 60.5, 62.5, 64.5
    assert main([str(sweep), "--quiet"]) == 0
    md = (sweep / "report" / "report.md").read_text()
    assert "| TA | 62.0 ± 2.0 | 63.0 ± 2.0 | 62.5 ± 2.0 |" in md
    assert "| Finetuned (accuracy) | 80.0 ± 0.0 | 81.0 ± 0.0 | 80.5 ± 0.0 |" in md  # equal across seeds: std 0 is shown
    assert "mean ± std over 3 runs (finetune.seed=0, finetune.seed=1, finetune.seed=2)" in md
    assert "No results.json in:" in md and str(sweep / "3") in md


def test_runs_differing_otherwise_are_separate_groups(tmp_path):
    sweep = tmp_path / "multirun"
    jobs = [(["search.metric=a", "seed=0"], 0.0), (["search.metric=a", "seed=1"], 2.0), (["search.metric=b", "seed=0"], 10.0)]
    for job, (overrides, shift) in enumerate(jobs):
        write_run(sweep / str(job), results(["a", "b"], "text6", "minilm", shift=shift), overrides)
    groups = group_runs(find_runs([sweep])[0])
    assert [g.label for g in groups] == ["search.metric=a", "search.metric=b"]
    assert [len(g.runs) for g in groups] == [2, 1]
    # runs without overrides are never averaged together
    loose = [write_run(tmp_path / name, results(["a", "b"], "text6", "minilm")) for name in ("x", "y")]
    assert len(group_runs(find_runs(loose)[0])) == 2


def test_seed_override_keys():
    assert is_seed("seed=1") and is_seed("finetune.seed=3") and is_seed("+data_seed=2") and is_seed("method_params.dare_ties.seed=0")
    assert not is_seed("search.dare_seeds=[0,1]") and not is_seed("seedling=1") and not is_seed("search.metric=seed")


def test_display_names():
    assert [display_name(m) for m in ("ta", "dare_ties", "knots_dare_ties", "regmean", "iso_c")] == ["TA", "DARE-TIES", "KnOTS-DARE-TIES", "RegMean", "iso-c"]


def test_latex_escapes_and_booktabs(tmp_path):
    run = write_run(tmp_path / "run", results(["task_a", "b&c"], "text6", "minilm"))
    (group,) = group_runs(find_runs([run])[0])
    tex = to_latex(build_tables(group, None)[0])
    assert r"task\_a & b\&c & avg \\" in tex and r"\label{tab:knots-per_task}" in tex


def test_errors_are_one_line_with_status_2(tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("knots-report: error:") and "\n" not in message
        return message

    assert "no results.json" in error([str(tmp_path)])
    assert "not a directory" in error([str(tmp_path / "missing")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    assert "not valid JSON" in error([str(bad)])
    (bad / "results.json").write_text("{}")
    assert "not a knots-run results.json" in error([str(bad)])
    run = write_run(tmp_path / "run", results(["a", "b"], "text6", "minilm"))
    assert "--out" in error([str(run), str(run)])
    assert "unknown format 'pdf'" in error([str(run), "--formats", "pdf"])
    assert "--dpi must be at least 10" in error([str(run), "--dpi", "5"])
    assert main([str(run), "--quiet", "--formats", "md"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "report").iterdir()) == ["figures", "report.md"]
    assert main([str(run), "--quiet", "--formats", "tex", "--no-figures", "--out", str(tmp_path / "bare")]) == 0
    assert [p.name for p in (tmp_path / "bare").iterdir()] == ["report.tex"]
    capsys.readouterr()
    assert "--overwrite" in error([str(run), "--quiet"])
    assert main([str(run), "--quiet", "--overwrite"]) == 0


@pytest.mark.parametrize("module", ["knots.report", "knots.cli.report"])
def test_module_entry_point(tmp_path, module):
    run = write_run(tmp_path / "run", results(["a", "b"], "text6", "minilm"))
    out = subprocess.run([sys.executable, "-m", module, str(run), "--out", str(tmp_path / "rep")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# knots-report") and (tmp_path / "rep" / "report.tex").is_file()


def with_analyses(data: dict, tasks: list[str]) -> dict:
    """A results.json of the current schema: search histories, trained heads' null joint, analyses."""
    for name, method in data["methods"].items():
        method["search"] = [{"params": {**method["hyperparameters"], "scaling": s}, "val_score": 40.0 + 10 * s} for s in (0.3, 0.6)]
        method["joint"] = None
    data["meta"]["heads"] = "trained"
    data["analyses"] = {
        "cka": {"tasks": tasks, "views": {"lora": [[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]],
                                          "full": [[1.0, 0.9, None], [0.9, 1.0, 0.7], [None, 0.7, 1.0]]},
                "mean_pairwise": {"lora": 0.4, "full": 0.8}},
        "scaling": {"confidence": 0.95, "n_tasks": 3, "methods": {
            "ta": [{"n": 2, "mean": 90.0, "low": 88.0, "high": 92.0, "std": 1.0, "count": 3, "possible": 3},
                   {"n": 3, "mean": 85.0, "low": None, "high": None, "std": None, "count": 1, "possible": 1}]},
            "subsets": {"ta": []}},
    }
    return data


def test_current_results_schema_analyses_and_trained_heads(tmp_path):
    """Hand-made results.json: a task's CKA cell is its mean CKA with the others (None skipped), the
    scaling cells carry the interval's half-width, and without joint numbers the joint tables go."""
    tasks = ["a", "b", "c"]
    run = write_run(tmp_path / "run", with_analyses(results(tasks, "text6", "minilm"), tasks))
    assert main([str(run), "--quiet", "--dpi", "40"]) == 0
    md = (run / "report" / "report.md").read_text()
    assert "Joint task:" not in md.split("Joint task: not applicable")[0] and "Hits@1" not in md
    assert "Joint task: not applicable" in md
    assert "| view | a | b | c | avg pairwise |" in md
    assert "| LoRA | 0.30 | 0.40 | 0.50 | 0.40 |" in md  # a: (0.2 + 0.4) / 2, b: (0.2 + 0.6) / 2, c: (0.4 + 0.6) / 2
    assert "| Full finetuning | 0.90 | 0.80 | 0.70 | 0.80 |" in md  # the missing pair a-c is skipped
    assert "| TA | 90.0 ± 2.0 | 85.0 |" in md and "half-width of the 95% Student-t interval" in md
    figures = run / "report" / "figures"
    for name in ("per_task", "search", "cka", "scaling"):
        assert (figures / f"{name}.png").is_file() and (figures / f"{name}.pdf").is_file(), name
        assert f"![{name}](figures/{name}.png)" in md
    csv_rows = list(csv.DictReader(io.StringIO((run / "report" / "report.csv").read_text())))
    assert {r["table"] for r in csv_rows} == {"per_task", "averages", "cka", "scaling"}


def test_report_figures_of_seed_groups_carry_the_spread(tmp_path):
    """Per-task bars of a seed group are means with the standard deviation as error bars; each run's
    search curves are drawn separately."""
    from knots.analyses import figures as module

    seen = {}
    original = module.per_task_figure

    def spy(per_task, tasks=None, **kwargs):
        seen.update(per_task=per_task, errors=kwargs.get("errors"))
        return original(per_task, tasks, **kwargs)

    sweep = tmp_path / "multirun"
    for job, shift in enumerate([0.0, 2.0]):
        write_run(sweep / str(job), with_analyses(results(["a", "b", "c"], "text6", "minilm", shift=shift), ["a", "b", "c"]), [f"seed={job}"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "per_task_figure", spy)
        assert main([str(sweep), "--quiet", "--dpi", "40"]) == 0
    assert seen["per_task"]["ta"]["a"] == pytest.approx(61.0) and seen["errors"]["ta"]["a"] == pytest.approx(2 ** 0.5)
    names = sorted(p.name for p in (sweep / "report" / "figures").glob("*.png"))
    assert names == ["cka-0.png", "cka-1.png", "per_task.png", "scaling-0.png", "scaling-1.png", "search-0.png", "search-1.png"]


def test_sweep_comparison_with_null_joint(tmp_path, capsys):
    """experiments.collect renders through knots.report: n/a for a null joint, the best value bold in LaTeX."""
    from experiments.collect import main as collect

    sweep = tmp_path / "multirun"
    write_run(sweep / "0", results(["a", "b"], "text6", "minilm"), ["methods=[ta]", "model.head.kind=zero_shot"])
    write_run(sweep / "1", with_analyses(results(["a", "b", "c"], "text6", "minilm", shift=5.0), ["a", "b", "c"]),
              ["methods=[ta]", "model.head.kind=trained"])
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- methods=[nope]\n")
    assert collect([str(sweep)]) == 0
    md = (sweep / "comparison.md").read_text()
    assert capsys.readouterr().out == md
    assert "| job | method | avg acc | avg norm acc | joint hits@1 | joint hits@3 | joint hits@5 |" in md
    row = "| methods=[ta] model.head.kind=trained | ta | "  # labels: the overrides that differ across the jobs
    assert row in md and md.split(row)[1].split("\n")[0].endswith("n/a | n/a | n/a |")
    assert "Failed jobs (no results.json): methods=[nope]" in md
    tex = (sweep / "comparison.tex").read_text()
    assert r"\textbf{75.0}" in tex and tex.count(r"\textbf") == 5  # KnOTS-TIES with shift 5 (75.0) is best of its column; one per column
    assert collect([str(tmp_path / "missing")]) == 2
