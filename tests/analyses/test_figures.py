"""Figures are written as PNG and PDF, non-empty, with the expected panels."""

import pytest
import torch

from knots.analyses.cka import module_cka
from knots.analyses.figures import cka_figure, data_axes, per_task_figure, save_figure, scaling_figure, search_figure, searched_parameters
from knots.analyses.scaling import enumerate_subsets, subset_score, summarize_scaling
from tests.analyses.test_cka import lora_row

TASKS = ["cars", "dtd", "eurosat", "gtsrb"]


def written(paths):
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]  # no temporary files left
    return True


def test_cka_heatmaps_three_side_by_side(tmp_path):
    row = lora_row(4, 6, 5, 2, seed=0)
    module = module_cka(row, ("lora", "knots", "full"), full_deltas=[torch.randn(6, 5, dtype=torch.float64) for _ in row])
    module.update(torch.randn(40, 5, dtype=torch.float64))
    matrices = {view: m.tolist() for view, m in module.result().items()}
    matrices["lora"][0][1] = None  # a missing pair is drawn grey, not an error
    figure = cka_figure(matrices, TASKS, title="CKA")
    assert len(data_axes(figure)) == 3
    assert [ax.get_title().splitlines()[0] for ax in data_axes(figure)][0].startswith("Full finetuning")  # paper order
    assert written(save_figure(figure, tmp_path / "cka"))
    with pytest.raises(ValueError, match="shape"):
        cka_figure({"lora": [[1.0]]}, TASKS)


def test_scaling_curves_with_bands(tmp_path):
    tasks = TASKS + ["mnist"]
    per_task = {"ta": {t: 60.0 + 3 * i for i, t in enumerate(tasks)}, "knots_ties": {t: 70.0 - i for i, t in enumerate(tasks)}}
    subsets = enumerate_subsets(tasks, max_subsets=4)
    summary = summarize_scaling({m: {s: subset_score(per_task[m], s) for ss in subsets.values() for s in ss} for m in per_task}, len(tasks))
    figure = scaling_figure(summary)
    (ax,) = data_axes(figure)
    assert len(ax.get_lines()) == 2 and len(ax.collections) == 2  # a line and a band per method
    assert written(save_figure(figure, tmp_path / "scaling"))


def test_search_panels_per_method_and_hyperparameter(tmp_path):
    histories = {
        "ta": [({"scaling": s / 10}, 50 + s) for s in range(1, 6)],
        "knots_ties": [({"scaling": s / 10, "top_k": 20}, 40 + s) for s in range(1, 4)] + [({"scaling": 0.3, "top_k": k}, 40 + k / 10) for k in (10, 30, 50)],
        "dare_ties": [({"scaling": 0.5, "p": p, "seed": 0}, 60 - p) for p in (0.1, 0.5)] + [({"scaling": 0.5, "p": 0.1, "seed": s}, 61.0) for s in (1, 2)],
        "ensemble": [({}, 70.0)],
    }
    assert searched_parameters(histories["knots_ties"]) == ["scaling", "top_k"]
    assert searched_parameters(histories["ensemble"]) == []
    figure = search_figure(histories)
    assert len(data_axes(figure)) == 1 + 2 + 2  # ta: scaling; knots_ties: scaling, top_k; dare_ties: p, seed
    assert written(save_figure(figure, tmp_path / "search"))
    with pytest.raises(ValueError, match="no searched"):
        search_figure({"ensemble": histories["ensemble"]})


def test_per_task_grouped_bars(tmp_path):
    per_task = {"ta": {t: 60.0 + i for i, t in enumerate(TASKS)}, "ties": {t: 65.0 for t in TASKS}, "knots_ties": {**{t: 70.0 for t in TASKS}, "gtsrb": None}}
    figure = per_task_figure(per_task, TASKS)
    (ax,) = data_axes(figure)
    assert len(ax.patches) == 3 * (len(TASKS) + 1)  # one bar per method per task and for the average
    assert [t.get_text() for t in ax.get_xticklabels()] == TASKS + ["avg"]
    assert written(save_figure(figure, tmp_path / "per_task"))
