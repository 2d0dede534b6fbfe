"""The analyses, full finetuning and the Fisher method on the tiny end-to-end configuration (a tiny
random BERT and three tiny tasks), checked against direct computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from knots.analyses.cka import cka_matrix, mean_offdiagonal
from knots.config import to_run_config
from knots.errors import ConfigError
from knots.lora import load_adapter
from knots.pipeline.full import UPDATE_NAME, load_full_update
from knots.pipeline.run import run_experiment

TASKS = ["mood", "topic", "review"]


def pools(cfg):
    from knots.modelpool import ModelPool
    from knots.taskpool import TaskPool

    tasks = TaskPool.load(cfg.benchmark)
    return tasks, ModelPool.build(cfg.model, cfg.device)


@torch.no_grad()
def module_inputs(backbone, data, module: str) -> torch.Tensor:
    """The module's inputs in the pretrained model over every batch, padding removed: one row per token."""
    from knots.models.base import to_device

    rows = []
    handle = backbone.encoder.get_submodule(module).register_forward_hook(lambda _m, args, _o: rows.append(args[0]))
    masks = []
    try:
        for batch in data.batches:
            masks.append(backbone.token_mask(batch))
            backbone.encoder(to_device(batch, backbone.device))
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1])[m.reshape(-1).bool()] for x, m in zip(rows, masks)]).double()


def knots_blocks(deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """``V_i^T`` of ``[dW_1 .. dW_n] = U S V^T`` (dense SVD, components above 1e-5), one block per task."""
    _, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    vh = vh[s > 1e-5]
    width = deltas[0].shape[1]
    return [vh[:, i * width:(i + 1) * width] for i in range(len(deltas))]


def test_cka_and_scaling_end_to_end(compose_run, tmp_path):
    cfg = to_run_config(compose_run("logger=none", "methods=[ties]", "analyses=[cka,scaling]", "+analysis_params.scaling.methods=[ties]"))
    out = tmp_path / "run"
    results = run_experiment(cfg, out)

    cka = results["analyses"]["cka"]
    assert cka["tasks"] == TASKS and set(cka["views"]) == {"full", "lora", "knots"}
    for view, matrix in cka["views"].items():
        m = torch.tensor(matrix)
        assert torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(3), atol=1e-6), view
        assert ((m >= -1e-9) & (m <= 1 + 1e-9)).all(), view
        assert cka["mean_pairwise"][view] == pytest.approx(mean_offdiagonal(m.double()), abs=1e-6)
    assert cka["modules"] == 8 and cka["inputs"] > 0 and cka["passes"] == 1
    assert (out / "analyses" / "cka" / "cka.png").is_file() and (out / "analyses" / "cka" / "cka.pdf").is_file()
    full_dirs = [entry["path"] for entry in cka["full_finetuning"]]
    assert [entry["task"] for entry in cka["full_finetuning"]] == TASKS
    assert all((Path(d) / UPDATE_NAME).is_file() for d in full_dirs)

    # every view of one module against a direct computation on its inputs, stacked in memory
    tasks, models = pools(cfg)
    data = tasks.eval_sets(models.backbone, cfg.finetune.eval_batch_size)["validation"]
    adapters = [load_adapter(a["path"]) for a in results["meta"]["adapters"]]
    module = sorted(adapters[0].modules)[-1]
    x = module_inputs(models.backbone, data, module)
    assert x.shape[0] == cka["inputs"]
    lora = [adapter.modules[module].delta(torch.float64) for adapter in adapters]
    full = [load_full_update(d)[f"{module}.weight"].double() for d in full_dirs]
    outputs = {"lora": [x @ d.T for d in lora], "full": [x @ d.T for d in full], "knots": [x @ v.T for v in knots_blocks(lora)]}
    for view, features in outputs.items():
        assert cka["per_module_pairwise"][module][view] == pytest.approx(mean_offdiagonal(cka_matrix(features)), abs=1e-6), view

    scaling = results["analyses"]["scaling"]
    assert scaling["tasks"] == TASKS and list(scaling["methods"]) == ["ties"]
    for name, points in scaling["methods"].items():
        assert [(p["n"], p["count"], p["possible"]) for p in points] == [(2, 3, 3), (3, 1, 1)]
        subsets = scaling["subsets"][name]
        pairs = [s["score"] for s in subsets if len(s["tasks"]) == 2]
        assert points[0]["mean"] == pytest.approx(sum(pairs) / 3)
        assert points[0]["low"] <= points[0]["mean"] <= points[0]["high"]
        (everything,) = [s for s in subsets if len(s["tasks"]) == 3]
        assert everything["from_run"] and everything["score"] == results["methods"][name]["avg_normalized_accuracy"]
    assert (out / "analyses" / "scaling" / "scaling.png").is_file()
    assert scaling["merges_evaluated"] > 0

    # one subset's score against merging its adapters directly and scoring the whole run's test set
    from knots.merging import MergeSession
    from knots.methods import MergedModel
    from knots.pipeline.evaluate import Evaluator, evaluate_finetuned

    subset = next(s for s in scaling["subsets"]["ties"] if s["tasks"] == ["mood", "review"])
    heads = tasks.zero_shot_heads(models.backbone)
    eval_data = tasks.eval_sets(models.backbone, cfg.finetune.eval_batch_size)
    loaded = [models.load(t, a["path"]) for t, a in zip(tasks.tasks, results["meta"]["adapters"])]
    evaluator = Evaluator(models.backbone, heads, eval_data, evaluate_finetuned(models.backbone, heads, eval_data, loaded, [None] * 3))
    chosen = [a.adapter for a in loaded if a.task in subset["tasks"]]
    delta = MergeSession(chosen).merge("ties", **subset["hyperparameters"]).delta_state_dict()
    summary = evaluator.summary("test", MergedModel(delta))
    direct = sum(summary["per_task"][t]["normalized_accuracy"] for t in subset["tasks"]) / 2
    assert subset["score"] == pytest.approx(direct, abs=1e-6)
    # nothing was retrained: the cache holds the three LoRA adapters and the three full updates only
    entries = [p for p in (tmp_path / "logs" / "cache" / "adapters").iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    assert len(entries) == 6


@pytest.mark.parametrize(("overrides", "message"), [
    ("analyses=[cka] +analysis_params.cka.views=[lora,nope]", "cka views"),
    ("analyses=[cka] +analysis_params.cka.nope=1", "analysis cka has no option 'nope'"),
    ("analyses=[cka] +analysis_params.cka.full_finetune.lrr=0.1", "unknown finetuning setting 'lrr'"),
    ("analyses=[scaling] +analysis_params.scaling.methods=[ta,nope]", "unknown method 'nope'"),
    ("analyses=[scaling] +analysis_params.scaling.max_subsets=0", "max_subsets must be >= 1"),
    ("analyses=[scaling] +analysis_params.scaling.search.strategy=random", "search.strategy"),
    ("analyses=[scaling] +analysis_params.scaling.search.metric=joint_hits@3", "unknown setting 'metric'"),
    # where an analysis does not apply to the run
    ("analyses=[scaling] +analysis_params.scaling.sizes=[2,4]", r"scaling sizes must lie in 2\.\.3 \(the run's tasks\)"),
    ("analyses=[scaling] model.head.kind=trained +analysis_params.scaling.methods=[ta,ensemble]",
     "scaling: method ensemble needs zero-shot heads"),
    ("analyses=[cka] +analysis_params.cka.full_finetune.lr=-1", r"cka view full .*finetune.lr must be > 0"),
    ("analyses=[cka] +finetune.init_adapter=some/adapter", r"cka view full .*finetune.init_adapter"),
    ("analyses=[cka] stage=finetune", "analyses run after the merges, which stage=finetune does not reach"),
])
def test_analysis_options_are_checked_before_any_work(compose_run, overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_run_config(compose_run("logger=none", "methods=[ta]", *overrides.split()))


def test_the_full_view_can_be_left_out_where_it_does_not_apply(compose_run):
    """A run whose LoRAs start from a saved adapter has no full-finetuning counterpart: the other views
    still apply (and so does the full view with the start dropped for it)."""
    to_run_config(compose_run("logger=none", "methods=[ta]", "analyses=[cka]", "+finetune.init_adapter=some/adapter",
                              "+analysis_params.cka.views=[lora,knots]"))
    to_run_config(compose_run("logger=none", "methods=[ta]", "analyses=[cka]", "+finetune.init_adapter=some/adapter",
                              "+analysis_params.cka.full_finetune.init_adapter=null"))


def test_analyses_with_trained_heads(compose_run, tmp_path):
    """With a head trained per task (the text6_heads and Llama protocol), CKA compares the LoRA targets only
    (the heads are not updates of a shared weight) and each scaling subset is scored with its tasks' own
    heads, as a direct merge and evaluation gives; the run's normalizers are kept on subsets."""
    from safetensors.torch import load_file

    from knots.analyses.scaling import subset_evaluator
    from knots.merging import MergeSession
    from knots.methods import MergedModel
    from knots.pipeline.evaluate import Evaluator, FinetunedOutputs, evaluate_finetuned

    cfg = to_run_config(compose_run("logger=none", "methods=[ties]", "model.head.kind=trained", "analyses=[cka,scaling]",
                                    "+analysis_params.scaling.methods=[ties,knots_ties]"))
    results = run_experiment(cfg, tmp_path / "run")
    cka, scaling = results["analyses"]["cka"], results["analyses"]["scaling"]
    assert cka["modules"] == 8 and set(cka["mean_pairwise"]) == {"full", "lora", "knots"}
    assert all(torch.allclose(torch.tensor(m).diagonal(), torch.ones(3), atol=1e-6) for m in cka["views"].values())
    first = load_file(f"{cka['full_finetuning'][0]['path']}/{UPDATE_NAME}")  # the trained head is kept apart
    assert any(k.startswith("head.") for k in first) and len(load_full_update(cka["full_finetuning"][0]["path"])) == 8
    assert list(scaling["methods"]) == ["ties", "knots_ties"]
    assert [p["n"] for p in scaling["methods"]["knots_ties"]] == [2, 3]

    tasks, models = pools(cfg)
    data = tasks.eval_sets(models.backbone, cfg.finetune.eval_batch_size)
    loaded = [models.load(t, a["path"]) for t, a in zip(tasks.tasks, results["meta"]["adapters"])]
    heads = models.heads(tasks.tasks, loaded, None)
    assert heads.joint is None and not heads.normalize
    finetuned = evaluate_finetuned(models.backbone, heads, data, loaded, [None] * 3)
    evaluator = Evaluator(models.backbone, heads, data, finetuned)
    subset = next(s for s in scaling["subsets"]["knots_ties"] if s["tasks"] == ["topic", "review"])
    chosen = [a.adapter for a in loaded if a.task in subset["tasks"]]
    delta = MergeSession(chosen).merge("knots_ties", **subset["hyperparameters"]).delta_state_dict()
    summary = evaluator.summary("test", MergedModel(delta))
    direct = sum(summary["per_task"][t]["normalized_accuracy"] for t in subset["tasks"]) / 2
    assert subset["score"] == pytest.approx(direct, abs=1e-6)

    fixed = Evaluator(models.backbone, heads, data, FinetunedOutputs(finetuned.features, finetuned.accuracies,
                                                                     {"mood": 50.0, "topic": 40.0, "review": 80.0}))
    cut = subset_evaluator(fixed, ["mood", "review"])
    assert cut.finetuned.normalizers["test"] == {"mood": 50.0, "review": 80.0}
    assert list(cut.heads.per_task) == ["mood", "review"] and cut.heads.joint is None


@pytest.mark.parametrize("heads", ["zero_shot", "trained"])
def test_fisher_method_end_to_end(compose_run, tmp_path, heads):
    cfg = to_run_config(compose_run("logger=none", "methods=[fisher]", f"model.head.kind={heads}", "benchmark.select=[mood,topic]"))
    results = run_experiment(cfg, tmp_path / "run")
    fisher = results["methods"]["fisher"]
    assert fisher["hyperparameters"]["scaling"] in (0.5, 1.0) and fisher["hyperparameters"]["num_examples"] in (256, 512, 1024, 2048)
    # scaling 0.5 and 1.0 at N = 256, then N = 512 at the better scaling, equal to N = 256 (both are the whole
    # training set): the search stops there
    points = [(p["params"]["scaling"], p["params"]["num_examples"]) for p in fisher["search"]]
    best = max(fisher["search"][:2], key=lambda p: p["val_score"])
    assert points == [(0.5, 256), (1.0, 256), (best["params"]["scaling"], 512)]
    assert fisher["search"][2]["val_score"] == best["val_score"]
    assert math.isfinite(fisher["avg_normalized_accuracy"]) and (fisher["joint"] is None) == (heads == "trained")
    assert (tmp_path / "run" / "figures" / "search.png").is_file() and (tmp_path / "run" / "figures" / "per_task.pdf").is_file()


def test_full_finetuning_mode(compose_run, tmp_path):
    with pytest.raises(ConfigError, match="finetune.mode=full"):
        to_run_config(compose_run("finetune.mode=full"))
    with pytest.raises(ConfigError, match="finetune.mode"):
        to_run_config(compose_run("finetune.mode=dense", "stage=finetune"))
    cfg = to_run_config(compose_run("logger=none", "stage=finetune", "finetune.mode=full", "model.head.kind=trained", "methods=[ta]",
                                    "benchmark.select=[mood,topic]"))
    first = run_experiment(cfg, tmp_path / "first")
    again = run_experiment(cfg, tmp_path / "again")
    assert [a["reused"] for a in first["meta"]["adapters"]] == [False, False]
    assert [a["reused"] for a in again["meta"]["adapters"]] == [True, True]
    from safetensors.torch import load_file

    lora = to_run_config(compose_run("logger=none", "stage=finetune", "model.head.kind=trained", "methods=[ta]", "benchmark.select=[mood,topic]"))
    lora_run = run_experiment(lora, tmp_path / "lora")
    assert lora_run["meta"]["adapters"][0]["path"] != first["meta"]["adapters"][0]["path"]  # the mode is in the cache key
    modules = sorted(load_adapter(lora_run["meta"]["adapters"][0]["path"]).modules)
    saved = load_file(f"{first['meta']['adapters'][0]['path']}/{UPDATE_NAME}")
    update = load_full_update(first["meta"]["adapters"][0]["path"])
    assert sorted(update) == [f"{m}.weight" for m in modules]  # exactly LoRA's target modules, dense
    assert all(d.abs().sum() > 0 and d.shape[0] > 4 for d in update.values())  # full rank-capable updates, trained
    assert {k for k in saved if k.startswith("head.")} == {"head.score.weight"}  # the trained head is kept
