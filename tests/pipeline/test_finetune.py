"""LoRA finetuning: reused from the cache when complete, resumed from its checkpoint when interrupted."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from knots.data.tasks import TaskData
from knots.heads import ZERO_SHOT_SCALE, Head
from knots.lora import load_adapter
from knots.models.text import TextBackbone
from knots.pipeline.cache import is_complete
from knots.pipeline.finetune import finetune
from knots.pipeline.training import batch_indices
from tests.pipeline.helpers import NEGATIVE, POSITIVE

TARGETS = ["query", "key", "value", "attention.output.dense"]
LORA = SimpleNamespace(r=4, alpha=8, dropout=0.1, target_modules=TARGETS, use_rslora=False)
CFG = SimpleNamespace(steps=6, batch_size=4, lr=1e-2, weight_decay=0.1, warmup_steps=1, grad_clip=1.0, seed=0,
                      checkpoint_every=2, log_every=1, eval_every=None, patience=None, precision="auto",
                      num_workers=0, eval_batch_size=8, schedule_steps=None, min_improvement=0.0,
                      train_logit_scale=ZERO_SHOT_SCALE)


class Interrupt(Exception):
    pass


def crash_at(step: int):
    """An ``on_step`` hook that interrupts training after ``step``, as a crash would."""

    def hook(current: int) -> None:
        if current == step:
            raise Interrupt

    return hook


@pytest.fixture(scope="module")
def setup(tiny_env):
    backbone = TextBackbone(str(tiny_env.parent / "bert"), "tiny", max_length=12)
    train = [(f"it was {w} .", 1) for w in POSITIVE] + [(f"it was {w} .", 0) for w in NEGATIVE]
    task = TaskData("mood", ["negative", "positive"], ["a {} text."], train=train, validation=train, test=train)
    head = Head(backbone.class_embeddings(task.class_names, task.templates), scale=ZERO_SHOT_SCALE)
    return backbone, task, head


def _factors(path):
    return {k: (m.A, m.B) for k, m in load_adapter(path).modules.items()}


def test_batches_are_a_function_of_the_step():
    assert batch_indices(10, 4, 3, seed=1) == batch_indices(10, 4, 3, seed=1)
    epoch = [i for s in range(5) for i in batch_indices(10, 2, s, seed=1)]
    assert sorted(epoch) == list(range(10))


def test_complete_adapter_is_reused_not_retrained(setup, tmp_path):
    backbone, task, heads = setup
    info = finetune(backbone, task, heads, LORA, CFG, tmp_path / "a", progress=False)
    assert not info["reused"] and is_complete(tmp_path / "a")
    assert not (tmp_path / "a.partial").exists()
    before = _factors(tmp_path / "a")
    assert any(b.abs().sum() > 0 for _, b in before.values()), "training did not move the LoRA weights"

    def fail(step):
        raise AssertionError("retrained a cached adapter")

    again = finetune(backbone, task, heads, LORA, CFG, tmp_path / "a", progress=False, on_step=fail)
    assert again["reused"]


def test_interrupted_training_resumes_from_its_checkpoint(setup, tmp_path):
    backbone, task, heads = setup
    reference = tmp_path / "uninterrupted"
    finetune(backbone, task, heads, LORA, CFG, reference, progress=False)

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        finetune(backbone, task, heads, LORA, CFG, out, progress=False, on_step=crash_at(5))
    assert not is_complete(out) and is_complete(tmp_path / "interrupted.partial")

    steps = []
    info = finetune(backbone, task, heads, LORA, CFG, out, progress=False, on_step=steps.append)
    assert info["resumed_from"] == 4 and steps == [5, 6]
    got, want = _factors(out), _factors(reference)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k][0], want[k][0])
        torch.testing.assert_close(got[k][1], want[k][1])
