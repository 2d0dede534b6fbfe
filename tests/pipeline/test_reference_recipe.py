"""The authors' finetuning recipe, switch by switch, on tiny data: minimum improvement for early stopping,
fp32 with a gradient scaler, a training logit scale apart from the evaluation one, epochs per task and a
cosine horizon apart from the training length; each changes the cache key exactly when it changes the
trained adapter."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from knots.config.schema import FinetuneConfig
from knots.data.tasks import TaskData
from knots.errors import ConfigError
from knots.heads import ZERO_SHOT_SCALE, Head
from knots.pipeline.cache import cache_key, plain_for_key
from knots.pipeline.cache import partial_dir
from knots.pipeline.checkpoint import load_checkpoint
from knots.pipeline.finetune import finetune, head_of, peft_encoder
from knots.pipeline.training import BestState, lr_lambda, resolve_precision, task_recipe
from tests.pipeline.test_finetune_recipe import CLASSES, LORA, assert_same_adapter, config, factors, setup  # noqa: F401

NEW_SETTINGS = ("epochs", "epochs_per_task", "schedule_steps", "min_improvement", "train_logit_scale")


@pytest.fixture(scope="module")
def learnable(setup):  # noqa: F811
    """The shifted task with validation labels shifted too: validation accuracy rises with training."""
    backbone, task, head = setup
    validation = [(x, (y + 1) % CLASSES) for x, y in task.validation]
    return backbone, TaskData("learnable", task.class_names, task.templates, train=task.train,
                              validation=validation, test=validation), head


class Stop(Exception):
    pass


# -- minimum improvement --------------------------------------------------------------------------
def authors_early_stopper(history: list[tuple[int, float]], patience: int, min_delta: float) -> tuple[int, int]:
    """The authors' ``EarlyStopper`` (training_scripts/8vision_training.py:11-31), written out for the
    test on percentages: (best step, step at which it stops; the last step if never)."""
    best_acc, best_step, counter = -1.0, 0, 0
    for step, acc in history:
        if acc > best_acc + min_delta:
            best_acc, best_step, counter = acc, step, 0
        else:
            counter += 1
            if counter >= patience:
                return best_step, step
    return best_step, history[-1][0]


def test_an_evaluation_counts_as_better_only_by_more_than_the_minimum_improvement():
    params = {"w": torch.nn.Parameter(torch.zeros(1))}
    strict, margin = BestState(), BestState()
    for step, acc in enumerate([50.0, 50.05, 50.2, 50.25, 50.31], start=1):
        params["w"].data.fill_(step)
        strict.update(step, acc, params)
        margin.update(step, acc, params, min_improvement=0.1)
    assert (strict.step, strict.accuracy, strict.bad_evals) == (5, 50.31, 0)
    # 50.05 and 50.25 are within 0.1 of the best so far; 50.31 beats 50.2 by 0.11
    assert (margin.step, margin.accuracy, margin.bad_evals) == (5, 50.31, 0)
    assert [s for s, _ in margin.history] == [1, 2, 3, 4, 5] and float(margin.lora["w"]) == 5.0
    late = BestState()
    for step, acc in enumerate([50.0, 50.05, 50.08], start=1):
        late.update(step, acc, params, min_improvement=0.1)
    assert (late.step, late.bad_evals) == (1, 2)


def test_finetuning_with_a_minimum_improvement_keeps_and_stops_as_the_authors_do(learnable, tmp_path):
    backbone, task, head = learnable
    full = finetune(backbone, task, head, LORA, config(steps=40, eval_every=2), tmp_path / "full", progress=False)
    history = [tuple(h) for h in full["val_history"]]
    assert history[-1][1] > history[0][1], "validation accuracy does not rise on this task"
    plain = authors_early_stopper(history, patience=4, min_delta=0.0)
    # a margin under which some gains count and others do not, so the outcome differs from plain patience
    margin = next(m for m in np.arange(0.5, 20.0, 0.5)
                  if authors_early_stopper(history, 4, m) != plain and authors_early_stopper(history, 4, m)[0] > 0)
    expected_best, expected_stop = authors_early_stopper(history, patience=4, min_delta=margin)
    info = finetune(backbone, task, head, LORA, config(steps=40, eval_every=2, patience=4, min_improvement=margin),
                    tmp_path / "margin", progress=False)
    assert (info["best_step"], info["steps_run"]) == (expected_best, expected_stop)
    assert [tuple(h) for h in info["val_history"]] == history[: len(info["val_history"])]
    assert authors_early_stopper(history, patience=len(history), min_delta=0.0)[0] == full["best_step"]


# -- fp32 with a gradient scaler --------------------------------------------------------------------
def test_fp32_scaled_runs_on_any_device_and_scales_the_loss(setup, tmp_path):  # noqa: F811
    backbone, task, head = setup
    assert resolve_precision("fp32_scaled", "cpu") == resolve_precision("fp32_scaled", "cuda") == "fp32_scaled"
    scalers = {}
    for precision in ("fp32", "fp32_scaled"):
        def stop(step: int) -> None:
            if step == 4:
                scalers[precision] = load_checkpoint(partial_dir(tmp_path / precision))["scaler"]
                raise Stop

        with pytest.raises(Stop):
            finetune(backbone, task, head, LORA, config(steps=8, precision=precision), tmp_path / precision,
                     progress=False, on_step=stop)
        info = finetune(backbone, task, head, LORA, config(steps=8, precision=precision), tmp_path / precision, progress=False)
        assert info["precision"] == precision and info["resumed_from"] == 4
    assert scalers["fp32"] == {} and scalers["fp32_scaled"]["scale"] >= 2.0 ** 10  # the loss was scaled
    # scaling by a power of two and back is exact: the same adapter as plain fp32
    assert_same_adapter(tmp_path / "fp32", tmp_path / "fp32_scaled")
    key = cache_key(None, None, config(), task, precision="fp32")
    assert cache_key(None, None, config(), task, precision="fp32_scaled") != key


# -- training logit scale ----------------------------------------------------------------------------
def test_the_training_logit_scale_replaces_only_the_training_heads_scale(setup, tmp_path):  # noqa: F811
    backbone, task, head = setup
    model = peft_encoder(backbone, LORA, seed=0)
    features = torch.randn(5, backbone.feature_dim)
    torch.testing.assert_close(head_of(model, head, 1e4)(features), 100 * head_of(model, head)(features), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(head_of(model, head, ZERO_SHOT_SCALE)(features), head_of(model, head)(features))
    losses = {100.0: [], 1e4: []}
    for scale, name in ((100.0, "100"), (1e4, "1e4")):
        finetune(backbone, task, head, LORA, config(steps=8, eval_every=4, log_every=1, train_logit_scale=scale),
                 tmp_path / name, progress=False, logger=_Collect("/loss", losses[scale]))
    # the same first batch from the same start: the 10^4 logits give a loss about 100 times larger
    assert losses[1e4][0] > 10 * losses[100.0][0] > 0, "training did not use the 10^4 logits"
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(factors(tmp_path / "100").values(), factors(tmp_path / "1e4").values()))
    assert head.scale == ZERO_SHOT_SCALE  # evaluation keeps 100 cos
    finetune(backbone, task, head, LORA, config(steps=8, eval_every=4, log_every=1), tmp_path / "default", progress=False)
    assert_same_adapter(tmp_path / "100", tmp_path / "default")


# -- epochs and the cosine horizon ------------------------------------------------------------------
def test_epochs_become_steps_per_task():
    cfg = config(batch_size=8, epochs=3, epochs_per_task={"cars": 15, "mnist": 2})
    assert task_recipe(cfg, "other", 64).steps == 3 * 8
    assert task_recipe(cfg, "other", 65).steps == 3 * 9  # ceil(n_train / batch)
    assert task_recipe(cfg, "cars", 8144).steps == 15 * math.ceil(8144 / 8)
    assert task_recipe(dataclasses.replace(cfg, epochs=None), "mnist", 60_000).steps == 2 * 7500
    assert task_recipe(config(steps=24), "other", 64).steps == 24  # no epochs: steps as configured
    resolved = task_recipe(cfg, "cars", 100)
    assert (resolved.epochs, resolved.epochs_per_task) == (None, {})


def test_a_run_by_epochs_trains_the_same_adapter_under_the_same_key_as_its_steps(setup, tmp_path):  # noqa: F811
    backbone, task, head = setup
    by_epochs = task_recipe(config(batch_size=8, epochs=2, epochs_per_task={"elsewhere": 7}), task.name, len(task.train))
    by_steps = task_recipe(config(batch_size=8, steps=16), task.name, len(task.train))
    assert by_epochs == by_steps and by_epochs.steps == 2 * math.ceil(len(task.train) / 8)
    assert cache_key(None, None, by_epochs, task) == cache_key(None, None, by_steps, task)
    other = task_recipe(config(batch_size=8, epochs=2, epochs_per_task={"elsewhere": 3}), task.name, len(task.train))
    assert cache_key(None, None, other, task) == cache_key(None, None, by_steps, task), "another task's epochs"
    info = finetune(backbone, task, head, LORA, by_epochs, tmp_path / "e", progress=False)
    assert info["steps_run"] == info["steps"] == 16


def authors_cosine_lr(base_lr: float, warmup: int, steps: int, step: int) -> float:
    """The authors' ``cosine_lr`` (utils.py:151-170), written out for the test."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup))) * base_lr


def test_the_cosine_horizon_is_apart_from_the_training_length():
    f = lr_lambda(warmup=5, total=50)
    for step in (0, 4, 5, 17, 49, 50, 73, 95, 120):
        assert f(step) == pytest.approx(authors_cosine_lr(1.0, 5, 50, step)), step
    assert f(50) == pytest.approx(0.0) and f(95) == pytest.approx(1.0)  # past the horizon the cosine goes on
    assert task_recipe(config(steps=24, schedule_steps=24), "t", 64).schedule_steps is None
    assert task_recipe(config(steps=24, schedule_steps=50), "t", 64).schedule_steps == 50


def test_a_longer_horizon_changes_the_schedule_and_the_adapter(setup, tmp_path):  # noqa: F811
    backbone, task, head = setup
    lrs = {}
    for name, horizon in (("plain", None), ("horizon", 240)):
        seen = []
        cfg = config(steps=12, warmup_steps=2, schedule_steps=horizon)
        finetune(backbone, task, head, LORA, cfg, tmp_path / name, progress=False, logger=_Collect("/lr", seen))
        lrs[name] = seen
    assert lrs["plain"][-1] == pytest.approx(5e-2 * lr_lambda(2, 12)(12))
    assert lrs["horizon"][-1] == pytest.approx(5e-2 * lr_lambda(2, 240)(12)) and lrs["horizon"][-1] > 0.9 * 5e-2
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(factors(tmp_path / "plain").values(), factors(tmp_path / "horizon").values()))


class _Collect:
    """A logger that collects the logged values whose key ends with ``suffix`` (finetune logs every
    ``log_every`` steps and at the last)."""

    def __init__(self, suffix: str, out: list[float]) -> None:
        self.suffix, self.out = suffix, out

    def define_step(self, *args) -> None:
        pass

    def log(self, values: dict) -> None:
        self.out.extend(v for k, v in values.items() if k.endswith(self.suffix))


# -- cache keys and validation -----------------------------------------------------------------------
def test_the_new_settings_leave_existing_cache_keys_alone_and_change_them_when_set(setup):  # noqa: F811
    _, task, _ = setup
    assert not set(NEW_SETTINGS) & set(plain_for_key(config()))
    key = cache_key(None, None, config(), task)
    assert cache_key(None, None, config(train_logit_scale=100.0, min_improvement=0.0), task) == key
    changed = [dict(schedule_steps=48), dict(min_improvement=0.1, eval_every=4), dict(train_logit_scale=1e4),
               dict(seed=420), dict(grad_clip=0.0)]
    keys = {cache_key(None, None, task_recipe(config(**c), task.name, len(task.train)), task) for c in changed}
    assert key not in keys and len(keys) == len(changed)
    assert cache_key(None, None, task_recipe(config(epochs=5), task.name, 64), task) != key


@pytest.mark.parametrize(("changes", "message"), [
    ({"min_improvement": 0.1}, "finetune.min_improvement needs finetune.eval_every"),
    ({"min_improvement": -1.0, "eval_every": 2}, "finetune.min_improvement must be >= 0"),
    ({"epochs": 0}, "must be >= 1"),
    ({"epochs_per_task": {"a": 0}}, "must be >= 1"),
    ({"schedule_steps": 0}, "schedule_steps must be greater than finetune.warmup_steps"),
    ({"train_logit_scale": 0.0}, "train_logit_scale must be > 0"),
])
def test_bad_recipe_settings_fail_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(config(), **changes).validate()


def test_warmup_is_checked_against_steps_only_when_steps_are_the_length():
    dataclasses.replace(config(steps=10, warmup_steps=500), epochs=3).validate()
    with pytest.raises(ConfigError, match="warmup_steps must be in"):
        FinetuneConfig(**{**dataclasses.asdict(config()), "steps": 10, "warmup_steps": 500}).validate()


def test_run_settings_for_the_recipe_are_checked_before_any_work(compose_run):
    from knots.config import to_run_config

    with pytest.raises(ConfigError, match=r"epochs_per_task has no value for task\(s\) topic, review"):
        to_run_config(compose_run("+finetune.epochs_per_task.mood=2"))
    cfg = to_run_config(compose_run("+finetune.epochs_per_task.mood=2", "finetune.epochs=1"))
    assert task_recipe(cfg.finetune, "topic", 10).steps == math.ceil(10 / cfg.finetune.batch_size)
    with pytest.raises(ConfigError, match="train_logit_scale scales zero-shot heads"):
        to_run_config(compose_run("model.head.kind=trained", "search.metric=avg_normalized_accuracy",
                                  "finetune.train_logit_scale=1e4"))
