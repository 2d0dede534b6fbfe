"""One run of ``knots-run``: the stages wired together (see :mod:`knots.pipeline.stages`).

    task pool + model pool -> finetune -> evaluate finetuned -> merge and search -> test
    -> analyses -> report (results.json, results.md, the tracker)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from knots.analyses import AnalysisContext
from knots.analyses.figures import results_figures, write_figures
from knots.config.schema import RunConfig, check_device, resolve_device
from knots.methods import MergeInputs
from knots.modelpool import ModelPool
from knots.pipeline.evaluate import Evaluator, evaluate_finetuned, feature_cache_path, fixed_normalizers
from knots.pipeline.cache import check_cache_dir, plain_for_key
from knots.pipeline.logger import make_logger
from knots.pipeline.report import results_table, write_results
from knots.pipeline.stages import analyses_stage, finetune_stage, merge_and_test
from knots.taskpool import TaskPool

log = logging.getLogger("knots.pipeline")


def run_experiment(cfg: RunConfig, output_dir: str | Path, resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the configured stages and write results.json / results.md to ``output_dir``; return the results."""
    device = resolve_device(cfg.device)
    check_device(device)
    check_cache_dir(cfg.paths.cache_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    config = resolved_config if resolved_config is not None else dataclasses.asdict(cfg)
    # data and model first: bad input fails before logging starts
    tasks = TaskPool.load(cfg.benchmark)
    models = ModelPool.build(cfg.model, device)
    zero_shot = None if models.trains_heads else tasks.zero_shot_heads(models.backbone)
    for line in tasks.describe_splits():
        log.info(line)
    logger = make_logger(cfg.logger, output_dir, config, name=output_dir.name)
    seconds: dict[str, float] = {}
    exit_code = 1
    try:
        t = time.perf_counter()
        if cfg.finetune.mode == "full":  # full-finetuning updates for the cka analysis (stage=finetune only)
            from knots.pipeline.full import full_finetune_stage

            adapters = full_finetune_stage(models, tasks, zero_shot, cfg, cfg.finetune, logger)  # type: ignore[assignment]
        else:
            adapters = finetune_stage(models, tasks, zero_shot, cfg, logger)
        seconds["finetune"] = time.perf_counter() - t
        meta = {
            "benchmark": cfg.benchmark.name,
            "model": cfg.model.name,
            "tasks": tasks.names,
            "heads": cfg.model.head.kind,
            "selection_metric": cfg.search.metric,
            "device": device,
            "search": cfg.search.strategy,
            "examples": tasks.sizes(),
            "rows": tasks.row_counts(),
            "splits": tasks.split_info(),
            "adapters": [{k: a.info.get(k) for k in ("task", "path", "status", "reused", "resumed_from")} for a in adapters],
            "seconds": seconds,
        }
        if cfg.stage == "finetune":
            seconds["total"] = time.perf_counter() - start
            results: dict[str, Any] = {"stage": "finetune", "meta": meta}
            write_results(output_dir, results)
            exit_code = 0
            return results

        heads = models.heads(tasks.tasks, adapters, zero_shot)
        meta["joint_labels"] = len(heads.space) if heads.space is not None else None
        t = time.perf_counter()
        data = tasks.eval_sets(models.backbone, cfg.finetune.eval_batch_size)
        definitions = {n: plain_for_key(cfg.benchmark.tasks[n]) for n in cfg.benchmark.task_names}
        digests = [task.digest for task in tasks.tasks]
        caches = [feature_cache_path(cfg.paths.cache_dir, a, definitions, digests, cfg.finetune.eval_batch_size, heads.kind)
                  for a in adapters]
        finetuned = evaluate_finetuned(models.backbone, heads, data, adapters, caches, cfg.progress, fixed_normalizers(cfg))
        seconds["evaluate_finetuned"] = time.perf_counter() - t
        meta["normalizers"] = {"source": cfg.normalizers, **finetuned.normalizers}

        evaluator = Evaluator(models.backbone, heads, data, finetuned, cfg.progress)
        inputs = MergeInputs(adapters, models.backbone, tasks.tasks, cfg.finetune.eval_batch_size, cfg.progress, heads=heads)
        methods, method_seconds = merge_and_test(cfg.methods, inputs, evaluator, cfg, logger, cfg.config_dirs)
        seconds.update(method_seconds)

        context = AnalysisContext(cfg, tasks, models, adapters, inputs, evaluator, methods, output_dir, logger)
        analyses, analysis_seconds = analyses_stage(cfg.analyses, context, cfg.analysis_params, cfg.config_dirs)
        seconds.update(analysis_seconds)
        seconds["total"] = time.perf_counter() - start

        results = {"finetuned": finetuned.accuracies, "methods": methods, "meta": meta}
        if analyses:
            results["analyses"] = analyses
        write_results(output_dir, results)
        logger.table("results", *results_table(results))
        write_figures(results_figures(results, analyses=False), output_dir / "figures", logger)
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code=exit_code)
