"""The vision_smoke experiment end to end: finetune, merge, search, per-task and joint results."""

import json
import time
from pathlib import Path

from knots.config.resources import config_dir

import pytest

CONF_DIR = config_dir()
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
METHODS = ["ta", "ties", "dare_ties", "knots_ties", "knots_dare_ties", "regmean", "ensemble"]


def _run(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from knots.config import register_configs
    from knots.config.schema import to_run_config
    from knots.pipeline.run import run_experiment

    register_configs()
    base = ["experiment=vision_smoke", f"paths.log_dir={tmp_path}/logs", f"paths.output_dir={tmp_path}/out",
            "progress=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_run_config(compose("run", overrides=base + list(overrides)))
    out = tmp_path / "run"
    start = time.perf_counter()
    run_experiment(cfg, out)
    return json.loads((out / "results.json").read_text()), time.perf_counter() - start, out


def _check(results, tasks, joint_labels):
    assert set(results["methods"]) == set(METHODS)
    assert set(results["finetuned"]) == set(tasks)
    assert results["meta"]["joint_labels"] == joint_labels
    for method in METHODS:
        entry = results["methods"][method]
        assert set(entry["per_task"]) == set(tasks)
        joint = entry["joint"]
        assert 0 <= joint["hits@1"] <= joint["hits@3"] <= joint["hits@5"] <= 100
        assert set(joint["per_task"]) == set(tasks)


def test_vision_smoke_on_two_digit_tasks(tmp_path):
    """Default suite: the package-shipped digit tasks (no system data), a shorter search."""
    results, _, out = _run(tmp_path, "benchmark.select=[digits,mnist]",
                           "search.ranges.scaling=[0.5,1.0]", "search.ranges.top_k=[20,100]",
                           "search.ranges.p=[0.5]", "search.ranges.seed=[0]", "search.ranges.alpha=[0.9]")
    _check(results, ["digits", "mnist"], joint_labels=10)  # the ten digits are shared
    # the finetuned models learned something on images (10 classes, chance is 10%)
    assert max(r["val_accuracy"] for r in results["finetuned"].values()) > 20
    assert "| method |" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="needs Debian's dataset-fashion-mnist")
def test_vision_smoke_experiment_as_configured(tmp_path):
    results, seconds, _ = _run(tmp_path)
    _check(results, ["digits", "mnist", "fashion"], joint_labels=20)
    assert seconds < 180, f"vision_smoke took {seconds:.0f} s"
