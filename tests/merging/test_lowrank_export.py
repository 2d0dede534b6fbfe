"""Iso-C, Iso-CTS, TSV-M and the Core Space merges exported as PEFT adapters, and run by knots-merge."""

import json

import pytest
import torch
from safetensors.torch import load_file

from knots.lora import load_adapter
from knots.merging import MergeSession
from knots.atomic import atomic_directory
from knots.merging.export import write_merge_outputs
from knots.config.resources import config_dir

from .helpers import assert_peft_forward_matches_delta

NEW_METHODS = ["iso_c", "iso_cts", "tsv_m", "core_ta", "core_ties", "core_dare_ties", "core_tsv", "core_iso_c"]


@pytest.mark.parametrize("svd_path", ["factored", "dense"])
@pytest.mark.parametrize("method", NEW_METHODS)
def test_exported_adapter_reproduces_the_merge_in_peft(peft_adapters, tmp_path, method, svd_path):
    """PEFT loads the written adapter; its forward equals the base model plus the merged dW."""
    adapters = [load_adapter(path) for path in peft_adapters]
    result = MergeSession(adapters, svd_path=svd_path).merge(method, scaling=0.6, top_k=40, p=0.2)
    assert result.exact_low_rank
    with atomic_directory(tmp_path / "out") as staging:
        report = write_merge_outputs(result, staging, dict(adapters[0].config))
    delta = load_file(str(tmp_path / "out" / "delta_weights.safetensors"))
    for module, rank in report["adapter"]["ranks"].items():
        out_features, in_features = result.taskset.shapes[module]
        assert rank <= min(out_features, in_features, sum(result.taskset.ranks(module)))

    assert_peft_forward_matches_delta(tmp_path / "out" / "adapter", delta)


def compose_merge(overrides):
    from hydra import compose, initialize_config_dir

    from knots.cli.merge_schema import register_merge_schema

    register_merge_schema()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("merge", overrides=overrides)


@pytest.mark.parametrize("method,svd_path", [("iso_cts", "factored"), ("tsv_m", "dense"), ("core_ties", "factored"), ("core_iso_c", "dense")])
def test_knots_merge_runs_every_new_method(peft_adapters, tmp_path, method, svd_path):
    """The CLI's merge, from its config files, with only the adapter written (the merges are exact)."""
    from knots.cli.merge import run

    out = tmp_path / "merged"
    cfg = compose_merge([f"adapters=[{','.join(map(str, peft_adapters))}]", f"method={method}", f"out={out}", "save_delta=false", "progress=false", f"alignment.svd_path={svd_path}", "alignment.save=true"])
    summary = run(cfg)
    written = json.loads((out / "merge.json").read_text())
    assert written["method"]["name"] == method and written["method"]["reference"].startswith(("Marczak", "Gargiulo", "Panariello"))
    assert set(written["hyperparameters"]) == set(summary["hyperparameters"]) and "scaling" in written["hyperparameters"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "delta_weights.safetensors").exists()
    assert (out / "alignment" / "ingredients.safetensors").is_file()


def test_core_space_round_trip(peft_adapters, tmp_path):
    from knots.merging import Ingredients

    adapters = [load_adapter(path) for path in peft_adapters]
    session = MergeSession(adapters)
    before = {m: session.merge(m, scaling=0.5, top_k=30).delta_state_dict() for m in ("core_ties", "tsv_m")}
    session.ingredients("core").save(tmp_path)
    fresh = MergeSession(adapters)
    fresh.set_ingredients(Ingredients.load(tmp_path))
    for method, delta in before.items():
        after = fresh.merge(method, scaling=0.5, top_k=30).delta_state_dict()
        assert all(torch.equal(delta[k], after[k]) for k in delta)
    assert "align_core" not in fresh.timings
