"""Adapters written by PEFT itself: reading them, and PEFT loading what knots-merge exports."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from knots.errors import AdapterError
from knots.lora import load_adapter
from knots.merging import MergeSession
from knots.atomic import atomic_directory
from knots.merging.export import write_merge_outputs

from .helpers import TinyModel, assert_peft_forward_matches_delta


def peft_delta(directory, module):
    """The update PEFT itself applies: merged weight minus base weight."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = TinyModel()
    before = dict(base.named_parameters())[f"{module}.weight"].detach().clone()
    merged = PeftModel.from_pretrained(base, str(directory)).merge_and_unload()
    return dict(merged.named_parameters())[f"{module}.weight"].detach() - before


@pytest.mark.parametrize("index", [0, 1, 2])
def test_reading_matches_peft_scaling(peft_adapters, index):
    adapter = load_adapter(peft_adapters[index])
    assert set(adapter.modules) == {f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    for module, lora in adapter.modules.items():
        assert torch.allclose(lora.delta(), peft_delta(peft_adapters[index], module), atol=1e-5)
    if index == 2:
        assert adapter.modules["layers.1.q_proj"].rank == 3
        assert adapter.modules["layers.0.v_proj"].scale == pytest.approx(2 / 8)


def test_key_variants_are_normalised(peft_adapters, tmp_path):
    reference = load_adapter(peft_adapters[0])
    weights = load_file(str(peft_adapters[0] / "adapter_model.safetensors"))
    renamed = {key.replace("q_proj.lora_A.weight", "q_proj.base_layer.lora_A.default.weight").replace("q_proj.lora_B.weight", "q_proj.base_layer.lora_B.default.weight"): value for key, value in weights.items()}
    shutil.copy(peft_adapters[0] / "adapter_config.json", tmp_path / "adapter_config.json")
    torch.save(renamed, tmp_path / "adapter_model.bin")
    variant = load_adapter(tmp_path)
    assert set(variant.modules) == set(reference.modules)
    for module in reference.modules:
        assert torch.equal(variant.modules[module].delta(), reference.modules[module].delta())


def corrupt(directory, kind):
    if kind == "nan":
        weights = load_file(str(directory / "adapter_model.safetensors"))
        key = next(iter(weights))
        weights[key][0, 0] = float("nan")
        save_file(weights, str(directory / "adapter_model.safetensors"))
    elif kind == "truncated":
        data = (directory / "adapter_model.safetensors").read_bytes()
        (directory / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "not_lora":
        config = json.loads((directory / "adapter_config.json").read_text())
        config["peft_type"] = "IA3"
        (directory / "adapter_config.json").write_text(json.dumps(config))
    elif kind == "bad_json":
        (directory / "adapter_config.json").write_text("{not json")
    elif kind == "no_weights":
        (directory / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize("kind,message", [("nan", "NaN or Inf"), ("truncated", "corrupt or unreadable"), ("not_lora", "not LoRA"), ("bad_json", "unreadable JSON"), ("no_weights", "no adapter_model")])
def test_bad_adapters_are_rejected(peft_adapters, tmp_path, kind, message):
    broken = tmp_path / "broken"
    shutil.copytree(peft_adapters[0], broken)
    corrupt(broken, kind)
    with pytest.raises(AdapterError, match=message):
        load_adapter(broken)


def test_shape_mismatch_names_module_and_shapes(peft_adapters, tmp_path):
    weights = load_file(str(peft_adapters[1] / "adapter_model.safetensors"))
    key = next(k for k in weights if "layers.0.v_proj.lora_B" in k)
    weights[key] = torch.randn(5, weights[key].shape[1])
    shutil.copytree(peft_adapters[1], tmp_path / "odd")
    save_file(weights, str(tmp_path / "odd" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"layers\.0\.v_proj.*\(8, 16\).*\(5, 16\)"):
        MergeSession([load_adapter(peft_adapters[0]), load_adapter(tmp_path / "odd")])


@pytest.mark.parametrize("method", ["knots_ties", "knots_dare_ties", "ta", "knots_row_ties"])
def test_exported_adapter_reproduces_the_merge_in_peft(peft_adapters, tmp_path, method):
    """PEFT loads the written adapter; its forward equals the base model plus the merged dW."""
    adapters = [load_adapter(path) for path in peft_adapters]
    result = MergeSession(adapters).merge(method, scaling=0.6, top_k=40, p=0.2)
    with atomic_directory(tmp_path / "out") as staging:
        write_merge_outputs(result, staging, dict(adapters[0].config))
    delta = load_file(str(tmp_path / "out" / "delta_weights.safetensors"))
    assert set(delta) == {f"{m}.weight" for m in result.modules}

    assert_peft_forward_matches_delta(tmp_path / "out" / "adapter", delta)


def test_truncated_export_reports_error_and_loads(peft_adapters, tmp_path):
    from peft import PeftModel

    adapters = [load_adapter(path) for path in peft_adapters]
    result = MergeSession(adapters).merge("ties", scaling=0.5, top_k=30)
    with atomic_directory(tmp_path / "out") as staging:
        report = write_merge_outputs(result, staging, dict(adapters[0].config), save_adapter=False, export_rank=16)
    assert not (tmp_path / "out" / "adapter").exists()
    errors = report["truncated_adapter"]["relative_error"]
    assert errors["max"] < 1e-5  # rank 16 holds every 16-wide module exactly
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(TinyModel(), str(tmp_path / "out" / "adapter_rank16"))
    delta = load_file(str(tmp_path / "out" / "delta_weights.safetensors"))
    merged = model.merge_and_unload()
    torch.manual_seed(0)
    base = TinyModel().state_dict()
    for key, value in delta.items():
        assert torch.allclose(merged.state_dict()[key] - base[key], value, atol=1e-4)
    with atomic_directory(tmp_path / "low") as staging:
        report = write_merge_outputs(result, staging, dict(adapters[0].config), save_adapter=False, export_rank=2)
    assert 0 < report["truncated_adapter"]["relative_error"]["mean"] < 1


def test_sharded_delta_has_an_index(peft_adapters, tmp_path):
    adapters = [load_adapter(path) for path in peft_adapters]
    result = MergeSession(adapters).merge("knots_ties", scaling=0.5, top_k=30)
    with atomic_directory(tmp_path / "out") as staging:
        files = write_merge_outputs(result, staging, {}, save_adapter=False, max_shard_bytes=1500)["files"]
    index = json.loads((tmp_path / "out" / "delta_weights.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and set(shards) <= set(files)
    merged = {}
    for shard in shards:
        merged.update(load_file(str(tmp_path / "out" / shard)))
    expected = result.delta_state_dict()
    assert set(merged) == set(expected) and all(torch.equal(merged[k], expected[k]) for k in merged)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
