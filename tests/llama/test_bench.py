"""The Llama benchmark: its shape arithmetic matches transformers' Llama3-8B, and it runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.bench_llama import LLAMA3_8B, bench_tiny, main, parameter_counts, projection_shapes


def test_parameter_counts_and_shapes_match_the_real_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    two_layers = {**LLAMA3_8B, "num_hidden_layers": 2}  # full width, fewer layers: quick to build
    cfg = LlamaConfig(**two_layers, num_labels=3)
    with torch.device("meta"):
        causal, classifier = LlamaForCausalLM(cfg), LlamaForSequenceClassification(cfg)
    c = parameter_counts(two_layers)
    assert sum(p.numel() for p in causal.parameters()) == c["embedding"] + c["layers"] + c["lm_head"]
    assert sum(p.numel() for p in classifier.parameters()) == c["embedding"] + c["layers"] + c["score"]
    c = parameter_counts()
    assert c["embedding"] + c["layers"] + c["lm_head"] == 8_030_261_248  # Meta-Llama-3-8B
    attn = classifier.model.layers[0].self_attn
    assert {k: tuple(getattr(attn, k).weight.shape) for k in projection_shapes()} == projection_shapes()
    assert projection_shapes()["k_proj"] == (1024, 4096)  # GQA: 8 key/value heads of 128
    assert c["targeted"] == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096) and c["lora"] == 32 * 16 * (4 * 4096 + 2 * 4096 + 2 * 1024)


@pytest.fixture
def one_thread():
    """One torch thread (the benchmark's option), restored afterwards: two threads on a busy 2-core machine
    spin against each other and run these elementwise ops tens of times slower."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_runs_end_to_end(tmp_path, one_thread):
    assert main(["--layers", "1", "--threads", "1", "--skip", "layer", "tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_llama.json").read_text())
    steps = [r["step"] for r in res["apply"]["rows"]]
    assert steps[0].startswith("copy") and "restore" in steps and res["apply"]["saved_gib"] * 2**30 == 2 * res["apply"]["targeted_weights"]
    assert "| apply dense float32 update |" in (tmp_path / "bench_llama.md").read_text()
    tiny = bench_tiny(n=32, batch=16, steps=1)
    assert tiny["eval length-sorted batches"]["padded_tokens"] <= tiny["eval random batches"]["padded_tokens"]
