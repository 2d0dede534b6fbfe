"""In-place apply / restore of a merged update: exact rounding, bit-identical restore, errors, memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from knots.errors import AdapterError
from knots.models.apply import WeightPatch, applied

INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that comparisons are exact (also for -0.0 and NaN)."""
    return t.detach().view(INT_VIEW[t.dtype]).clone()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: bits(p) for n, p in model.named_parameters()}


def assert_same_bits(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(bits(p), before[n]), n


def attention_like(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Two blocks with GQA-shaped projections (q/o 16x16, k/v 8x16) plus an untouched layer."""
    torch.manual_seed(seed)
    blocks = nn.ModuleList(
        nn.ModuleDict({"q_proj": nn.Linear(16, 16, bias=False), "k_proj": nn.Linear(16, 8, bias=False),
                       "v_proj": nn.Linear(16, 8, bias=False), "o_proj": nn.Linear(16, 16, bias=False)})
        for _ in range(2))
    model = nn.ModuleDict({"layers": blocks, "score": nn.Linear(16, 3)})
    return model.to(dtype)


def targets(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]


def random_delta(model: nn.Module, dtype=torch.float32, scale=1e-2, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: (scale * torch.randn(params[n].shape, generator=g, dtype=torch.float64)).to(dtype) for n in targets(model)}


@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_applied_is_base_plus_delta_rounded_once_and_restore_is_bit_identical(dtype, chunk, monkeypatch):
    if chunk is not None:  # CPU writes go in chunks of rows; 40 elements = 2 rows of 16 (k/v have 8 rows)
        monkeypatch.setattr("knots.models.apply.CPU_CHUNK", chunk)
    model = attention_like(dtype)
    before = snapshot(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = random_delta(model)
    with applied(model, delta) as patch:
        params = dict(model.named_parameters())
        for n, d in delta.items():
            expected = (base[n].float() + d.float()).to(dtype)
            assert torch.equal(bits(params[n]), bits(expected)), n
        assert torch.equal(bits(params["score.weight"]), before["score.weight"])
        assert patch.saved_bytes == sum(base[n].numel() * base[n].element_size() for n in delta)
    assert_same_bits(model, before)


def test_bf16_rounds_the_float32_sum_not_a_rounded_delta():
    """Rounding the delta to bf16 before adding (a double rounding) gives other weights."""
    model = attention_like(torch.bfloat16)
    base = dict((n, p.detach().clone()) for n, p in model.named_parameters())
    delta = random_delta(model)
    with applied(model, delta):
        w = dict(model.named_parameters())["layers.0.q_proj.weight"]
        double = base["layers.0.q_proj.weight"] + delta["layers.0.q_proj.weight"].to(torch.bfloat16)
        exact = (base["layers.0.q_proj.weight"].float() + delta["layers.0.q_proj.weight"]).to(torch.bfloat16)
        assert torch.equal(w, exact) and not torch.equal(w, double)


@pytest.mark.parametrize("delta_dtype", [torch.bfloat16, torch.float64])
def test_delta_dtypes(delta_dtype):
    model = attention_like(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = random_delta(model, dtype=delta_dtype)
    acc = torch.float64 if delta_dtype == torch.float64 else torch.float32
    with applied(model, delta):
        for n, p in model.named_parameters():
            if n in delta:
                assert torch.equal(bits(p), bits((base[n].to(acc) + delta[n].to(acc)).to(torch.bfloat16))), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_factored_update_is_the_float32_product(dtype):
    model = attention_like(dtype)
    before = snapshot(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    factors = {n: (torch.randn(params[n].shape[0], 4, generator=g), 1e-2 * torch.randn(4, params[n].shape[1], generator=g))
               for n in targets(model)}
    with applied(model, factors):
        for n, (b, a) in factors.items():
            assert torch.equal(bits(params[n]), bits((base[n].float() + b @ a).to(dtype))), n
    assert_same_bits(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_restored_on_exception_in_the_block(dtype):
    model = attention_like(dtype)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with applied(model, random_delta(model)):
            assert not torch.equal(bits(model["layers"][0]["q_proj"].weight), before["layers.0.q_proj.weight"])
            raise RuntimeError("boom")
    assert_same_bits(model, before)


class ExplodingMapping(dict):
    """A lazy delta whose third value fails to compute (e.g. out of memory)."""

    def __getitem__(self, key):
        if list(self).index(key) == 2:
            raise MemoryError("no room for this delta")
        return super().__getitem__(key)

    def items(self):
        return ((k, self[k]) for k in self)


def test_restored_when_applying_fails_midway():
    model = attention_like(torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(MemoryError):
        with applied(model, ExplodingMapping(random_delta(model))):
            pytest.fail("the block must not run")
    assert_same_bits(model, before)
    bad = random_delta(model)
    bad["layers.1.k_proj.weight"] = torch.zeros(16, 16)
    with pytest.raises(AdapterError, match=r"update for 'layers.1.k_proj.weight' has shape \[16, 16\], the weight \[8, 16\]"):
        with applied(model, bad):
            pass
    assert_same_bits(model, before)
    factors = {"layers.0.q_proj.weight": (torch.zeros(16, 4), torch.zeros(5, 16))}
    with pytest.raises(AdapterError, match="invalid factors"):
        with applied(model, factors):
            pass
    assert_same_bits(model, before)


def test_unknown_parameter_is_one_line_error_and_nothing_changes():
    model = attention_like(torch.bfloat16)
    before = snapshot(model)
    delta = random_delta(model)
    delta["layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 16)
    with pytest.raises(AdapterError, match=r"update for unknown parameter 'layers.0.self_attn.q_proj.weight'") as e:
        with applied(model, delta):
            pass
    assert "\n" not in str(e.value)
    assert_same_bits(model, before)
    patch = WeightPatch(model, targets(model)[:2])
    with pytest.raises(AdapterError, match="which this patch does not hold"):
        patch.apply({targets(model)[3]: torch.zeros(16, 16)})
    assert_same_bits(model, before)


def test_patch_applies_many_points_from_one_copy_in_place():
    model = attention_like(torch.bfloat16)
    before = snapshot(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    patch = WeightPatch(model, targets(model))
    d1, d2 = random_delta(model, seed=1), random_delta(model, seed=2)
    patch.apply(d1)
    patch.apply(d2)  # base + d2, not base + d1 + d2
    params = dict(model.named_parameters())
    for n in targets(model):
        assert torch.equal(params[n], (base[n].float() + d2[n]).to(torch.bfloat16))
    first = targets(model)[0]
    patch.apply({first: d1[first]})  # the others go back to their base
    assert torch.equal(params[first], (base[first].float() + d1[first]).to(torch.bfloat16))
    assert all(torch.equal(bits(params[n]), before[n]) for n in targets(model)[1:])
    patch.restore()
    assert_same_bits(model, before)
    assert pointers == {n: p.data_ptr() for n, p in model.named_parameters()}  # no parameter was replaced


def test_offload_keeps_the_copy_on_the_cpu():
    model = attention_like(torch.bfloat16)
    before = snapshot(model)
    with applied(model, random_delta(model), offload=True) as patch:
        assert all(t.device.type == "cpu" for t in patch.base.values())
    assert_same_bits(model, before)


def test_tiny_llama_logits_equal_a_model_holding_the_merged_weights(tmp_path):
    """Through PEFT's wrapping: q/k/v/o base weights of a LoRA model, GQA shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from knots.models.tiny import write_tiny_llama

    path = write_tiny_llama(tmp_path / "llama", pad_token=True)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, local_files_only=True, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            task_type="SEQ_CLS")).eval()
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.base_layer.weight")]
    assert len(names) == 8
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tok(["the red cat runs now .", "a dog ."], ["a cat runs .", "a cow eats ."], padding=True, return_tensors="pt")
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(5)
    delta = {n: 0.05 * torch.randn(params[n].shape, generator=g) for n in names}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        ref_params = dict(reference.named_parameters())
        for n, d in delta.items():
            ref_params[n].copy_((ref_params[n].float() + d).to(torch.bfloat16))
        before_logits = model(**batch).logits
        with applied(model, delta):
            merged = model(**batch).logits
        after_logits = model(**batch).logits
        expected = reference(**batch).logits
    assert torch.equal(merged, expected) and not torch.equal(merged, before_logits)
    assert torch.equal(after_logits, before_logits)


def test_lora_updates_multiply_to_the_dense_delta_bit_for_bit():
    """Finetuned models and RegMean apply an adapter's factors; they give exactly its dense update."""
    from knots.lora import LoraAdapter, LoraModule
    from knots.models.apply import dense_update, lora_updates

    g = torch.Generator().manual_seed(3)
    modules = {"a": LoraModule(torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 0.5),
               "b": LoraModule(torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 2.0, fan_in_fan_out=True)}
    adapter = LoraAdapter("t", modules)
    dense = adapter.delta_state_dict()
    factored = lora_updates(adapter)
    assert isinstance(factored["a.weight"], tuple) and not isinstance(factored["b.weight"], tuple)
    for name, update in factored.items():
        assert torch.equal(dense_update(update, torch.device("cpu")), dense[name]), name
