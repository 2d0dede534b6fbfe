"""Every config option composes; bad configs fail early, on one line, before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from knots.config import to_run_config
from knots.errors import ConfigError
from knots.taskpool import TaskPool
from tests.pipeline.helpers import CONF_DIR

GROUPS = ["model", "benchmark", "finetune", "search", "logger", "paths", "hydra", "experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
# options of the text track whose every value resolves here (the vision ones need their data packages)
VALIDATED = {"model": {"minilm"}, "benchmark": {"text6", "text7"},
             "experiment": {p.stem for p in (CONF_DIR / "experiment").glob("text*.yaml")}}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(compose_run, group, option):
    cfg = compose_run(f"{group}={option}", tiny=False)
    assert cfg.methods
    if group in VALIDATED and option in VALIDATED[group] or group in ("finetune", "search", "logger", "debug"):
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
    # the benchmark's caps reach every task
    assert {cfg.benchmark.tasks[n].split.max_train for n in cfg.benchmark.task_names} == {512}


def test_every_default_task_loads_with_splits(compose_run):
    cfg = to_run_config(compose_run("benchmark=text7", tiny=False))
    tasks = TaskPool.load(cfg.benchmark).tasks
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
        ("search.ranges.top_k=[0,50]", "top_k is a percent in (0, 100], got 0"),
        ("search.ranges.top_k=[50,101]", "top_k is a percent in (0, 100], got 101"),
        ("+method_params.ties.top_k=120", "top_k is a percent in (0, 100], got 120"),
        ("+method_params.ta.top_k=20", "method ta has no hyperparameter 'top_k'"),
        ("search.ranges.p=[1.0]", "p (DARE drop rate) must be in [0, 1), got 1.0"),
        ("search.ranges.alpha=[2.0]", "regmean alpha must be in [0, 1], got 2.0"),
        ("search.ranges.scaling=[]", "search.ranges.scaling is empty"),
        ("search.metric=hits", "unknown search.metric"),
        ("model.backbone._target_=knots.models.text.Nope", "cannot import 'knots.models.text.Nope'"),
        ("+benchmark.split.max_tarin=3", "unknown split setting 'max_tarin'"),
        ("finetune.steps=0", "finetune.steps must be >= 1"),
        ("stage=merge", "unknown stage 'merge'"),
        ("methods=3", "methods must be a method name, a list of names, or all; got 3"),
        ("methods=[ta,3]", "methods must be a method name, a list of names, or all"),
        ("model.head.kind=trained search.metric=joint_hits@3", "needs zero-shot heads"),
    ],
)
def test_bad_values_fail_validation(compose_run, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        to_run_config(compose_run(*override.split()))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("selection", ["methods=all", "methods=[all]"])
def test_methods_all_selects_every_registered_method(compose_run, selection):
    from knots.methods import method_names

    assert to_run_config(compose_run(selection)).methods == method_names()
    assert to_run_config(compose_run("methods=ta")).methods == ["ta"]


def test_missing_data_file_fails_before_reading(compose_run, tmp_path):
    cfg = to_run_config(compose_run(f"benchmark.tasks.topic.path={tmp_path}/missing.jsonl"))
    with pytest.raises(ConfigError, match="task topic: data file not found"):
        TaskPool.load(cfg.benchmark)


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
        (["model=nope"], "knots-run: error: unknown model 'nope'"),
        (["methods=[ta,nope]"], "knots-run: error: unknown method 'nope'"),
        (["benchmark.select=[sms_spam,nope]"], "knots-run: error: unknown task 'nope'"),
        (["search.ranges.top_k=[10,200]"], "knots-run: error: method.top_k is a percent in (0, 100], got 200"),
        (["benchmark.tasks.trec.path=/nonexistent/trec.txt"], "knots-run: error: task trec: data file not found: /nonexistent/trec.txt"),
    ],
)
def test_cli_bad_config_one_line_error(tmp_path, args, message):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [message] or (len(lines) == 1 and lines[0].startswith(message)), proc.stderr
    assert not (tmp_path / "logs" / "cache").exists(), "training started despite a bad config"


def test_schema_defaults_are_the_yaml_defaults(compose_run):
    """A default lives in one place: where the YAML sets a value, the dataclass holds MISSING or that value."""
    import dataclasses

    from omegaconf import MISSING, OmegaConf

    from knots.config.schema import FinetuneConfig, LoggerConfig, ModelConfig, RunConfig, SearchConfig

    cfg = compose_run(tiny=False)
    checked = 0
    for node, cls in [(cfg, RunConfig), (cfg.finetune, FinetuneConfig), (cfg.search, SearchConfig),
                      (cfg.logger, LoggerConfig), (cfg.model, ModelConfig)]:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if default == MISSING or dataclasses.is_dataclass(default):
                continue
            value = OmegaConf.to_container(node, resolve=False)[f.name]
            assert value == default, f"{cls.__name__}.{f.name}: the schema says {default!r}, the YAML {value!r}"
            checked += 1
    assert checked > 5
