"""Benchmark the streaming CKA accumulators: memory against width and number of tasks, time per input row.

    python -m experiments.bench_cka                       # widths 384, 768, 1024, 4096; 2, 6 and 8 tasks
    python -m experiments.bench_cka --widths 768 --tasks 8 --rows 20000

For one module of width ``I`` (square, as the attention projections are) and ``n`` rank-``r`` task
updates, it builds the accumulators of every view, streams ``rows`` random input rows through them in
batches, and reports the floats they hold while streaming (counted, not estimated:
``ModuleCKA.held_floats``): ``(n r)^2 + n r`` moments plus the stacked ``A_i`` (``n r I``) and one
``r x r`` Gram per task and view for the LoRA and KnOTS views; ``I^2 + I`` moments for the full view,
whose updates are read only by ``result()`` (as the analysis reads them from the cache, one module at
a time). It also reports the seconds per 10,000 rows and the seconds of ``result()``. The floats do not
depend on the number of rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from knots.analyses.cka import module_cka
from knots.lora import LoraModule


def bench(width: int, tasks: int, rank: int, rows: int, batch: int, views: tuple[str, ...]) -> dict:
    generator = torch.Generator().manual_seed(0)
    row = [LoraModule(torch.randn(rank, width, generator=generator) / width ** 0.5,
                      torch.randn(width, rank, generator=generator) * 0.01, 1.0) for _ in range(tasks)]
    full = [torch.randn(width, width, generator=generator) * 0.01 for _ in range(tasks)] if "full" in views else None
    start = time.perf_counter()
    module = module_cka(row, views, (lambda: full) if full is not None else None, in_features=width)  # as the analysis reads them
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for begin in range(0, rows, batch):
        module.update(torch.randn(min(batch, rows - begin), width, generator=generator))
    stream = time.perf_counter() - start
    start = time.perf_counter()
    module.result()
    result = time.perf_counter() - start
    floats = module.held_floats
    low_rank = {"lora", "knots"} & set(views)
    # moments of the stacked codes, the stacked A_i (the code map) and an r x r Gram per task and view
    predicted = ((tasks * rank) ** 2 + tasks * rank + tasks * rank * width + len(low_rank) * tasks * rank ** 2 if low_rank else 0)
    predicted += width ** 2 + width if "full" in views else 0
    return {"width": width, "tasks": tasks, "rank": rank, "views": list(views), "rows": rows, "floats": floats,
            "predicted_floats": predicted, "MB_float64": floats * 8 / 1e6, "setup_s": round(setup, 3),
            "s_per_10k_rows": round(stream / rows * 1e4, 3), "result_s": round(result, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1024, 4096])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 6, 8])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| width | tasks | view | floats held | predicted | MB (float64) | s / 10k rows | result() s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    records = []
    for width in args.widths:
        for tasks in args.tasks:
            for views in (("lora", "knots"), ("full",)):
                record = bench(width, tasks, args.rank, args.rows, args.batch, views)
                records.append(record)
                print(f"| {width} | {tasks} | {'+'.join(views)} | {record['floats']:,} | {record['predicted_floats']:,} | "
                      f"{record['MB_float64']:.2f} | {record['s_per_10k_rows']} | {record['result_s']} |", flush=True)
    print(json.dumps(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
