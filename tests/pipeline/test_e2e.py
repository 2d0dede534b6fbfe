"""End-to-end: a whole knots-run on a tiny random BERT and three tiny tasks, offline, on CPU."""

from __future__ import annotations

import json
import time

from knots.config import to_run_config
from knots.pipeline.run import run_experiment

TASKS = ["mood", "topic", "review"]
METHODS = ["ta", "ties", "dare_ties", "knots_ties", "knots_dare_ties", "regmean", "ensemble"]


def check_shape(results: dict) -> None:
    assert set(results["finetuned"]) == set(TASKS)
    for entry in results["finetuned"].values():
        assert 0 <= entry["val_accuracy"] <= 100 and 0 <= entry["test_accuracy"] <= 100
    assert list(results["methods"]) == METHODS
    for name, m in results["methods"].items():
        assert isinstance(m["hyperparameters"], dict)
        assert set(m["per_task"]) == set(TASKS)
        for t in TASKS:
            assert 0 <= m["per_task"][t]["accuracy"] <= 100
            assert m["per_task"][t]["normalized_accuracy"] >= 0
        avg = sum(m["per_task"][t]["accuracy"] for t in TASKS) / 3
        assert abs(m["avg_accuracy"] - avg) < 1e-6
        assert "avg_normalized_accuracy" in m
        joint = m["joint"]
        assert joint["hits@1"] <= joint["hits@3"] <= joint["hits@5"] <= 100
        assert set(joint["per_task"]) == set(TASKS)
        assert all(set(v) == {"hits@1", "hits@3", "hits@5"} for v in joint["per_task"].values())
    assert results["methods"]["ensemble"]["hyperparameters"] == {"rule": "most_confident"}
    assert "alpha" in results["methods"]["regmean"]["hyperparameters"]
    assert "seed" in results["methods"]["dare_ties"]["hyperparameters"]


def test_tiny_run_end_to_end(compose_run, tmp_path):
    cfg = to_run_config(compose_run("logger=wandb", "logger.mode=offline"))
    out = tmp_path / "run"
    start = time.perf_counter()
    run_experiment(cfg, out)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"tiny end-to-end run took {elapsed:.1f} s"

    results = json.loads((out / "results.json").read_text())
    check_shape(results)
    # mood and review share their sentiment labels: 2 + 2 + 2 classes make 4 joint labels
    assert results["meta"]["joint_labels"] == 4
    md = (out / "results.md").read_text()
    assert all(m in md for m in METHODS) and "| method |" in md

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no W&B offline history file"
    # the offline log holds the training curves, search curves, test summaries and result tables
    history = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in ("train/mood/loss", "train/topic/acc", "search/ties/val_score", "test/ta/avg_accuracy"):
        assert key.encode() in history, key
    assert list(runs[0].glob("files/media/table/results_*.table.json"))
    # the run's figures, PNG and PDF, also logged as W&B images; every method's search history
    for name in ("search", "per_task"):
        assert (out / "figures" / f"{name}.png").is_file() and (out / "figures" / f"{name}.pdf").is_file()
        assert list(runs[0].glob(f"files/media/images/figures/{name}_*.png")), name
    for m in results["methods"].values():
        assert {"params": m["hyperparameters"], "val_score": m["val_score"]} in m["search"]


def test_cached_rerun_reuses_adapters(compose_run, tmp_path):
    cfg = to_run_config(compose_run("logger=none", "methods=[ta]"))
    first = run_experiment(cfg, tmp_path / "a")
    again = run_experiment(cfg, tmp_path / "b")
    assert [a["reused"] for a in first["meta"]["adapters"]] == [False] * 3
    assert [a["reused"] for a in again["meta"]["adapters"]] == [True] * 3
    assert first["finetuned"] == again["finetuned"]
    assert first["methods"]["ta"]["per_task"] == again["methods"]["ta"]["per_task"]


def test_given_adapters_replace_finetuning(compose_run, tmp_path):
    cfg = to_run_config(compose_run("logger=none", "methods=[ta]"))
    first = run_experiment(cfg, tmp_path / "a")
    paths = ",".join(f"{a['task']}:{a['path']}" for a in first["meta"]["adapters"])
    given = to_run_config(compose_run("logger=none", "methods=[ta]", f"+adapters.paths={{{paths}}}", "finetune.steps=999"))
    again = run_experiment(given, tmp_path / "b")
    assert again["finetuned"] == first["finetuned"]
    assert [a["path"] for a in again["meta"]["adapters"]] == [a["path"] for a in first["meta"]["adapters"]]


def test_knots_alignment_is_computed_once_per_task_set(compose_run, tmp_path, monkeypatch):
    import knots.merging.session as session

    calls = []
    real = session.align

    def counting_align(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "align", counting_align)
    cfg = to_run_config(compose_run("logger=none", "methods=[knots_ties,knots_dare_ties]"))
    results = run_experiment(cfg, tmp_path / "run")
    assert len(results["methods"]["knots_ties"]["hyperparameters"]) > 0
    assert calls == ["column"]
