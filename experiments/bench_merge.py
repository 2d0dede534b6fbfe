"""Benchmark the merge engine at the paper's shapes: synthetic rank-16 adapters on disk.

    python -m experiments.bench_merge                 # all three settings, every method below
    python -m experiments.bench_merge --settings vitb32 --dense-sample 4 --methods iso_c core_ties

For each setting it reports the factored alignment time, the KnOTS-TIES merge time, the whole
``knots-merge`` process (start-up and I/O included) with its peak RSS, the dense-SVD alignment measured
on a sample of modules and extrapolated, and the work floor in flops and bytes.

Then, for each method of ``--methods`` (Iso-C, Iso-CTS, TSV-M and the Core Space merges by default):
the Core Space computation (shared by all of them), the merge, the whole ``knots-merge`` process writing
the merged adapter, its peak RSS, the dense path (``svd_path=dense``: the full updates' SVDs for
Iso-C/Iso-CTS/TSV-M, SVDs of the stacked factors and projections of the full updates for the Core Space)
on a sample of modules, extrapolated, and the method's work floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from knots.lora import LoraAdapter, load_adapter
from knots.merging import TaskSet, align, align_module
from knots.merging.session import MergeSession

#: Methods benchmarked beside KnOTS-TIES, with the hyperparameters they run at.
METHODS = {
    "iso_c": {"scaling": 1.0},
    "iso_cts": {"scaling": 1.0, "common_space_fraction": 0.8},
    "tsv_m": {"scaling": 1.0},
    "core_ta": {"scaling": 0.6, "merge_func": "sum"},
    "core_ties": {"scaling": 0.6, "top_k": 20, "trim_scope": "module"},
    "core_dare_ties": {"scaling": 0.6, "top_k": 20, "p": 0.2, "trim_scope": "module"},
    "core_tsv": {"scaling": 0.2},
    "core_iso_c": {"scaling": 1.0},
}


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


def method_floor(setting: Setting, method: str) -> dict[str, float]:
    """Flops of the Core Space computation and of ``method``'s merge and rebuilt adapter factors, and
    the bytes read (the adapters) and written (the merged adapter at rank ``min(k_o, k_i)``).

    Householder QRs with Q formed count ``4 m n^2``, an SVD with vectors ``22 n^3``, an element-wise
    merge pass one flop per core entry (about ten passes for TIES and DARE-TIES)."""
    n, r = setting.n_tasks, setting.rank
    R = n * r
    flops, bytes_in, bytes_out = 0.0, 0.0, 0.0
    for out, inp in setting.shapes.values():
        ko, ki = min(out, R), min(inp, R)
        k = min(ko, ki)
        flops += 4 * out * R * R + 4 * inp * R * R + 44 * R**3  # QRs of the stacked B and A^T, two core SVDs
        flops += 2 * out * R * ko + 2 * inp * R * ki  # U_ref, V_ref
        flops += n * (2 * out * ko * r + 2 * inp * ki * r + 2 * ko * r * ki)  # the tasks' cores
        task_factors = n * (2 * out * ko * r + 2 * inp * ki * r)
        factored_svds = n * (4 * ko * r * r + 4 * ki * r * r + 22 * r**3 + 2 * (ko + ki) * r * r)
        if method == "core_ta":
            flops += n * ko * ki
        elif method in ("core_ties", "core_dare_ties"):
            flops += 10 * n * ko * ki
        elif method in ("iso_c", "core_iso_c"):
            flops += n * ko * ki + 22 * k**3 + 2 * ko * k * ki
        elif method == "iso_cts":
            flops += n * ko * ki + 22 * k**3 + task_factors + factored_svds + n * 4 * ko * k * r + 44 * k**3 + 2 * ko * k * ki
        elif method in ("tsv_m", "core_tsv"):
            flops += task_factors + factored_svds + 44 * k**3 + 2 * ko * k * ki
        flops += 2 * ko * ki * inp if ko <= ki else 2 * out * ko * ki  # the adapter's second factor
        bytes_in += n * (out + inp) * r * 4
        bytes_out += (out * k + k * inp) * 4
    return {"gflop": flops / 1e9, "mb_read": bytes_in / 2**20, "mb_written": bytes_out / 2**20}


def time_dense(taskset: TaskSet, sample: int) -> float:
    """Dense-SVD alignment time per module, averaged over ``sample`` modules of the most common shape."""
    modules = taskset.modules[:sample]
    start = time.perf_counter()
    for module in modules:
        align_module(taskset, module, path="dense")
    return (time.perf_counter() - start) / len(modules)


RSS_PROBE = (
    "import resource, subprocess, sys; "
    "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def run_cli(paths: list[Path], out: Path, threads: int | None, method: str = "knots_ties", hyperparameters: dict[str, object] | None = None) -> tuple[float, float]:
    """Wall time and peak RSS (GiB) of a whole ``knots-merge`` process writing the merged adapter."""
    hyperparameters = {"scaling": 0.6, "top_k": 20} if hyperparameters is None else hyperparameters
    command = [sys.executable, "-m", "knots.cli.merge", f"adapters=[{','.join(map(str, paths))}]", f"method={method}", f"out={out}", "save_delta=false", "progress=false"]
    command += [f"method.{key}={value}" for key, value in hyperparameters.items()]
    if threads is not None:
        command.append(f"threads={threads}")
    # A small probe process starts knots-merge and reports its peak RSS: a child forked from this
    # (large) benchmark process would count this process's pages until it executes.
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"knots-merge {method} failed: {done.stderr[-2000:]}")
    return seconds, int(done.stdout.split()[-1]) / 2**20


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


def sample_adapters(adapters: list[LoraAdapter], modules: list[str]) -> list[LoraAdapter]:
    return [LoraAdapter(name=a.name, modules={m: a.modules[m] for m in modules}, config=a.config) for a in adapters]


def bench_methods(key: str, methods: list[str], dense_sample: int, workdir: Path, threads: int | None) -> list[dict[str, object]]:
    """One row per method: Core Space, merge, whole knots-merge, dense path (sampled), work floor."""
    setting = SETTINGS[key]
    paths = sorted((workdir / key).iterdir())
    adapters = [load_adapter(p) for p in paths]
    session = MergeSession(adapters)
    start = time.perf_counter()
    session.ingredients("core")
    core_seconds = time.perf_counter() - start
    modules = session.taskset.modules
    sample = sample_adapters(adapters, modules[:dense_sample])
    rows = []
    for method in methods:
        hyperparameters = METHODS.get(method, {"scaling": 0.6})
        start = time.perf_counter()
        session.merge(method, **hyperparameters)
        merge_seconds = time.perf_counter() - start
        cli_seconds, cli_rss = run_cli(paths, workdir / f"{key}-{method}", threads, method, hyperparameters)
        start = time.perf_counter()
        MergeSession(sample, svd_path="dense").merge(method, **hyperparameters)
        dense_total = (time.perf_counter() - start) / dense_sample * len(modules)
        rows.append(
            {
                "setting": setting.name,
                "method": method,
                "core_s": core_seconds,
                "merge_s": merge_seconds,
                "cli_s": cli_seconds,
                "cli_peak_rss_gib": cli_rss,
                "dense_s": dense_total,
                "dense_sample": dense_sample,
                "speedup": dense_total / (core_seconds + merge_seconds),
                **method_floor(setting, method),
            }
        )
        print(method_table(rows[-1:]), flush=True)
    return rows


def method_table(rows: list[dict[str, object]]) -> str:
    header = "| setting | method | Core Space (s) | merge (s) | whole knots-merge (s) | peak RSS (GiB) | dense path (s, extrapolated) | speed-up (Core Space + merge vs dense) | work floor (GFLOP / MB read / MB written) |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in rows:
        lines.append(
            f"| {row['setting']} | `{row['method']}` | {row['core_s']:.2f} | {row['merge_s']:.2f} | {row['cli_s']:.1f} | {row['cli_peak_rss_gib']:.2f} | "
            f"{row['dense_s']:,.0f} (from {row['dense_sample']}) | {row['speedup']:,.0f}x | {row['gflop']:.1f} / {row['mb_read']:.0f} / {row['mb_written']:.0f} |"
        )
    return "\n".join(lines)


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
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="methods benchmarked beside KnOTS-TIES (none: KnOTS-TIES only)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_merge.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows, method_rows = [], []
    with tempfile.TemporaryDirectory(prefix="knots-bench-") as workdir:
        for key in args.settings:
            rows.append(bench(key, args.dense_sample, Path(workdir), args.threads))
            print(table(rows[-1:]), flush=True)
            if args.methods:
                method_rows += bench_methods(key, args.methods, args.dense_sample, Path(workdir), args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"knots_ties": rows, "methods": method_rows}, indent=2))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(table(rows))
    if method_rows:
        print()
        print(method_table(method_rows))


if __name__ == "__main__":
    main()
