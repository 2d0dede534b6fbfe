"""The authors' evaluation choices: the max-logit ensemble (by hand) and fixed normalizers, and what a run
records about them and about its splits."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from knots.data.tasks import TaskData
from knots.errors import ConfigError
from knots.heads import HeadSet
from knots.methods import get_method
from knots.methods.base import FinetunedEnsemble
from knots.methods.ensemble import check as check_ensemble
from knots.metrics import max_logit, most_confident, summarize
from knots.pipeline.evaluate import FinetunedOutputs, fixed_normalizers
from knots.taskpool import ensemble_scores


def unit(*xs: float) -> list[float]:
    """A 3-d unit vector whose first coordinates are ``xs`` (the last one completes the norm)."""
    return [*xs, math.sqrt(1 - sum(x * x for x in xs))]


def test_max_logit_is_the_elementwise_maximum_over_models():
    logits = torch.tensor([[[1.0, 5.0], [3.0, 0.0]], [[2.0, 4.0], [1.0, 7.0]]])  # 2 models, 2 rows, 2 classes
    torch.testing.assert_close(max_logit(logits), torch.tensor([[2.0, 5.0], [3.0, 7.0]]))
    torch.testing.assert_close(most_confident(logits), torch.tensor([[1.0, 5.0], [1.0, 7.0]]))


@pytest.fixture
def two_models():
    """Task ``a`` (classes along x and y) and task ``b`` (one class along z, one along x+y); two
    examples of ``a``; the two models' unit features give a-logits (100 cos) written out by hand."""
    a = TaskData("a", ["a0", "a1"], ["{}"], train=[], validation=[], test=[])
    b = TaskData("b", ["b0", "b1"], ["{}"], train=[], validation=[], test=[])
    embeddings = {"a": torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]),
                  "b": torch.tensor([[0, 0, 1.0], [math.sqrt(0.5), math.sqrt(0.5), 0]])}
    heads = HeadSet.zero_shot(embeddings, [a, b])
    # example 1 (label 0): model 1 -> [50, 49] (unsure), model 2 -> [10, 40] (sure of class 1)
    # example 2 (label 1): model 1 -> [30, 20],           model 2 -> [10, 90]
    feats = [torch.tensor([unit(0.5, 0.49), unit(0.3, 0.2)]), torch.tensor([unit(0.1, 0.4), unit(0.1, 0.9)])]
    data = SimpleNamespace(slices={"a": slice(0, 2)}, labels=torch.tensor([0, 1]),
                           joint_labels=lambda heads: torch.tensor([0, 1]))
    return heads, feats, data


def test_the_ensemble_rules_against_hand_computed_logits(two_models):
    heads, feats, data = two_models
    torch.testing.assert_close(heads.per_task["a"].logits(feats[0]), torch.tensor([[50.0, 49.0], [30.0, 20.0]]))
    torch.testing.assert_close(heads.per_task["a"].logits(feats[1]), torch.tensor([[10.0, 40.0], [10.0, 90.0]]))
    # max logit: [50, 49] -> 0 (right), [30, 90] -> 1 (right); most confident: model 2 both times -> 1, 1
    assert ensemble_scores(feats, data, heads, "max_logit")["per_task"] == {"a": 100.0}
    assert ensemble_scores(feats, data, heads, "most_confident")["per_task"] == {"a": 50.0}
    # joint space a0 a1 b0 b1, b1 = (x + y) / sqrt 2; the third coordinates are sqrt(.5099), sqrt(.87)
    # (model 1) and sqrt(.83), sqrt(.18) (model 2); 100 cos, element-wise maximum over the two models:
    #   example 1: max([50, 49, 71.41, 70.00], [10, 40, 91.10, 35.36]) = [50, 49, 91.10, 70.00]: label 0 third
    #   example 2: max([30, 20, 93.27, 35.36], [10, 90, 42.43, 70.71]) = [30, 90, 93.27, 70.71]: label 1 second
    joint = ensemble_scores(feats, data, heads, "max_logit")["joint"]
    assert (joint["hits@1"], joint["hits@3"], joint["hits@5"]) == (0.0, 100.0, 100.0)
    expected = torch.tensor([[50.0, 49.0, 91.104, 70.004], [30.0, 90.0, 93.274, 70.711]])
    computed = torch.stack([heads.joint.logits(f) for f in feats]).amax(0)
    torch.testing.assert_close(computed, expected, atol=1e-3, rtol=0)


def test_the_rule_is_a_hyperparameter_of_the_ensemble_method():
    assert get_method("ensemble").build(None, rule="max_logit") == FinetunedEnsemble("max_logit")
    with pytest.raises(ConfigError, match="ensemble rule must be one of most_confident, max_logit"):
        check_ensemble({"rule": "average"})


def test_fixed_normalizers_are_used_on_validation_and_test_alike():
    measured = {"a": {"val_accuracy": 50.0, "test_accuracy": 40.0}, "b": {"val_accuracy": 90.0, "test_accuracy": 80.0}}
    outputs = FinetunedOutputs({}, measured)
    assert outputs.normalizers == {"validation": {"a": 50.0, "b": 90.0}, "test": {"a": 40.0, "b": 80.0}}
    fixed = FinetunedOutputs({}, measured, fixed={"a": 74.0, "b": 58.3})
    assert fixed.normalizers == {"validation": {"a": 74.0, "b": 58.3}, "test": {"a": 74.0, "b": 58.3}}
    summary = summarize({"per_task": {"a": 37.0, "b": 58.3}, "joint": None}, fixed.normalizers["test"])
    assert summary["per_task"]["a"]["normalized_accuracy"] == pytest.approx(50.0)
    assert summary["avg_normalized_accuracy"] == pytest.approx(75.0)


def test_paper_normalizers_come_from_the_authors_table_by_architecture():
    from knots.vision.paper import FINETUNED_ACCURACY

    def run(arch, tasks, normalizers="paper"):
        return SimpleNamespace(normalizers=normalizers, model=SimpleNamespace(backbone={"arch": arch}),
                               benchmark=SimpleNamespace(task_names=tasks))

    assert fixed_normalizers(run("ViT-B-32", ["cars", "svhn"])) == {"cars": 74.0, "svhn": 96.2}
    assert fixed_normalizers(run("ViT-L-14", ["cars"])) == {"cars": FINETUNED_ACCURACY["ViT-L-14"]["cars"]}
    assert fixed_normalizers(run("ViT-B-32", ["cars"], "measured")) is None
    with pytest.raises(ConfigError, match=r"no paper normalizer for task\(s\) digits"):
        fixed_normalizers(run("ViT-B-32", ["cars", "digits"]))


def test_a_run_records_its_normalizers_ensemble_rule_and_splits(compose_run, tmp_path, monkeypatch, caplog):
    """A tiny run with fixed normalizers (a stand-in table) and the max-logit ensemble."""
    import knots.vision.paper as paper
    from knots.config import to_run_config
    from knots.pipeline.run import run_experiment

    table = {"mood": 50.0, "topic": 80.0, "review": 40.0}
    monkeypatch.setattr(paper, "paper_normalizers", lambda arch, tasks: {t: table[t] for t in tasks})
    cfg = to_run_config(compose_run("logger=none", "normalizers=paper", "methods=[ta,ensemble]",
                                    "+method_params.ensemble.rule=max_logit"))
    for name in ("knots", "knots.pipeline"):  # an in-process knots-merge (hydra job_logging: disabled) turns them off
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
    with caplog.at_level(logging.INFO, logger="knots.pipeline"):
        run_experiment(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    meta = results["meta"]
    assert meta["normalizers"] == {"source": "paper", "validation": table, "test": table}
    assert results["methods"]["ensemble"]["hyperparameters"] == {"rule": "max_logit"}
    for method in results["methods"].values():
        for task, entry in method["per_task"].items():
            assert entry["normalized_accuracy"] == pytest.approx(100 * entry["accuracy"] / table[task])
    for task, sizes in meta["examples"].items():
        assert meta["splits"][task]["sizes"] == sizes
        sizes_line = f"task {task}: {sizes['train']} train, {sizes['validation']} validation, {sizes['test']} test"
        assert any(record.getMessage().startswith(sizes_line) for record in caplog.records), sizes_line
