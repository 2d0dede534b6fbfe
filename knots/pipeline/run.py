"""The whole experiment: finetune one LoRA per task, merge, search on validation, evaluate on test."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from knots.config.schema import RunConfig
from knots.data.build import build_task
from knots.data.sources import check_source
from knots.data.tasks import TaskData
from knots.errors import ConfigError
from knots.models import build_backbone
from knots.models.base import Backbone
from knots.pipeline.evaluate import (
    EvalSet,
    Heads,
    applied,
    ensemble_scores,
    score_features,
    selection_score,
    summarize,
)
from knots.pipeline.finetune import adapter_dir, cache_key, finetune, plain_for_key, resolve_precision
from knots.pipeline.io import torch_save
from knots.pipeline.logger import NullLogger, make_logger
from knots.pipeline.methods import method_defaults, pruning_parameter
from knots.pipeline.regmean import input_grams, regmean_merge
from knots.pipeline.report import results_table, write_results
from knots.pipeline.search import SearchResult, grid_search, linear_search

log = logging.getLogger(__name__)


def adapter_delta(adapter: Any) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": dW}`` of one adapter, in the base model's weight layout."""
    out = {}
    for name, module in adapter.modules.items():
        d = module.delta()
        out[f"{name}.weight"] = d.T if module.fan_in_fan_out else d
    return out


def load_tasks(cfg: RunConfig) -> list[TaskData]:
    """Check every data file first (a missing one fails before anything is read), then build the tasks."""
    names = cfg.benchmark.task_names
    for name in names:
        check_source(cfg.benchmark.tasks[name], name)
    return [build_task(name, cfg.benchmark.tasks[name]) for name in names]


class Experiment:
    """State shared by the stages: backbone, tasks, heads, evaluation sets, finetuned adapters."""

    def __init__(self, cfg: RunConfig, output_dir: Path, logger: NullLogger) -> None:
        self.cfg = cfg
        self.output_dir = output_dir
        self.logger = logger
        self.progress = cfg.progress
        self.tasks = load_tasks(cfg)
        self.backbone: Backbone = build_backbone(cfg.model)
        self.backbone.encoder.to(cfg.device)
        self.heads = Heads.build(self.backbone, self.tasks)
        self.timings: dict[str, float] = {}

    # -- stage 1 ---------------------------------------------------------------------------
    def given_adapters(self) -> dict[str, Path]:
        """Task -> adapter directory from ``adapters.paths`` or ``adapters.loader``."""
        import importlib

        spec = self.cfg.adapters
        names = [t.name for t in self.tasks]
        if spec.paths:
            found = {k: Path(v) for k, v in spec.paths.items()}
        else:
            module, _, attr = spec.loader.partition(":")
            try:
                loader = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                raise ConfigError(f"adapters.loader: cannot import {spec.loader!r}") from None
            found = {k: Path(v) for k, v in loader(tasks=names, cache_dir=self.cfg.paths.cache_dir, **spec.options).items()}
        missing = [n for n in names if n not in found]
        if missing:
            raise ConfigError(f"adapters: no adapter for task {missing[0]!r}")
        return found

    def finetune_all(self) -> list[dict[str, Any]]:
        from knots.lora import load_adapter

        cfg = self.cfg
        infos, self.adapters = [], []
        if cfg.adapters.given:
            for name, path in self.given_adapters().items():
                if name in {t.name for t in self.tasks}:
                    infos.append({"task": name, "path": str(path), "reused": True, "resumed_from": 0})
            order = {t.name: i for i, t in enumerate(self.tasks)}
            infos.sort(key=lambda i: order[i["task"]])
            self.adapters = [load_adapter(i["path"], name=i["task"]) for i in infos]
            return infos
        precision = resolve_precision(cfg.finetune.precision, self.backbone.device)
        for task in tqdm(self.tasks, desc="finetune", disable=not self.progress):
            key = cache_key(cfg.model, cfg.benchmark.tasks[task.name], cfg.finetune, task, precision)
            path = adapter_dir(cfg.paths.cache_dir, task.name, key)
            info = finetune(self.backbone, task, self.heads.per_task[task.name], cfg.model.lora, cfg.finetune, path,
                            logger=self.logger, progress=self.progress, meta={"cache_key": key})
            log.info("adapter %s: %s (%s)", task.name, path, "reused" if info["reused"] else "trained")
            infos.append({**info, "path": str(path), "cache_key": key})
            self.adapters.append(load_adapter(path, name=task.name))
        return infos

    def features(self, data: EvalSet, delta: dict[str, torch.Tensor] | None, desc: str | None = None) -> torch.Tensor:
        if not delta:
            return data.features(self.backbone, desc if self.progress else None)
        with applied(self.backbone.encoder, delta):
            return data.features(self.backbone, desc if self.progress else None)

    def evaluate_finetuned(self) -> dict[str, Any]:
        """Each finetuned model on every task's inputs: its own-task accuracy is the normalizer, and
        all of it feeds the ensemble baseline."""
        bs = self.cfg.finetune.eval_batch_size
        self.data = {s: EvalSet(self.backbone, self.tasks, s, bs) for s in ("validation", "test")}
        self.finetuned_feats: dict[str, list[torch.Tensor]] = {s: [] for s in self.data}
        for task, adapter, info in zip(self.tasks, self.adapters, self.adapter_infos):
            cache = self.feature_cache_path(info)
            if cache is not None and cache.is_file():
                saved = torch.load(cache, map_location="cpu")
                for split in self.data:
                    self.finetuned_feats[split].append(saved[split])
                continue
            delta = adapter_delta(adapter)
            computed = {split: self.features(data, delta, f"finetuned {task.name} {split}") for split, data in self.data.items()}
            for split in self.data:
                self.finetuned_feats[split].append(computed[split])
            if cache is not None:
                torch_save(computed, cache)
        self.normalizers = {}
        finetuned = {}
        for i, task in enumerate(self.tasks):
            accs = {s: score_features(self.finetuned_feats[s][i], self.data[s], self.heads)["per_task"][task.name] for s in self.data}
            finetuned[task.name] = {"val_accuracy": accs["validation"], "test_accuracy": accs["test"]}
        self.normalizers = {s: {t: finetuned[t][f"{k}_accuracy"] for t in finetuned} for s, k in (("validation", "val"), ("test", "test"))}
        return finetuned

    def feature_cache_path(self, info: dict[str, Any]) -> Path | None:
        """Where a cached adapter's features of this task set's validation and test inputs are kept.

        Keyed by the adapter's cache key and every task's definition (which fix the inputs and their
        order); given adapters, which have no cache key, are not cached.
        """
        if "cache_key" not in info:
            return None
        tasks = {n: plain_for_key(self.cfg.benchmark.tasks[n]) for n in self.cfg.benchmark.task_names}
        payload = json.dumps([info["cache_key"], tasks, self.cfg.finetune.eval_batch_size], sort_keys=True, default=str)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return Path(self.cfg.paths.cache_dir) / "features" / f"{info['task']}-{info['cache_key']}-{digest}.pt"

    def summary(self, split: str, delta: dict[str, torch.Tensor] | None, desc: str | None = None) -> dict[str, Any]:
        feats = self.features(self.data[split], delta, desc)
        return summarize(score_features(feats, self.data[split], self.heads), self.normalizers[split])

    # -- stages 2-4 ------------------------------------------------------------------------
    def search(self, method: str, evaluate, base: dict[str, Any], coordinates: list[tuple[str, list[Any]]]) -> SearchResult:
        s = self.cfg.search
        prefix = f"search/{method}/"
        self.logger.define_step(prefix, f"{prefix}point")
        bar = tqdm(desc=f"search {method}", disable=not self.progress, leave=False)
        seen: dict[tuple, float] = {}

        def tracked(params: dict[str, Any]) -> float:
            key = tuple(sorted(params.items()))
            if key in seen:
                return seen[key]
            summary = evaluate(params)
            score = selection_score(summary, s.metric)
            bar.update(1)
            bar.set_postfix(score=f"{score:.2f}")
            self.logger.log({f"{prefix}point": bar.n, f"{prefix}val_score": score,
                             **{f"{prefix}{k}": v for k, v in params.items() if isinstance(v, (int, float))}})
            seen[key] = score
            return score

        if s.strategy == "grid" and coordinates:
            result = grid_search(tracked, base, coordinates)
        elif s.strategy == "linear":
            result = linear_search(tracked, base, coordinates, s.patience)
        else:
            result = linear_search(tracked, base, [])
        if "p" in result.params and len(s.dare_seeds) > 1:
            # DARE is random: re-run the selected point with every seed and keep the best
            seeded = linear_search(tracked, result.params, [("seed", list(s.dare_seeds))])
            result = SearchResult(seeded.params, seeded.score, result.history + seeded.history)
        bar.close()
        keys = sorted({k for p, _ in result.history for k in p})
        self.logger.table(f"{prefix}points", [*keys, "val_score"], [[p.get(k) for k in keys] + [v] for p, v in result.history])
        return result

    def run_engine_method(self, session: Any, method: str) -> tuple[dict[str, Any], float, dict]:
        params = method_defaults(method, self.cfg.method_params.get(method))
        s = self.cfg.search
        prune = pruning_parameter(params)
        coordinates = [("scaling", list(s.scaling))] if "scaling" in params else []
        if prune is not None:
            coordinates.append((prune, list(getattr(s, prune))))
        if prune == "p":
            params["seed"] = s.dare_seeds[0]
        fixed = set(self.cfg.method_params.get(method, {}))
        coordinates = [(n, v) for n, v in coordinates if n not in fixed]

        def delta(p: dict[str, Any]) -> dict[str, torch.Tensor]:
            return session.merge(method, **p).delta_state_dict()

        result = self.search(method, lambda p: self.summary("validation", delta(p)), params, coordinates)
        return result.params, result.score, self.summary("test", delta(result.params), f"{method} test")

    def run_regmean(self) -> tuple[dict[str, Any], float, dict]:
        modules = sorted(self.adapters[0].modules)
        n = self.cfg.regmean.num_examples
        grams = []
        for task, adapter in zip(self.tasks, self.adapters):
            inputs = [x for x, _ in task.train[:n]]
            with applied(self.backbone.encoder, adapter_delta(adapter)):
                grams.append(input_grams(self.backbone, modules, inputs, self.cfg.finetune.eval_batch_size,
                                         f"regmean grams {task.name}" if self.progress else None))
        base = {k: v.detach().clone() for k, v in self.backbone.encoder.state_dict().items()}
        deltas = [adapter_delta(a) for a in self.adapters]

        def delta(p: dict[str, Any]) -> dict[str, torch.Tensor]:
            out = {}
            for m in modules:
                key = f"{m}.weight"
                weights = [base[key] + d[key] for d in deltas]
                out[key] = regmean_merge(weights, [g[m] for g in grams], p["alpha"]) - base[key]
            return out

        s = self.cfg.search
        fixed = self.cfg.method_params.get("regmean", {})
        start = {"alpha": fixed.get("alpha", s.regmean_alpha[-1])}
        coords = [] if "alpha" in fixed else [("alpha", list(s.regmean_alpha))]
        result = self.search("regmean", lambda p: self.summary("validation", delta(p)), start, coords)
        return result.params, result.score, self.summary("test", delta(result.params), "regmean test")

    def run_ensemble(self) -> tuple[dict[str, Any], float, dict]:
        out = {}
        for split in ("validation", "test"):
            scores = ensemble_scores(self.finetuned_feats[split], self.data[split], self.heads)
            out[split] = summarize(scores, self.normalizers[split])
        return {}, selection_score(out["validation"], self.cfg.search.metric), out["test"]

    def merge_all(self) -> dict[str, Any]:
        from knots.merging import MergeSession

        session = MergeSession(self.adapters)
        methods = {}
        for method in self.cfg.methods:
            start = time.perf_counter()
            if method == "ensemble":
                params, score, test = self.run_ensemble()
            elif method == "regmean":
                params, score, test = self.run_regmean()
            else:
                params, score, test = self.run_engine_method(session, method)
            self.timings[f"method/{method}"] = time.perf_counter() - start
            methods[method] = {"hyperparameters": params, **test, "val_score": score}
            self.logger.summary({f"test/{method}/avg_accuracy": test["avg_accuracy"],
                                 f"test/{method}/avg_normalized_accuracy": test["avg_normalized_accuracy"],
                                 **{f"test/{method}/joint_{k}": test["joint"][k] for k in ("hits@1", "hits@3", "hits@5")}})
            log.info("%s: %s -> test avg norm acc %.1f, joint hits@3 %.1f", method, params,
                     test["avg_normalized_accuracy"], test["joint"]["hits@3"])
        return methods


def run_experiment(cfg: RunConfig, output_dir: str | Path, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every stage and write results.json / results.md to ``output_dir``; return the results."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    config = resolved_config if resolved_config is not None else dataclasses.asdict(cfg)
    exp = Experiment(cfg, output_dir, NullLogger())  # data and model first: bad input fails before logging starts
    logger = make_logger(cfg.logger, output_dir, config, name=output_dir.name)
    exp.logger = logger
    exit_code = 1
    try:
        t = time.perf_counter()
        adapters = exp.adapter_infos = exp.finetune_all()
        exp.timings["finetune"] = time.perf_counter() - t
        t = time.perf_counter()
        finetuned = exp.evaluate_finetuned()
        exp.timings["evaluate_finetuned"] = time.perf_counter() - t
        methods = exp.merge_all()
        exp.timings["total"] = time.perf_counter() - start
        results = {
            "finetuned": finetuned,
            "methods": methods,
            "meta": {
                "benchmark": cfg.benchmark.name,
                "model": cfg.model.name,
                "tasks": [t.name for t in exp.tasks],
                "joint_labels": len(exp.heads.space),
                "selection_metric": cfg.search.metric,
                "search": cfg.search.strategy,
                "examples": {t.name: {s: len(t.split(s)) for s in ("train", "validation", "test")} for t in exp.tasks},
                "adapters": [{k: a[k] for k in ("task", "path", "reused", "resumed_from")} for a in adapters],
                "seconds": exp.timings,
            },
        }
        write_results(output_dir, results)
        logger.table("results", *results_table(results))
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code=exit_code)

