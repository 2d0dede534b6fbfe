"""Every config option composes; bad configs fail early, on one line, before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from knots.config import to_run_config
from knots.errors import ConfigError
from knots.pipeline.run import load_tasks
from tests.pipeline.helpers import CONF_DIR

GROUPS = ["model", "benchmark", "search", "logger", "paths", "hydra", "experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
# options of the text track whose every value resolves here (the vision ones need their data packages)
VALIDATED = {"model": {"minilm"}, "benchmark": {"text6", "text7"},
             "experiment": {p.stem for p in (CONF_DIR / "experiment").glob("text*.yaml")}}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(compose_run, group, option):
    cfg = compose_run(f"{group}={option}", tiny=False)
    assert cfg.methods
    if group in VALIDATED and option in VALIDATED[group] or group in ("search", "logger", "debug"):
        to_run_config(cfg)


def test_default_is_the_real_text_experiment(compose_run):
    cfg = to_run_config(compose_run(tiny=False))
    assert cfg.model.name == "all-MiniLM-L6-v2"
    assert cfg.model.lora.target_modules == ["query", "key", "value", "attention.output.dense"]
    assert len(cfg.benchmark.task_names) >= 5
    assert set(cfg.methods) == {"ta", "ties", "dare_ties", "knots_ties", "knots_dare_ties", "regmean", "ensemble"}
    assert cfg.logger.mode == "offline"
    for name in cfg.benchmark.task_names:
        assert Path(cfg.benchmark.tasks[name].path).is_file(), name


def test_every_default_task_loads_with_splits(compose_run):
    cfg = to_run_config(compose_run("benchmark=text7", tiny=False))
    tasks = load_tasks(cfg)
    assert len(tasks) == 7
    for t in tasks:
        sizes = [len(t.split(s)) for s in ("train", "validation", "test")]
        assert min(sizes) > 0 and sizes[0] <= 512, (t.name, sizes)
        assert len({y for _, y in t.train}) == t.num_classes, t.name
        assert isinstance(t.train[0][0], str)
        train = {x for x, _ in t.train}
        assert not train & {x for x, _ in t.test}, f"{t.name}: train/test overlap"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("benchmark.select=[mood,nope]", "unknown task 'nope'"),
        ("methods=[ta,nope]", "unknown method 'nope'"),
        ("search.top_k=[0,50]", "top_k must be a percent in (0, 100]"),
        ("search.top_k=[50,101]", "top_k must be a percent in (0, 100]"),
        ("+method_params.ties.top_k=120", "top_k must be a percent in (0, 100]"),
        ("+method_params.ta.top_k=20", "method ta has no hyperparameter 'top_k'"),
        ("search.p=[1.0]", "p (DARE drop rate) must be in [0, 1)"),
        ("search.metric=hits", "unknown search.metric"),
        ("model.backbone=knots.models.text:Nope", "unknown model backbone"),
        ("finetune.steps=0", "finetune.steps must be >= 1"),
    ],
)
def test_bad_values_fail_validation(compose_run, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        to_run_config(compose_run(override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_data_file_fails_before_reading(compose_run, tmp_path):
    cfg = to_run_config(compose_run(f"benchmark.tasks.topic.path={tmp_path}/missing.jsonl"))
    with pytest.raises(ConfigError, match="task topic: data file not found"):
        load_tasks(cfg)


def test_typo_fails_at_composition(compose_run):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_run("finetune.lrr=1")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KNOTS_LOG_DIR": str(cwd / "logs")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "knots.cli.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=nope"], "error: unknown model 'nope'"),
        (["methods=[ta,nope]"], "error: unknown method 'nope'"),
        (["benchmark.select=[sms_spam,nope]"], "error: unknown task 'nope'"),
        (["search.top_k=[10,200]"], "error: top_k must be a percent in (0, 100], got 200"),
        (["benchmark.tasks.trec.path=/nonexistent/trec.txt"], "error: task trec: data file not found: /nonexistent/trec.txt"),
    ],
)
def test_cli_bad_config_one_line_error(tmp_path, args, message):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [message] or (len(lines) == 1 and lines[0].startswith(message)), proc.stderr
    assert not (tmp_path / "logs" / "cache").exists(), "training started despite a bad config"
