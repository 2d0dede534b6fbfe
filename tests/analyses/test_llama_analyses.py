"""The analyses on the Llama path (the tiny Llama, sentence pairs, last-token pooling, trained heads):
CKA over every non-padding token of the validation pairs, against a direct computation, and scaling
from the cached adapters."""

from __future__ import annotations

import pytest
import torch

from knots.analyses.cka import cka_matrix, mean_offdiagonal
from knots.config.schema import to_run_config
from knots.lora import load_adapter
from knots.pipeline.full import load_full_update
from knots.pipeline.run import run_experiment
from tests.analyses.test_pipeline_analyses import knots_blocks, module_inputs, pools
from tests.llama.test_pipeline import compose


def test_cka_and_scaling_on_the_llama_smoke_run(tmp_path):
    cfg = to_run_config(compose(tmp_path, "experiment=llama_smoke", "methods=[ties]", "finetune.steps=20", "analyses=[cka,scaling]",
                                "+analysis_params.scaling.methods=[ties,knots_ties]", "+analysis_params.cka.full_finetune.steps=20"))
    results = run_experiment(cfg, tmp_path / "run")
    cka, scaling = results["analyses"]["cka"], results["analyses"]["scaling"]
    names = results["meta"]["tasks"]
    assert cka["tasks"] == names and set(cka["views"]) == {"full", "lora", "knots"}

    tasks, models = pools(cfg)
    data = tasks.eval_sets(models.backbone, cfg.finetune.eval_batch_size)["validation"]
    adapters = [load_adapter(a["path"]) for a in results["meta"]["adapters"]]
    assert cka["modules"] == len(adapters[0].modules)  # the LoRA targets; the trained heads are not compared
    module = sorted(adapters[0].modules)[0]
    x = module_inputs(models.backbone, data, module)  # one row per token of both sentences, padding removed
    assert x.shape[0] == cka["inputs"] == sum(int(b["attention_mask"].sum()) for b in data.batches)
    lora = [adapter.modules[module].delta(torch.float64) for adapter in adapters]
    full = [load_full_update(entry["path"])[f"{module}.weight"].double() for entry in cka["full_finetuning"]]
    outputs = {"lora": [x @ d.T for d in lora], "full": [x @ d.T for d in full], "knots": [x @ v.T for v in knots_blocks(lora)]}
    for view, features in outputs.items():
        assert cka["per_module_pairwise"][module][view] == pytest.approx(mean_offdiagonal(cka_matrix(features)), abs=1e-6), view

    assert [(p["n"], p["count"]) for p in scaling["methods"]["knots_ties"]] == [(2, 3), (3, 1)]
    assert all(p["mean"] == p["mean"] for points in scaling["methods"].values() for p in points)  # no NaN
