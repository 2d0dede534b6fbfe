"""``knots-run`` input errors: one line, ``knots-run: error: ...``, exit status 2, no traceback (unless
``HYDRA_FULL_ERROR=1``), before any training; the same code as ``knots-merge`` (knots/cli/common.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from knots.config import to_run_config
from knots.config.schema import check_device
from knots.errors import ConfigError
from knots.taskpool import TaskPool
from tests.pipeline.helpers import TINY_OVERRIDES


def run_main(monkeypatch, capsys, tiny_env, *args: str) -> tuple[int, list[str]]:
    """``knots-run`` in this process, for errors found before Hydra starts a job."""
    from knots.cli import run

    flags = [a for a in args if a == "-m"]
    monkeypatch.setattr(sys, "argv", ["knots-run", *flags, f"hydra.searchpath=[file://{tiny_env}]", *[a for a in args if a != "-m"]])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as done:
        run.main()
    return done.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(("args", "message"), [
    (["finetune.stepz=3"], "unknown setting 'finetune.stepz'; did you mean finetune.steps?"),
    (["finetune.steps=abc"], "finetune.steps must be an integer, got abc"),
    (["finetune.steps=1.5"], "finetune.steps must be an integer, got 1.5"),
    (["seed=abc"], "seed must be an integer, got abc"),
    (["paths.cache_dir=/tmp/my", "cache"], "argument 'cache' is not a key=value setting; a path with spaces must be quoted, "
                                           "e.g. 'paths.cache_dir=/tmp/my cache'"),
    (["-m", "stage=finetune", "finetune.steps=6,abc"], "finetune.steps must be an integer, got abc (in a job of the -m sweep; "
                                                       "no job was started)"),
    (["model=nope"], "unknown model 'nope'; available: "),
])
def test_bad_settings_fail_on_one_line_before_any_job(monkeypatch, capsys, tiny_env, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    code, lines = run_main(monkeypatch, capsys, tiny_env, *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"knots-run: error: {message}"), lines
    assert not list(tmp_path.iterdir()), "a run or sweep directory was made"


@pytest.mark.parametrize("value", ["abc", "1.5", "true"])
def test_method_params_are_typed(compose_run, value):
    with pytest.raises(ConfigError, match=r"^dare_ties\.seed must be an integer, got"):
        to_run_config(compose_run(f"+method_params.dare_ties.seed={value}"))
    with pytest.raises(ConfigError, match=r"^regmean\.alpha must be a number, got 'x'"):
        to_run_config(compose_run("+method_params.regmean.alpha=x"))


def test_devices_are_checked_before_any_work():
    check_device("cpu")
    with pytest.raises(ConfigError, match="'gpu0' is not a device name"):
        check_device("gpu0", available=False)
    with pytest.raises(ConfigError, match="knots runs on cpu, cuda or mps"):
        check_device("meta", available=False)
    check_device("cuda:7", available=False)  # a GPU experiment's config validates anywhere
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 7:
        with pytest.raises(ConfigError, match="'cuda:7': this machine has"):
            check_device("cuda:7")


def test_device_auto_takes_the_accelerator_there_is_and_is_recorded(compose_run, tmp_path, monkeypatch):
    from knots.config.schema import resolve_device
    from knots.pipeline.run import run_experiment

    check_device("auto")
    assert resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    # bf16 validates with auto (a GPU node); on a machine without CUDA the run refuses it on one line
    cfg = to_run_config(compose_run("logger=none", "stage=finetune", "device=auto"))
    assert run_experiment(cfg, tmp_path / "run")["meta"]["device"] == "cpu"
    to_run_config(compose_run("device=auto", "finetune.precision=bf16"))
    with pytest.raises(ConfigError, match="finetune.precision bf16 needs a CUDA device"):
        to_run_config(compose_run("device=cpu", "finetune.precision=bf16"))


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (bytes(range(256)) * 8, "is a binary file, not text"),
    (b'sentence,score\n"it was good,1\n' + b"x,1\n" * 5, "is not valid CSV (Error tokenizing data"),
    (b"sentence,score\na,1\nb,0,extra\n", "is not valid CSV (Error tokenizing data. C error: Expected 2 fields in line 3, saw 3)"),
])
def test_unreadable_csv_files_are_one_line(compose_run, tmp_path, content, message):
    path = tmp_path / "mood.csv"
    path.write_bytes(content)
    cfg = to_run_config(compose_run(f"benchmark.tasks.mood.path={path}"))
    with pytest.raises(ConfigError) as error:
        TaskPool.load(cfg.benchmark)
    assert str(error.value).startswith(f"task mood: {path} {message}") and "\n" not in str(error.value)


def cli(tmp_path: Path, tiny_env: Path, *args: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "KNOTS_LOG_DIR": str(tmp_path / "logs")}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, "-m", "knots.cli.run", f"hydra.searchpath=[file://{tiny_env}]", *TINY_OVERRIDES,
                           "logger=none", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_errors_found_by_a_running_job_are_one_line_with_status_2(tiny_env, tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    proc = cli(tmp_path, tiny_env, f"benchmark.tasks.mood.path={tmp_path / 'empty.csv'}")
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [f"knots-run: error: task mood: {tmp_path / 'empty.csv'} is empty"]
    assert not (tmp_path / "logs" / "cache").exists()
    if not (torch.cuda.is_available() and torch.cuda.device_count() > 7):
        proc = cli(tmp_path, tiny_env, "device=cuda:7")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("knots-run: error: device 'cuda:7'"), proc.stderr
        assert not (tmp_path / "logs" / "cache").exists()


def test_hydra_full_error_shows_the_traceback(tiny_env, tmp_path):
    proc = cli(tmp_path, tiny_env, "finetune.stepz=3", full_error=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_class_that_matches_no_row_is_an_error(compose_run):
    classes = "[{name:animal,values:[animal]},{name:vehicle,values:[vehicle]},{name:plant,values:[plant,tree]}]"
    cfg = to_run_config(compose_run(f"benchmark.tasks.topic.classes={classes}"))
    with pytest.raises(ConfigError, match=r"^task topic: no row has class 'plant' \(values \['plant', 'tree'\]\); "):
        TaskPool.load(cfg.benchmark)


def test_rows_that_match_no_class_are_counted_in_the_log_and_results(compose_run, tiny_env, tmp_path, caplog):
    import json
    import logging

    from knots.pipeline.run import run_experiment

    path = tmp_path / "mood.csv"
    source = (tiny_env.parent / "data" / "mood.csv").read_text()
    first = source.splitlines()[1]
    path.write_text(source + "".join(f"odd row {i},7\n" for i in range(9)) + first + "\n")
    cfg = to_run_config(compose_run("logger=none", "stage=finetune", f"benchmark.tasks.mood.path={path}"))
    with caplog.at_level(logging.INFO, logger="knots"):
        results = run_experiment(cfg, tmp_path / "run")
    counts = results["meta"]["rows"]["mood"]
    assert counts == {"rows": 70, "unmatched": 9, "repeated": 1, "per_class": {"negative": 30, "positive": 30}}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["meta"]["rows"]["mood"] == counts
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("task mood: "))
    assert line == "task mood: 36 train, 12 validation, 12 test; 70 rows read, 9 matching no class and 1 repeated (dropped); examples per class: negative 30, positive 30"
