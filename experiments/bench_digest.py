"""Cost of the adapter cache's content digest (:attr:`knots.data.tasks.TaskData.digest`).

Usage: ``python -m experiments.bench_digest [--images N]``

Measures, in this process: (1) every task of the default benchmark (text6, read from its package data
files; reading and splitting timed apart from hashing), and (2) a lazy image task of ``N`` rows built
like the vision tasks (a ``datasets.Dataset`` with an ``Image`` column, split by the pipeline's
splitter), whose digest hashes the dataset's fingerprint and each row's index, never decoding an image.
Prints a markdown table (seconds, rows, microseconds per row).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time


def timed(function, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def text6() -> list[list]:
    from hydra import compose, initialize_config_dir

    from knots.config import register_configs, to_run_config
    from knots.config.resources import config_dir
    from knots.data.build import build_task

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = to_run_config(compose("run", overrides=["paths.log_dir=/tmp", "paths.output_dir=/tmp/out"]))
    rows = []
    for name in cfg.benchmark.task_names:
        start = time.perf_counter()
        task = build_task(name, cfg.benchmark.tasks[name])
        read = time.perf_counter() - start
        n = sum(len(task.split(s)) for s in ("train", "validation", "test"))
        seconds = timed(lambda: type(task).digest.func(task))
        rows.append([f"text6/{name}", n, read, seconds, 1e6 * seconds / n])
    return rows


def image_task(n: int) -> list:
    import datasets
    from PIL import Image

    from knots.data.splits import assign_roles
    from knots.data.tasks import TaskData
    from knots.config.schema import SplitConfig
    from knots.vision.datasets import task_from_splits

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])})
    data = datasets.Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}] * n, "label": [i % 10 for i in range(n)]},
                                      features=features)
    source = task_from_splits("images", {"train": data}, template_set="mnist")
    sets = assign_roles(source.splits, SplitConfig(), "images")
    task = TaskData("images", source.class_names, source.templates, label_keys=source.label_keys, **sets)
    seconds = timed(lambda: type(task).digest.func(task))
    return [f"lazy images ({n:,} rows)", n, float("nan"), seconds, 1e6 * seconds / n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args(argv)
    rows = text6() + [image_task(args.images)]
    print(f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load {os.getloadavg()[0]:.1f}; best of 3\n")
    print("| task | rows | read + split (s) | digest (s) | per row (us) |\n|---|---:|---:|---:|---:|")
    for name, n, read, seconds, per_row in rows:
        print(f"| {name} | {n:,} | {'-' if read != read else f'{read:.3f}'} | {seconds:.4f} | {per_row:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
