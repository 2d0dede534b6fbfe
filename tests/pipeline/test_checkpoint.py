"""Resume checkpoints: tensors and plain data only (safetensors + JSON), verified, never unpickled.

A planted pickle never runs, a damaged checkpoint restarts the finetune from scratch with one notice,
and a resume is logged as one ("resumed from step N"), in the log and in results.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from knots.atomic import MANIFEST_NAME
from knots.config import to_run_config
from knots.lora import load_adapter
from knots.pipeline.cache import DAMAGED_DIR, is_complete, partial_dir
from knots.pipeline.checkpoint import STATE_NAME, TENSORS_NAME, CheckpointError, load_checkpoint, save_checkpoint
from knots.pipeline.finetune import finetune
from knots.pipeline.run import run_experiment
from tests.pipeline.test_finetune import CFG, LORA, Interrupt, crash_at, setup  # noqa: F401  (the shared fixture)

PACKAGE = Path(__file__).resolve().parents[2] / "knots"


def factors(path: Path) -> dict:
    return {k: (m.A, m.B) for k, m in load_adapter(path).modules.items()}


def assert_same_adapter(a: Path, b: Path) -> None:
    fa, fb = factors(a), factors(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=0)


def test_training_state_round_trips_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "step": 7, "losses": [0.5, float("inf"), float("nan")], "best": {"lora": None, "history": [(2, 50.0)]}}
    save_checkpoint(tmp_path / "ckpt", state)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([MANIFEST_NAME, STATE_NAME, TENSORS_NAME])
    back = load_checkpoint(tmp_path / "ckpt")
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer parameter ids survive
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    for i in (0, 1):
        for key, value in state["optimizer"]["state"][i].items():
            torch.testing.assert_close(back["optimizer"]["state"][i][key], value, rtol=0, atol=0)
    assert back["scheduler"] == state["scheduler"]
    assert torch.equal(back["rng"], state["rng"])
    assert back["losses"][:2] == [0.5, float("inf")] and math.isnan(back["losses"][2])
    assert back["best"] == {"lora": None, "history": [(2, 50.0)]}
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    fresh.load_state_dict(back["optimizer"])  # the optimizer accepts it as it is


def test_objects_that_are_not_plain_data_are_refused(tmp_path):
    with pytest.raises(TypeError, match="tensors and plain data"):
        save_checkpoint(tmp_path / "ckpt", {"x": object()})
    assert not (tmp_path / "ckpt").exists()


class Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_checkpoint_is_ever_unpickled():
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    assert not [p for p, text in sources.items() if re.search(r"weights_only\s*=\s*False", text)]
    assert not [p for p, text in sources.items() if re.search(r"\bpickle\.loads?\(", text)]


def test_a_planted_pickle_never_runs(setup, tmp_path, caplog):
    backbone, task, head = setup
    out = tmp_path / "adapters" / "mood-key"  # the cache's layout: damaged entries go to tmp_path/damaged/
    with pytest.raises(Interrupt):
        finetune(backbone, task, head, LORA, CFG, out, progress=False, on_step=crash_at(5))
    partial = partial_dir(out)
    marker = tmp_path / "PWNED"
    # an attacker with write access to the shared cache plants pickles under every name a loader might try
    (partial / "checkpoint.pt").write_bytes(pickle.dumps(Payload(marker)))
    (partial / STATE_NAME).write_bytes(pickle.dumps(Payload(marker)))
    with caplog.at_level(logging.WARNING, logger="knots"):
        info = finetune(backbone, task, head, LORA, CFG, out, progress=False)
    assert not marker.exists(), "a planted pickle was executed"
    assert info["status"] == "trained" and info["resumed_from"] == 0
    notices = [r.getMessage() for r in caplog.records if "resume checkpoint" in r.getMessage()]
    assert len(notices) == 1 and "finetuning from scratch" in notices[0], notices
    moved = next((tmp_path / DAMAGED_DIR / "adapters").iterdir())
    assert (moved / "checkpoint.pt").is_file()  # kept for inspection, never deleted, never loaded


def test_even_a_consistent_manifest_cannot_make_a_pickle_load(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, {"step": 1})
    marker = tmp_path / "PWNED"
    (path / TENSORS_NAME).write_bytes(pickle.dumps(Payload(marker)))
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    import hashlib

    manifest["files"][TENSORS_NAME] = {"size": (path / TENSORS_NAME).stat().st_size,
                                       "sha256": hashlib.sha256((path / TENSORS_NAME).read_bytes()).hexdigest()}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_checkpoint_restarts_from_scratch(setup, tmp_path, caplog, damage):
    backbone, task, head = setup
    reference = tmp_path / "reference"
    finetune(backbone, task, head, LORA, CFG, reference, progress=False)
    out = tmp_path / "adapters" / "mood-key"
    with pytest.raises(Interrupt):
        finetune(backbone, task, head, LORA, CFG, out, progress=False, on_step=crash_at(5))
    tensors = partial_dir(out) / TENSORS_NAME
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:-4] + b"\x00\x00\x80\x7f")
    steps: list[int] = []
    with caplog.at_level(logging.WARNING, logger="knots"):
        info = finetune(backbone, task, head, LORA, CFG, out, progress=False, on_step=steps.append)
    assert steps == list(range(1, CFG.steps + 1)) and info["resumed_from"] == 0 and info["status"] == "trained"
    notices = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0] and "finetuning from scratch" in notices[0]
    assert_same_adapter(out, reference)


def test_a_resume_is_logged_and_reported(compose_run, tmp_path, caplog, monkeypatch):
    import knots.pipeline.finetune as ft

    cfg = to_run_config(compose_run("logger=none", "stage=finetune", "benchmark.select=[mood]"))
    real = ft._train

    def crash_mood(*args, **kwargs):
        args = list(args)
        args[8] = crash_at(5)  # on_step
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "_train", crash_mood)
    with pytest.raises(Interrupt):
        run_experiment(cfg, tmp_path / "crashed")
    monkeypatch.setattr(ft, "_train", real)
    with caplog.at_level(logging.INFO, logger="knots"):
        results = run_experiment(cfg, tmp_path / "resumed")
    adapter = results["meta"]["adapters"][0]
    assert adapter["status"] == "resumed from step 4" and adapter["resumed_from"] == 4 and not adapter["reused"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("adapter mood: ") and m.endswith("(resumed from step 4)") for m in messages), messages
    assert not any("(trained)" in m for m in messages)
    assert "resumed from step 4" in (tmp_path / "resumed" / "results.md").read_text()
    assert is_complete(Path(adapter["path"])) and not partial_dir(Path(adapter["path"])).exists()


def test_staging_left_by_a_checkpoint_writer_killed_outright_is_removed_when_the_adapter_is_done(setup, tmp_path, caplog):
    import socket

    backbone, task, head = setup
    out = tmp_path / "adapters" / "mood-key"
    with pytest.raises(Interrupt):
        finetune(backbone, task, head, LORA, CFG, out, progress=False, on_step=crash_at(5))
    # What a SIGKILL while a checkpoint was being written leaves: the writer's hidden staging directory.
    dead = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 100_000
    staging = out.parent / f".{partial_dir(out).name}.partial-{dead}-0123abcd"
    staging.mkdir()
    marker = {"writer": "knots", "complete": False, "kind": "partial", "target": partial_dir(out).name, "pid": dead,
              "host": socket.gethostname()}
    (staging / MANIFEST_NAME).write_text(json.dumps(marker))
    with caplog.at_level(logging.INFO, logger="knots"):
        info = finetune(backbone, task, head, LORA, CFG, out, progress=False)
    assert info["status"].startswith("resumed from step")
    assert not staging.exists() and sorted(p.name for p in out.parent.iterdir() if p.is_dir()) == ["mood-key"]
    assert any(f"removed {staging.name}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("misfit", ["weights", "optimizer", "step"])
def test_a_checkpoint_that_does_not_fit_restarts_from_the_initial_weights(setup, tmp_path, caplog, misfit):
    backbone, task, head = setup
    reference = tmp_path / "reference"
    finetune(backbone, task, head, LORA, CFG, reference, progress=False)
    out = tmp_path / "adapters" / "mood-key"
    with pytest.raises(Interrupt):
        finetune(backbone, task, head, LORA, CFG, out, progress=False, on_step=crash_at(5))
    state = load_checkpoint(partial_dir(out))
    if misfit == "weights":
        state["lora"] = {name: value[..., :1].clone() for name, value in state["lora"].items()}
    elif misfit == "optimizer":
        state["optimizer"] = {"state": {}, "param_groups": []}
    else:
        state["step"] = "abc"
    save_checkpoint(partial_dir(out), state)
    with caplog.at_level(logging.WARNING, logger="knots"):
        info = finetune(backbone, task, head, LORA, CFG, out, progress=False)
    assert info["resumed_from"] == 0 and info["status"] == "trained"
    notices = [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()]
    assert len(notices) == 1 and "finetuning from scratch" in notices[0]
    assert_same_adapter(out, reference)
