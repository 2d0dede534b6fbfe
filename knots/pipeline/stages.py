"""The stages of a run, as functions with explicit inputs and outputs.

    finetune -> evaluate finetuned -> merge and search (validation) -> test -> analyses -> report

Each stage takes what it needs as arguments and returns what the next ones read; none keeps state
between calls. :func:`knots.pipeline.run.run_experiment` wires them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from knots.analyses import AnalysisContext, analysis_options, get_analysis
from knots.heads import HeadSet
from knots.methods import MergeInputs, TaskAdapter, get_method, method_config
from knots.metrics import selection_score
from knots.modelpool import ModelPool, given_adapters
from knots.pipeline.evaluate import Evaluator
from knots.pipeline.cache import adapter_dir, cache_key
from knots.pipeline.finetune import finetune
from knots.pipeline.training import resolve_precision, task_recipe
from knots.pipeline.logger import NullLogger
from knots.pipeline.search import SearchResult, select
from knots.taskpool import TaskPool

log = logging.getLogger("knots.pipeline")


# -- finetune ------------------------------------------------------------------------------------
def finetune_stage(models: ModelPool, tasks: TaskPool, zero_shot: HeadSet | None, cfg: Any,
                   logger: NullLogger | None = None) -> list[TaskAdapter]:
    """One adapter per task: given ones (``adapters.paths`` / ``adapters.loader``), or finetuned into
    the adapter cache (a cached adapter is reused, an interrupted one resumed)."""
    models.check_tasks(tasks.tasks)
    if cfg.adapters.given:
        paths = given_adapters(cfg.adapters, tasks.names, cfg.paths.cache_dir)
        return [models.load(task, paths[task.name], {"task": task.name, "path": str(paths[task.name]), "status": "given",
                                                     "reused": True, "resumed_from": 0})
                for task in tasks.tasks]
    precision = resolve_precision(cfg.finetune.precision, models.backbone.device)
    out = []
    for task in tqdm(tasks.tasks, desc="finetune", disable=not cfg.progress):
        recipe = task_recipe(cfg.finetune, task.name, len(task.train))
        key = cache_key(cfg.model, cfg.benchmark.tasks[task.name], recipe, task, precision)
        path = adapter_dir(cfg.paths.cache_dir, task.name, key)
        head = models.training_head(task, zero_shot, recipe.seed)
        info = finetune(models.backbone, task, head, cfg.model.lora, recipe, path,
                        logger=logger, progress=cfg.progress, meta={"cache_key": key})
        log.info("adapter %s: %s (%s)", task.name, path, info["status"])
        out.append(models.load(task, path, {**info, "path": str(path), "cache_key": key}))
    return out


# -- merge and search ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """A method's selected hyperparameters, their validation score and every searched point."""

    method: str
    params: dict[str, Any]
    score: float
    history: list[tuple[dict[str, Any], float]]
    seconds: float


def search_method(name: str, inputs: MergeInputs, evaluator: Evaluator, search: Any, fixed: Mapping[str, Any],
                  logger: NullLogger, progress: bool = False, extra_dirs: Sequence[str | Path] = ()) -> Selection:
    """Select one method's hyperparameters on validation data."""
    method = get_method(name)
    config = method_config(name, fixed, extra_dirs)
    coordinates, repeated = config.coordinates(search.ranges, fixed)
    prefix = f"search/{name}/"
    logger.define_step(prefix, f"{prefix}point")
    bar = tqdm(desc=f"search {name}", disable=not progress, leave=False)
    seen: dict[tuple, float] = {}

    def tracked(params: dict[str, Any]) -> float:
        key = tuple(sorted(params.items()))
        if key in seen:
            return seen[key]
        score = selection_score(evaluator.summary("validation", method.build(inputs, **params)), search.metric)
        bar.update(1)
        bar.set_postfix(score=f"{score:.2f}")
        logger.log({f"{prefix}point": bar.n, f"{prefix}val_score": score,
                    **{f"{prefix}{k}": v for k, v in params.items() if isinstance(v, (int, float))}})
        seen[key] = score
        return score

    start = time.perf_counter()
    result: SearchResult = select(tracked, config.defaults, coordinates, repeated, search.strategy, search.patience)
    bar.close()
    keys = sorted({k for p, _ in result.history for k in p})
    logger.table(f"{prefix}points", [*keys, "val_score"], [[p.get(k) for k in keys] + [v] for p, v in result.history])
    return Selection(name, result.params, result.score, result.history, time.perf_counter() - start)


def test_method(selection: Selection, inputs: MergeInputs, evaluator: Evaluator) -> dict[str, Any]:
    """The selected model of a method on test data: the ``methods.<name>`` block of results.json."""
    candidate = get_method(selection.method).build(inputs, **selection.params)
    test = evaluator.summary("test", candidate, f"{selection.method} test")
    search = [{"params": params, "val_score": score} for params, score in selection.history]
    return {"hyperparameters": selection.params, **test, "val_score": selection.score, "search": search}


def merge_and_test(methods: Sequence[str], inputs: MergeInputs, evaluator: Evaluator, cfg: Any, logger: NullLogger,
                   extra_dirs: Sequence[str | Path] = ()) -> tuple[dict[str, Any], dict[str, float]]:
    """Search and test every method in turn; returns the results per method and the seconds each took."""
    results, seconds = {}, {}
    for name in methods:
        start, cpu = time.perf_counter(), time.process_time()
        selection = search_method(name, inputs, evaluator, cfg.search, cfg.method_params.get(name, {}), logger, cfg.progress, extra_dirs)
        results[name] = test_method(selection, inputs, evaluator)
        seconds[f"method/{name}"] = time.perf_counter() - start
        seconds[f"method/{name}/cpu"] = time.process_time() - cpu  # CPU time of the process (all its threads)
        log_test(name, results[name], logger)
    return results, seconds


def log_test(name: str, result: Mapping[str, Any], logger: NullLogger) -> None:
    """Test numbers of one method, to the tracker's summary and the log."""
    values = {f"test/{name}/avg_accuracy": result["avg_accuracy"], f"test/{name}/avg_normalized_accuracy": result["avg_normalized_accuracy"]}
    joint = result["joint"]
    if joint is not None:
        values.update({f"test/{name}/joint_{k}": joint[k] for k in ("hits@1", "hits@3", "hits@5")})
    logger.summary(values)
    joint_text = f", joint hits@3 {joint['hits@3']:.1f}" if joint is not None else ""
    log.info("%s: %s -> test avg norm acc %.1f%s", name, result["hyperparameters"], result["avg_normalized_accuracy"], joint_text)


# -- analyses ------------------------------------------------------------------------------------
def analyses_stage(names: Sequence[str], context: AnalysisContext, params: Mapping[str, Mapping[str, Any]],
                   extra_dirs: Sequence[str | Path] = ()) -> tuple[dict[str, Any], dict[str, float]]:
    """Run each selected analysis; returns their results and the seconds each took."""
    results, seconds = {}, {}
    for name in names:
        start, cpu = time.perf_counter(), time.process_time()
        analysis = get_analysis(name)
        results[name] = analysis.run(context, **analysis_options(name, dict(params.get(name, {})), extra_dirs))
        seconds[f"analysis/{name}"] = time.perf_counter() - start
        seconds[f"analysis/{name}/cpu"] = time.process_time() - cpu
        log.info("analysis %s done in %.1f s", name, seconds[f"analysis/{name}"])
    return results, seconds
