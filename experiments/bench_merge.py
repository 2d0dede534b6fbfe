"""Benchmark the merge engine at the paper's shapes: synthetic rank-16 adapters on disk.

    python -m experiments.bench_merge                 # all three settings
    python -m experiments.bench_merge --settings vitb32 --dense-sample 4

For each setting it reports the factored alignment time, the KnOTS-TIES merge time, the whole
``knots-merge`` process (start-up and I/O included) with its peak RSS, the dense-SVD alignment measured
on a sample of modules and extrapolated, and the work floor in flops and bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from knots.lora import load_adapter
from knots.merging import TaskSet, align, align_module
from knots.merging.session import MergeSession


@dataclass(frozen=True)
class Setting:
    name: str
    n_tasks: int
    shapes: dict[str, tuple[int, int]]
    rank: int = 16


def vit(layers: int, width: int) -> dict[str, tuple[int, int]]:
    return {f"visual.transformer.resblocks.{i}.attn.{p}": (width, width) for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def llama() -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(32):
        for proj, out in (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024), ("o_proj", 4096)):
            shapes[f"model.layers.{i}.self_attn.{proj}"] = (out, 4096)
    return shapes


SETTINGS = {
    "vitb32": Setting("8 x ViT-B/32", 8, vit(12, 768)),
    "vitl14": Setting("8 x ViT-L/14", 8, vit(24, 1024)),
    "llama3_8b": Setting("6 x Llama3-8B", 6, llama()),
}


def write_adapters(setting: Setting, root: Path) -> list[Path]:
    """PEFT-format adapters with Kaiming-like A and small B, as a trained LoRA looks."""
    paths = []
    for task in range(setting.n_tasks):
        generator = torch.Generator().manual_seed(task)
        tensors = {}
        for module, (out, inp) in setting.shapes.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(setting.rank, inp, generator=generator) / inp**0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, setting.rank, generator=generator) * 1e-2
        path = root / f"task{task}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": setting.rank, "lora_alpha": setting.rank, "target_modules": sorted({m.rsplit(".", 1)[1] for m in setting.shapes}), "bias": "none"}
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def work_floor(setting: Setting) -> dict[str, float]:
    """Flops of the factored alignment + KnOTS-TIES merge, and bytes read and written."""
    n, r = setting.n_tasks, setting.rank
    R = n * r
    flops, bytes_in, bytes_out, entries = 0.0, 0.0, 0.0, 0.0
    for out, inp in setting.shapes.values():
        k = min(R, out)
        flops += 4 * out * R * R  # Householder QR of the stacked B (form Q too)
        flops += n * 4 * inp * r * r  # QR of every A_i^T
        flops += 2 * R**3 + 22 * R**3  # core product and its SVD
        flops += 2 * out * R * k  # U = Q_B U_core
        flops += n * 2 * k * r * inp  # S V_i^T blocks
        entries += n * k * inp
        bytes_in += n * (out + inp) * r * 4
        bytes_out += (out * k + k * inp) * 4
    flops += 10 * entries  # trim, vote, disjoint mean: about ten element-wise passes
    return {"gflop": flops / 1e9, "mb_read": bytes_in / 2**20, "mb_written": bytes_out / 2**20, "merge_entries_m": entries / 1e6}


def time_dense(taskset: TaskSet, sample: int) -> float:
    """Dense-SVD alignment time per module, averaged over ``sample`` modules of the most common shape."""
    modules = taskset.modules[:sample]
    start = time.perf_counter()
    for module in modules:
        align_module(taskset, module, path="dense")
    return (time.perf_counter() - start) / len(modules)


def run_cli(paths: list[Path], out: Path, threads: int | None) -> tuple[float, float]:
    """Wall time and peak RSS (GiB) of a whole ``knots-merge`` process writing the merged adapter."""
    command = [sys.executable, "-m", "knots.cli.merge", f"adapters=[{','.join(map(str, paths))}]", "method=knots_ties", "method.scaling=0.6", "method.top_k=20", f"out={out}", "save_delta=false", "progress=false"]
    if threads is not None:
        command.append(f"threads={threads}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 2**20


def bench(key: str, dense_sample: int, workdir: Path, threads: int | None) -> dict[str, object]:
    setting = SETTINGS[key]
    paths = write_adapters(setting, workdir / key)
    cli_seconds, cli_rss = run_cli(paths, workdir / f"{key}-merged", threads)
    adapters = [load_adapter(p) for p in paths]
    taskset = TaskSet.from_adapters(adapters)
    start = time.perf_counter()
    ingredients = align(taskset)
    align_seconds = time.perf_counter() - start
    session = MergeSession(adapters)
    session.set_ingredients(ingredients)
    start = time.perf_counter()
    session.merge("knots_ties", scaling=0.6, top_k=20)
    merge_seconds = time.perf_counter() - start
    dense_per_module = time_dense(taskset, dense_sample)
    dense_total = dense_per_module * len(taskset.modules)
    return {
        "setting": setting.name,
        "modules": len(setting.shapes),
        "align_s": align_seconds,
        "merge_s": merge_seconds,
        "cli_s": cli_seconds,
        "cli_peak_rss_gib": cli_rss,
        "dense_align_s": dense_total,
        "dense_sample": dense_sample,
        "align_speedup": dense_total / align_seconds,
        "cli_vs_dense": dense_total / cli_seconds,
        **work_floor(setting),
    }


def table(rows: list[dict[str, object]]) -> str:
    header = "| setting | modules | alignment (s) | KnOTS-TIES merge (s) | whole knots-merge (s) | peak RSS (GiB) | dense alignment (s, extrapolated) | alignment speed-up | knots-merge vs dense alignment | work floor (GFLOP / MB read / MB written) |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['modules']} | {row['align_s']:.2f} | {row['merge_s']:.2f} | {row['cli_s']:.1f} | {row['cli_peak_rss_gib']:.2f} | "
            f"{row['dense_align_s']:.0f} (from {row['dense_sample']}) | {row['align_speedup']:.0f}x | {row['cli_vs_dense']:.1f}x | "
            f"{row['gflop']:.1f} / {row['mb_read']:.0f} / {row['mb_written']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--dense-sample", type=int, default=2, help="modules timed on the dense path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_merge.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="knots-bench-") as workdir:
        for key in args.settings:
            rows.append(bench(key, args.dense_sample, Path(workdir), args.threads))
            print(table(rows[-1:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(table(rows))


if __name__ == "__main__":
    main()
