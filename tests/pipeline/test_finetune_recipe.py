"""The finetuning recipe: validation early stopping keeps the best state, precision selection, DataLoader batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from knots.config.schema import FinetuneConfig, LoraSettings
from knots.data.tasks import TaskData
from knots.errors import ConfigError
from knots.heads import ZERO_SHOT_SCALE, Head
from knots.lora import load_adapter
from knots.models.apply import applied
from knots.models.base import Backbone
from knots.pipeline.cache import cache_key, plain_for_key
from knots.pipeline.finetune import finetune, head_of
from knots.pipeline.training import StepBatches, accuracy, batch_indices, collated_batches, resolve_precision
from tests.pipeline.test_finetune import Interrupt, crash_at

DIM, CLASSES = 8, 4
LORA = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=["proj"])


class VectorEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(batch["x"])


class VectorBackbone(Backbone):
    """Inputs are vectors; one linear layer is the encoder; the heads are fixed random directions."""

    name = "vector"
    feature_dim = DIM

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.encoder = VectorEncoder()
        self.encoder.requires_grad_(False)
        self.heads = nn.functional.normalize(torch.randn(CLASSES, DIM), dim=-1)

    def collate(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in inputs])}

    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        return self.heads.clone()


@pytest.fixture(scope="module")
def setup():
    """Validation labels are the pretrained model's own predictions (100% before training); training
    labels are shifted by one class, so training drives validation accuracy down."""
    backbone = VectorBackbone()
    gen = torch.Generator().manual_seed(1)
    train_x, val_x = torch.randn(64, DIM, generator=gen), torch.randn(32, DIM, generator=gen)
    with torch.no_grad():
        predict = lambda x: (backbone.encoder({"x": x}) @ backbone.heads.T).argmax(1)  # noqa: E731
        train = [(x, (int(y) + 1) % CLASSES) for x, y in zip(train_x, predict(train_x))]
        validation = [(x, int(y)) for x, y in zip(val_x, predict(val_x))]
    task = TaskData("shifted", [f"c{i}" for i in range(CLASSES)], ["{}"], train=train, validation=validation, test=validation)
    return backbone, task, Head(backbone.heads, scale=ZERO_SHOT_SCALE)


def config(**overrides: Any) -> FinetuneConfig:
    base = dict(steps=24, batch_size=8, lr=5e-2, weight_decay=0.0, warmup_steps=0, grad_clip=1.0, seed=0,
                checkpoint_every=4, log_every=100, eval_batch_size=16)
    return FinetuneConfig(**{**base, **overrides})


def saved_accuracy(backbone: Backbone, task: TaskData, path) -> float:
    """Validation accuracy of the adapter saved in ``path``, applied to the backbone's encoder."""
    head = Head(backbone.heads, scale=ZERO_SHOT_SCALE)
    with applied(backbone.encoder, load_adapter(path).delta_state_dict()):
        return accuracy(backbone.encoder, backbone, task.validation, head_of(backbone.encoder, head), 16)


def factors(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: (m.A, m.B) for k, m in load_adapter(path).modules.items()}


def assert_same_adapter(a, b) -> None:
    fa, fb = factors(a), factors(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k])


def test_the_best_validation_state_is_kept_not_the_last(setup, tmp_path):
    backbone, task, heads = setup
    info = finetune(backbone, task, heads, LORA, config(eval_every=4), tmp_path / "best", progress=False)
    history = dict(info["val_history"])
    assert sorted(history) == [4, 8, 12, 16, 20, 24]
    assert info["best_val_accuracy"] == max(history.values()) > history[24], "validation accuracy did not drop"
    assert info["best_step"] < 24 and info["steps_run"] == 24
    assert saved_accuracy(backbone, task, tmp_path / "best") == pytest.approx(info["best_val_accuracy"])
    # evaluating does not change training: the same run without evaluation saves the last state
    last = finetune(backbone, task, heads, LORA, config(), tmp_path / "last", progress=False)
    assert "best_step" not in last
    assert saved_accuracy(backbone, task, tmp_path / "last") == pytest.approx(history[24])


def test_patience_stops_training_after_evaluations_without_improvement(setup, tmp_path):
    backbone, task, heads = setup
    steps = []
    info = finetune(backbone, task, heads, LORA, config(eval_every=2, patience=2), tmp_path / "a", progress=False,
                    on_step=steps.append)
    assert info["steps_run"] < 24 and steps[-1] == info["steps_run"]
    assert info["steps_run"] == info["best_step"] + 2 * 2
    assert saved_accuracy(backbone, task, tmp_path / "a") == pytest.approx(info["best_val_accuracy"])


@pytest.mark.parametrize("crash_step", [6, 11])
def test_resuming_keeps_the_early_stopping_state(setup, tmp_path, crash_step):
    backbone, task, heads = setup
    cfg = config(eval_every=2, patience=5)
    reference = finetune(backbone, task, heads, LORA, cfg, tmp_path / "ref", progress=False)
    with pytest.raises(Interrupt):
        finetune(backbone, task, heads, LORA, cfg, tmp_path / "out", progress=False, on_step=crash_at(crash_step))
    info = finetune(backbone, task, heads, LORA, cfg, tmp_path / "out", progress=False)
    assert info["resumed_from"] == crash_step // 4 * 4
    for key in ("best_step", "best_val_accuracy", "steps_run", "val_history"):
        assert info[key] == reference[key], key
    assert_same_adapter(tmp_path / "out", tmp_path / "ref")


def test_dataloader_workers_give_the_same_batches_and_adapter(setup, tmp_path):
    backbone, task, heads = setup
    inputs = [x for x, _ in task.train]
    in_process = list(collated_batches(backbone, inputs, StepBatches(len(inputs), 8, 3, 5, 20)))
    workers = list(collated_batches(backbone, inputs, StepBatches(len(inputs), 8, 3, 5, 20), num_workers=2, seed=3))
    assert [idx for idx, _ in in_process] == [batch_indices(len(inputs), 8, s, 3) for s in range(5, 20)]
    assert [idx for idx, _ in workers] == [idx for idx, _ in in_process]
    for (_, a), (_, b) in zip(in_process, workers):
        torch.testing.assert_close(a["x"], b["x"])
    finetune(backbone, task, heads, LORA, config(steps=8), tmp_path / "w0", progress=False)
    finetune(backbone, task, heads, LORA, config(steps=8, num_workers=2), tmp_path / "w2", progress=False)
    assert_same_adapter(tmp_path / "w0", tmp_path / "w2")


def test_precision_is_fp32_on_cpu_and_mixed_only_on_cuda(setup, tmp_path, monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    for mixed in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"precision {mixed} needs a CUDA device"):
            resolve_precision(mixed, "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp16", "cuda:0") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16"
    with pytest.raises(ConfigError, match="does not support bfloat16"):
        resolve_precision("bf16", "cuda")
    backbone, task, heads = setup
    info = finetune(backbone, task, heads, LORA, config(steps=2), tmp_path / "a", progress=False)
    assert info["precision"] == "fp32"


def test_new_options_leave_existing_cache_keys_alone(setup):
    _, task, _ = setup
    plain = plain_for_key(config())
    assert not {"eval_every", "patience", "precision", "num_workers"} & set(plain)
    key = cache_key(None, None, config(), task)
    assert cache_key(None, None, config(num_workers=4, precision="fp32"), task) == key
    assert cache_key(None, None, config(eval_every=10), task) != key
    assert cache_key(None, None, config(), task, precision="bf16") != key


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"precision": "fp8"}, "unknown finetune.precision 'fp8'"),
        ({"patience": 3}, "finetune.patience needs finetune.eval_every"),
        ({"num_workers": -1}, "finetune.num_workers must be >= 0"),
        ({"eval_every": -5}, "finetune.eval_every must be >= 0"),
    ],
)
def test_bad_finetune_options_fail_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(config(), **changes).validate()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_path_runs(setup, tmp_path, monkeypatch, precision):
    """The autocast / loss-scaling path, with CPU autocast standing in for CUDA (fp16 skips its first,
    overflowing steps while the loss scale settles)."""
    import knots.pipeline.finetune as ft

    backbone, task, heads = setup
    monkeypatch.setattr(ft, "resolve_precision", lambda requested, device: precision)
    info = finetune(backbone, task, heads, LORA, config(steps=16, eval_every=8), tmp_path / "a", progress=False)
    assert info["precision"] == precision and len(info["val_history"]) == 2
    assert any(b.abs().sum() > 0 for _, b in factors(tmp_path / "a").values())
