"""``knots-merge``: merge PEFT LoRA adapters from disk with any registered method.

    knots-merge adapters=[dirA,dirB,dirC] method=knots_ties method.scaling=0.6 method.top_k=20 out=merged/
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from knots import __version__
from knots.atomic import atomic_directory, check_output_dir, write_json
from knots.cli.common import check_composition, fail, notifier, one_line_errors, run_cli, warn
from knots.cli.merge_schema import register_merge_schema
from knots.errors import ConfigError
from knots.lora import LoraAdapter, check_same_base_model, load_adapter
from knots.merging import Hyperparameters, Ingredients, MergeResult, MergeSession, get_method, method_names
from knots.config.resources import config_dir
from knots.merging.export import write_merge_outputs
from knots.methods.config import METADATA_KEYS

PROGRAM = "knots-merge"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SVD_PATHS = ("factored", "dense")


def hyperparameters(method_cfg: DictConfig) -> Hyperparameters:
    """The method node's hyperparameters; the experiment pipeline's keys (search ranges...) are ignored."""
    fields = {key: method_cfg[key] for key in Hyperparameters.__dataclass_fields__ if key in method_cfg}
    unknown = sorted(set(method_cfg) - set(Hyperparameters.__dataclass_fields__) - set(METADATA_KEYS))
    if unknown:
        raise ConfigError(f"unknown method option(s) {', '.join('method.' + u for u in unknown)}")
    return Hyperparameters(**fields)


def dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{key} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check every setting, and that ``out`` can be written without losing anything, before any work."""
    method = get_method(cfg.method.name)
    hp = hyperparameters(cfg.method)
    if not cfg.adapters:
        raise ConfigError("adapters must be a non-empty list of adapter directories, e.g. adapters=[dirA,dirB]")
    paths = [Path(str(a)).expanduser() for a in cfg.adapters]
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"adapter directory not found: {path}")
    names = list(cfg.names) if cfg.names is not None else [p.resolve().name for p in paths]
    if len(names) != len(paths):
        raise ConfigError(f"names has {len(names)} entries for {len(paths)} adapters")
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names must be distinct, got {names}; set names=[...]")
    if cfg.export_rank is not None and cfg.export_rank < 1:
        raise ConfigError(f"export_rank must be a positive integer, got {cfg.export_rank}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be a positive integer or null, got {cfg.threads}")
    if not 0 < cfg.max_shard_size_mb < float("inf"):
        raise ConfigError(f"max_shard_size_mb must be a positive number, got {cfg.max_shard_size_mb}")
    if cfg.alignment.svd_path not in SVD_PATHS:
        raise ConfigError(f"alignment.svd_path must be one of {', '.join(SVD_PATHS)}, got {cfg.alignment.svd_path!r}")
    if cfg.alignment.load is not None and not Path(cfg.alignment.load).expanduser().is_dir():
        raise ConfigError(f"alignment.load: directory not found: {cfg.alignment.load}")
    if not (cfg.save_delta or cfg.save_adapter or cfg.export_rank):
        raise ConfigError("nothing to write: save_delta, save_adapter and export_rank are all off")
    if cfg.save_adapter and not cfg.save_delta and not cfg.export_rank and method.space == "dense" and not method.linear:
        raise ConfigError(f"{method.name} merges are not exactly low-rank: keep save_delta=true or set export_rank")
    inputs = paths + ([Path(cfg.alignment.load).expanduser()] if cfg.alignment.load is not None else [])
    out = check_output_dir(str(cfg.out), cfg.overwrite, protect=inputs, notify=notifier(PROGRAM))
    return {
        "method": method,
        "hp": hp,
        "paths": paths,
        "names": names,
        "inputs": inputs,
        "out": out,
        "compute_dtype": dtype(cfg.alignment.compute_dtype, "alignment.compute_dtype"),
        "storage_dtype": dtype(cfg.alignment.storage_dtype, "alignment.storage_dtype"),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"knots": __version__, "torch": torch.__version__, "peft": version("peft"), "safetensors": version("safetensors"), "python": platform.python_version()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Merge and write every output; returns the content of merge.json.

    The staging directory is created before the adapters are read, so an ``out`` that cannot be
    written fails before any work; ``out`` changes only once everything is written.
    """
    settings = validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    method, hp = settings["method"], settings["hp"]
    with atomic_directory(settings["out"], overwrite=cfg.overwrite, protect=settings["inputs"], notify=notifier(PROGRAM), writer=PROGRAM) as staging:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        adapters = [load_adapter(path, name, cfg.adapter_name) for path, name in zip(settings["paths"], settings["names"])]
        timings["load"] = time.perf_counter() - start
        mismatch = check_same_base_model(adapters)
        if mismatch:
            warn(PROGRAM, mismatch)
        session = MergeSession(
            adapters,
            svd_path=cfg.alignment.svd_path,
            compute_dtype=settings["compute_dtype"],
            storage_dtype=settings["storage_dtype"],
            progress=cfg.progress,
        )
        if cfg.alignment.load is not None and method.space != "dense":
            start = time.perf_counter()
            session.set_ingredients(Ingredients.load(cfg.alignment.load))
            timings["load_alignment"] = time.perf_counter() - start
        result = session.merge(method.name, **hp.as_dict())
        timings.update(session.timings)
        start = time.perf_counter()
        template = dict(adapters[0].config)
        report = write_merge_outputs(
            result,
            staging,
            template,
            save_delta=cfg.save_delta,
            save_adapter=cfg.save_adapter,
            export_rank=cfg.export_rank,
            max_shard_bytes=int(cfg.max_shard_size_mb * 2**20),
            progress=cfg.progress,
        )
        if cfg.alignment.save and method.space != "dense":
            session.ingredients(result.vectors.ingredients.orientation).save(staging / "alignment")
            report["files"] += ["alignment/ingredients.safetensors", "alignment/ingredients.json"]
        timings["write"] = time.perf_counter() - start
        summary = describe(cfg, settings, adapters, session, result, report, timings)
        write_json(staging / "merge.json", summary, durable=False)
    return summary


def describe(
    cfg: DictConfig,
    settings: dict[str, Any],
    adapters: list[LoraAdapter],
    session: MergeSession,
    result: MergeResult,
    report: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The content of merge.json."""
    method = settings["method"]
    components = {}
    if method.space != "dense":
        ingredients = result.vectors.ingredients
        components = {name: alignment.components for name, alignment in ingredients.items()}
    return {
        "method": {"name": method.name, "space": method.space, "reference": method.reference},
        "hyperparameters": {key: value for key, value in settings["hp"].as_dict().items() if key in method.uses},
        "inputs": [
            {
                "name": adapter.name,
                "path": str(Path(adapter.source).resolve()),
                "base_model": adapter.base_model,
                "r": adapter.config.get("r"),
                "lora_alpha": adapter.config.get("lora_alpha"),
                "use_rslora": adapter.config.get("use_rslora", False),
                "modules": len(adapter.modules),
            }
            for adapter in adapters
        ],
        "modules": {
            name: {"shape": list(session.taskset.shapes[name]), "input_ranks": session.taskset.ranks(name), **({"kept_components": components[name]} if components else {})}
            for name in session.taskset.modules
        },
        "alignment": {key: cfg.alignment[key] for key in ("svd_path", "compute_dtype", "storage_dtype", "load")} if method.space != "dense" else None,
        "outputs": report,
        "timings_s": {key: round(value, 4) for key, value in timings.items()},
        "versions": versions(),
    }


def print_summary(summary: dict[str, Any], out: Path) -> None:
    method = summary["method"]["name"]
    hp = ", ".join(f"{k}={v}" for k, v in summary["hyperparameters"].items())
    modules = summary["modules"]
    kept = [m["kept_components"] for m in modules.values() if "kept_components" in m]
    lines = [
        f"{PROGRAM}: {method} ({hp}) over {len(summary['inputs'])} adapters: {', '.join(i['name'] for i in summary['inputs'])}",
        f"  modules: {len(modules)}" + (f"; kept components per module: {min(kept)}..{max(kept)} (total {sum(kept)})" if kept else ""),
        "  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in summary["timings_s"].items()),
    ]
    if "truncated_adapter" in summary["outputs"]:
        error = summary["outputs"]["truncated_adapter"]["relative_error"]
        lines.append(f"  rank-{summary['outputs']['truncated_adapter']['rank']} adapter: relative error max {error['max']:.3g}, mean {error['mean']:.3g}")
    lines.append(f"  wrote {out}: " + ", ".join(summary["outputs"]["files"] + ["merge.json"]))
    print("\n".join(lines))


@hydra.main(config_path=str(config_dir()), config_name="merge", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    summary = one_line_errors(PROGRAM)(run)(cfg)
    if summary is not None:  # None: a failed job of a multirun, already reported
        print_summary(summary, Path(str(cfg.out)).expanduser())


def check_method_override(argv: list[str]) -> None:
    """Fail fast, with the known names, on ``method=<unknown>`` (before Hydra looks for the file)."""
    for argument in argv:
        if argument.startswith("method="):
            for name in argument.split("=", 1)[1].split(","):  # method=ta,ties in a multirun
                if name.strip() not in method_names():
                    fail(PROGRAM, f"unknown merge method {name.strip()!r}; known methods: {', '.join(method_names())}")


def main() -> None:
    def merge() -> None:
        check_method_override(sys.argv[1:])
        check_composition(PROGRAM, str(config_dir()), "merge", sys.argv[1:], register=register_merge_schema)
        register_merge_schema()
        hydra_main()

    run_cli(PROGRAM, merge)


if __name__ == "__main__":
    main()
