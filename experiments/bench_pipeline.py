"""Wall time of the default experiment: a fresh run (empty adapter cache), then a re-run with the cache.

Usage: ``python -m experiments.bench_pipeline [--log-dir DIR] [knots-run overrides ...]``

Runs ``knots-run`` twice as a subprocess with a new, empty cache directory, and prints a markdown table
(and writes ``bench_pipeline.md`` / ``.json`` into the log dir) with both wall times, the machine's
CPU count and its load average before and after: on a shared machine the times are noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from knots.atomic import write_json, write_text


def timed_run(overrides: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "knots.cli.run", "progress=false", *overrides], env=env)
    return time.perf_counter() - start, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=Path("outputs/bench_pipeline"))
    parser.add_argument("overrides", nargs="*", help="knots-run overrides")
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=args.log_dir))
    env = {**os.environ, "KNOTS_LOG_DIR": str(args.log_dir), "KNOTS_CACHE_DIR": str(cache)}
    rows = []
    for label in ("fresh (empty adapter cache)", "re-run (adapters cached)"):
        load_before = os.getloadavg()[0]
        seconds, code = timed_run(args.overrides, env)
        rows.append({"run": label, "seconds": round(seconds, 1), "exit_code": code,
                     "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)})
        if code != 0:
            break
    info = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "overrides": args.overrides, "runs": rows}
    lines = ["| run | wall time | load avg before/after |", "|---|---:|---|"]
    lines += [f"| {r['run']} | {r['seconds'] / 60:.1f} min ({r['seconds']:.0f} s) | {r['load_before']} / {r['load_after']} |" for r in rows]
    md = f"{os.cpu_count()} CPUs ({info['machine']}); overrides: {' '.join(args.overrides) or 'none'}\n\n" + "\n".join(lines) + "\n"
    write_text(args.log_dir / "bench_pipeline.md", md)
    write_json(args.log_dir / "bench_pipeline.json", info)
    print(md, end="")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
