"""Llama3-8B at scale: applying merged updates in place, the memory a run needs, tiny-model throughput.

    python -m experiments.bench_llama                    # everything, 32 layers
    python -m experiments.bench_llama --layers 4 --skip layer   # quick

1. ``apply``: the 128 LoRA-targeted weights of Llama3-8B (32 layers of q_proj 4096x4096, k_proj and
   v_proj 1024x4096 with GQA, o_proj 4096x4096; bf16) are built alone, without the rest of the
   model. It times ``WeightPatch`` (copy, apply of a dense float32 update and of a factored rank-96
   update, restore) and the copy-add-restore scheme it replaces, counts the bytes each moves, and
   compares them with the machine's measured copy bandwidth. Extra memory is the peak resident set
   size above the baseline (Linux ``/proc/self/clear_refs``) or, on CUDA, the allocator's peak.
2. ``layer``: one decoder layer at full Llama3-8B width with LoRA r16 on q/k/v/o (float32
   adapters, dropout 0.1, as PEFT builds them on a bf16 model): the bytes autograd saves per token,
   which with gradient checkpointing is what one recomputed layer holds during backward.
3. ``tiny``: a small random ``LlamaForSequenceClassification`` with GQA on CPU: evaluation
   throughput with length-sorted vs random batches, LoRA finetuning throughput with and without
   gradient checkpointing.

Prints a markdown report and writes ``bench_llama.md`` / ``.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from knots.models.apply import WeightPatch, applied
from knots.atomic import write_json, write_text

#: meta-llama/Meta-Llama-3-8B (config.json).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256)
GIB = 2**30


def projection_shapes(cfg: dict = LLAMA3_8B) -> dict[str, tuple[int, int]]:
    """(out, in) of the four attention projections of one layer; k/v are narrower under GQA."""
    d, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"q_proj": (cfg["num_attention_heads"] * cfg["head_dim"], d), "k_proj": (kv, d), "v_proj": (kv, d),
            "o_proj": (d, cfg["num_attention_heads"] * cfg["head_dim"])}


def parameter_counts(cfg: dict = LLAMA3_8B, rank: int = 16) -> dict[str, int]:
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    attn = sum(o * i for o, i in projection_shapes(cfg).values())
    layer = attn + 3 * d * f + 2 * d
    lora = n * sum(rank * (o + i) for o, i in projection_shapes(cfg).values())
    return {"embedding": cfg["vocab_size"] * d, "layers": n * layer + d, "lm_head": cfg["vocab_size"] * d,
            "targeted": n * attn, "lora": lora, "score": 3 * d}


# ---- memory meters ---------------------------------------------------------------------------------

def _status_mib(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def peak_extra(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(seconds, peak bytes above the memory in use before) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before
    ctypes.CDLL(None).malloc_trim(0)  # give freed heap memory back, so that the baseline holds no reusable pages
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (_status_mib("VmHWM") - before) * 2**20


def copy_bandwidth(device: torch.device, nbytes: int = GIB) -> float:
    """Bytes per second of a large tensor copy (read + write counted), best of three."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


# ---- 1. apply / restore at the real shapes -----------------------------------------------------------

def targeted_layers(layers: int, device: torch.device) -> nn.Module:
    """Only the LoRA-targeted linear layers of Llama3-8B, bf16, named as in the HF model."""
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(layers):
        attn = nn.Module()
        for name, (out, inp) in projection_shapes().items():
            lin = nn.Linear(inp, out, bias=False, device="meta")
            lin.weight = nn.Parameter(torch.empty(out, inp, dtype=torch.bfloat16, device=device).normal_(0, 0.02),
                                      requires_grad=False)
            setattr(attn, name, lin)
        block = nn.Module()
        block.self_attn = attn
        model.layers.append(block)
    return model


def old_applied(module: nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """The scheme ``WeightPatch`` replaces: clone, add the delta rounded to the weight dtype, copy back."""
    params = dict(module.named_parameters())
    saved = {k: params[k].detach().clone() for k in delta}
    with torch.no_grad():
        for k, d in delta.items():
            params[k].add_(d.to(params[k].dtype))
        for k, w in saved.items():
            params[k].copy_(w)


def bench_apply(layers: int, device: torch.device, rank: int = 96) -> dict:
    model = targeted_layers(layers, device)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values())
    # one float32 delta per shape, shared by every layer: the bytes read per apply are the same as with
    # distinct deltas, and the benchmark does not need 4 bytes x 1.3e9 of RAM for them
    g = torch.Generator(device=device).manual_seed(0)
    dense = {s: 1e-3 * torch.randn(s, generator=g, device=device) for s in set(projection_shapes().values())}
    factors = {s: (torch.randn(s[0], rank, generator=g, device=device), 1e-3 * torch.randn(rank, s[1], generator=g, device=device))
               for s in dense}
    delta = {k: dense[tuple(p.shape)] for k, p in params.items()}
    factored = {k: factors[tuple(p.shape)] for k, p in params.items()}
    bandwidth = copy_bandwidth(device, min(GIB, 2 * n))
    holder: dict = {}
    rows = []

    def row(step: str, fn: Callable[[], object], bytes_per_weight: float | None) -> None:
        seconds, extra = peak_extra(fn, device)
        moved = None if bytes_per_weight is None else bytes_per_weight * n
        rows.append({"step": step, "seconds": seconds, "extra_gib": extra / GIB,
                     "bytes_gib": None if moved is None else moved / GIB,
                     "floor_seconds": None if moved is None else moved / bandwidth})

    row("copy the targeted weights (WeightPatch)", lambda: holder.setdefault("patch", WeightPatch(model, names)), 4)
    patch = holder["patch"]
    row("apply dense float32 update", lambda: patch.apply(delta), 8)
    row(f"apply factored update (rank {rank}, float32)", lambda: patch.apply(factored), None)
    row("restore", patch.restore, 4)

    def held_point() -> None:
        patch.apply(delta)
        patch.restore()

    row("search point, patch held for the search (apply + restore)", held_point, 12)
    saved = patch.saved_bytes
    del holder["patch"], patch

    def fresh_point() -> None:
        with applied(model, delta):
            pass

    row("search point, applied() per point (copy + apply + restore)", fresh_point, 16)
    row("clone + add rounded delta + restore (replaced scheme)", lambda: old_applied(model, delta), 20)
    counts = parameter_counts()
    flops = 2 * rank * counts["targeted"] * layers // LLAMA3_8B["num_hidden_layers"]
    return {"layers": layers, "targeted_weights": n, "weights_gib": 2 * n / GIB, "saved_gib": saved / GIB,
            "copy_bandwidth_gbs": bandwidth / 1e9, "factored_flops": flops, "rows": rows}


# ---- 2. activation bytes of one full-width layer -----------------------------------------------------

def layer_saved_bytes(tokens: int = 32) -> dict:
    """Bytes autograd saves per token in one bf16 Llama3-8B decoder layer with float32 LoRA r16 on q/k/v/o."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": 1}, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(torch.bfloat16).requires_grad_(False)
    layer = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), layer)
    for name, p in layer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    layer.train()
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rope = LlamaRotaryEmbedding(cfg)(x, torch.arange(tokens)[None])
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, position_embeddings=rope)
    out = out[0] if isinstance(out, tuple) else out
    # weights are not activations, and the layer input is the checkpoint, counted apart
    excluded = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    saved = sum(b for ptr, b in seen.items() if ptr not in excluded)
    return {"tokens": tokens, "saved_bytes_per_token": saved / tokens,
            "checkpoint_bytes_per_token_per_layer": cfg.hidden_size * 2}


def memory_budget(layer: dict | None, gpu_gib: float = 48.0, overhead_gib: float = 2.0) -> dict:
    """Weights, adapter + optimizer state, and the tokens per batch that fit ``gpu_gib`` when finetuning."""
    c = parameter_counts()
    weights = 2 * (c["embedding"] + c["layers"] + c["score"])  # bf16; the sequence classifier has no lm_head
    adapter = 16 * (c["lora"] + c["score"])  # float32 weight + grad + AdamW m and v
    free = gpu_gib * GIB - weights - adapter - overhead_gib * GIB
    # evaluation keeps no activations: per token, one layer's live tensors at most (residual in and out in
    # bf16, the RMSNorm's float32 temporaries, and the MLP's gate, up, activation and product)
    d, f = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"]
    eval_per_token = 2 * 2 * d + 2 * 4 * d + 4 * 2 * f
    out = {"weights_gib": weights / GIB, "adapter_and_optimizer_gib": adapter / GIB, "gpu_gib": gpu_gib,
           "overhead_gib": overhead_gib, "eval_kib_per_token": eval_per_token / 1024,
           "eval_tokens_per_batch": int((free + adapter) // eval_per_token)}
    if layer is not None:
        ckpt = LLAMA3_8B["num_hidden_layers"] * layer["checkpoint_bytes_per_token_per_layer"]
        # during the backward pass of one layer: its saved activations and gradients of about the same size
        per_token = ckpt + 2 * layer["saved_bytes_per_token"]
        out.update(checkpoint_kib_per_token=ckpt / 1024, layer_kib_per_token=layer["saved_bytes_per_token"] / 1024,
                   train_kib_per_token=per_token / 1024, train_tokens_per_batch=int(free // per_token))
    return out


# ---- 3. tiny model throughput ------------------------------------------------------------------------

TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=1024, max_position_embeddings=512)


def bench_tiny(n: int = 512, batch: int = 32, steps: int = 20, seed: int = 0) -> dict:
    """Evaluation and LoRA finetuning throughput of a random ``LlamaForSequenceClassification`` on CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = LlamaConfig(**TINY, num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg).eval()
    lengths = [min(200, max(12, int(rng.lognormvariate(3.9, 0.5)))) for _ in range(n)]  # NLI-like pair lengths
    seqs = [torch.randint(1, cfg.vocab_size, (length,)) for length in lengths]

    def batches(order: list[int]) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(order), batch):
            chunk = [seqs[j] for j in order[i:i + batch]]
            ids = torch.zeros(len(chunk), max(len(s) for s in chunk), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, :len(s)] = s
            out.append(ids)
        return out

    def evaluate(bs: list[torch.Tensor]) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for ids in bs:
                model(input_ids=ids, attention_mask=(ids != 0).long())
        return time.perf_counter() - start

    shuffled = list(range(n))
    rng.shuffle(shuffled)
    result = {"config": TINY, "examples": n, "batch": batch, "real_tokens": sum(lengths)}
    for label, order in (("random batches", shuffled), ("length-sorted batches", sorted(range(n), key=lengths.__getitem__))):
        bs = batches(order)
        evaluate(bs[:2])  # warm-up
        seconds = evaluate(bs)
        result[f"eval {label}"] = {"seconds": seconds, "examples_per_s": n / seconds,
                                   "padded_tokens": sum(b.numel() for b in bs)}
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-5)
    train = batches(sorted(shuffled[:steps * batch], key=lengths.__getitem__))
    labels = torch.randint(0, 3, (batch,))
    for checkpointing in (False, True):
        if checkpointing:
            peft_model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.train()
        start = time.perf_counter()
        for ids in train:
            loss = nn.functional.cross_entropy(peft_model(input_ids=ids, attention_mask=(ids != 0).long()).logits,
                                               labels[:len(ids)])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - start
        result[f"finetune, gradient checkpointing {'on' if checkpointing else 'off'}"] = {
            "seconds": seconds, "examples_per_s": steps * batch / seconds}
    return result


# ---- report ------------------------------------------------------------------------------------------

def report(res: dict) -> str:
    lines = [f"Machine: {res['machine']}, {res['cpus']} CPUs ({res['threads']} torch threads; load average "
             f"{res['load_before']:.1f} before, {res['load_after']:.1f} after), torch {res['torch']}, device {res['device']}.", ""]
    if "apply" in res:
        a = res["apply"]
        lines += [f"**Apply / restore** at the Llama3-8B shapes ({a['layers']} layers, {a['targeted_weights'] / 1e9:.2f} B "
                  f"targeted weights = {a['weights_gib']:.2f} GiB bf16; copy of the base {a['saved_gib']:.2f} GiB; "
                  f"copy bandwidth {a['copy_bandwidth_gbs']:.1f} GB/s):", "",
                  "| step | time | bytes moved | bandwidth floor | extra peak memory |", "|---|---:|---:|---:|---:|"]
        for r in a["rows"]:
            moved = "-" if r["bytes_gib"] is None else f"{r['bytes_gib']:.1f} GiB"
            floor = "-" if r["floor_seconds"] is None else f"{r['floor_seconds']:.2f} s"
            lines.append(f"| {r['step']} | {r['seconds']:.2f} s | {moved} | {floor} | {r['extra_gib']:.2f} GiB |")
        lines += ["", f"The factored update costs {a['factored_flops'] / 1e9:.0f} GFLOP of float32 matmuls.", ""]
    if "memory" in res:
        m = res["memory"]
        lines += ["**Memory of a Llama3-8B finetuning run** (derived from the shapes):", "",
                  f"- weights, bf16, without the unused lm_head: {m['weights_gib']:.1f} GiB",
                  f"- LoRA r16 on q/k/v/o + score head, float32 with gradients and AdamW state: {m['adapter_and_optimizer_gib']:.2f} GiB"]
        if "train_kib_per_token" in m:
            lines += [f"- gradient-checkpoint inputs: {m['checkpoint_kib_per_token']:.0f} KiB per token (32 layers x 4096 x bf16)",
                      f"- one recomputed layer's saved activations (measured with autograd hooks): {m['layer_kib_per_token']:.0f} KiB per token",
                      f"- training estimate (checkpoints + 2 x one layer): {m['train_kib_per_token']:.0f} KiB per token",
                      f"- a {m['gpu_gib']:.0f} GiB GPU ({m['overhead_gib']:.0f} GiB kept for the CUDA context and fragmentation): "
                      f"about {m['train_tokens_per_batch']:,} tokens per training batch"]
        lines += [f"- evaluation (no autograd, one layer's live tensors): about {m['eval_kib_per_token']:.0f} KiB per token, "
                  f"{m['eval_tokens_per_batch']:,} tokens per batch on the same GPU", ""]
    if "tiny" in res:
        t = res["tiny"]
        c = t["config"]
        shape = (f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} query / "
                 f"{c['num_key_value_heads']} key-value heads, MLP {c['intermediate_size']}, vocabulary {c['vocab_size']}")
        lines += [f"**Tiny random LlamaForSequenceClassification** ({shape}; {t['examples']} pairs of NLI-like "
                  f"lengths, batch {t['batch']}, float32):", "", "| run | time | examples/s | padded tokens |", "|---|---:|---:|---:|"]
        for k, v in t.items():
            if isinstance(v, dict) and "examples_per_s" in v:
                lines.append(f"| {k} | {v['seconds']:.2f} s | {v['examples_per_s']:.0f} | {v.get('padded_tokens', '-')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers whose projections are built (32 = the model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=["apply", "layer", "tiny"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_llama"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    res: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0]}
    if "apply" not in args.skip:
        res["apply"] = bench_apply(args.layers, device)
    res["memory"] = memory_budget(layer_saved_bytes() if "layer" not in args.skip else None)
    if "tiny" not in args.skip:
        res["tiny"] = bench_tiny()
    res["load_after"] = os.getloadavg()[0]
    md = report(res)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "bench_llama.md", md)
    write_json(args.out / "bench_llama.json", res)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
