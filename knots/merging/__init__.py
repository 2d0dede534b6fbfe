"""Merging LoRA adapters: KnOTS alignment, the Core Space, the task-arithmetic family, spectral merges
(Iso-C, Iso-CTS, TSV-M), sessions and export."""

from knots.merging import methods as _methods  # noqa: F401  (registers the built-in methods)
from knots.merging.alignment import Ingredients, ModuleAlignment, align, align_module
from knots.merging.family import Hyperparameters, Stages, merge_family
from knots.merging.registry import METHODS, MergeMethod, get_method, load_method_config, method_names, register
from knots.merging.session import MergeResult, MergeSession
from knots.merging.taskset import TaskSet

__all__ = [
    "METHODS",
    "Hyperparameters",
    "Ingredients",
    "MergeMethod",
    "MergeResult",
    "MergeSession",
    "ModuleAlignment",
    "Stages",
    "TaskSet",
    "align",
    "align_module",
    "get_method",
    "load_method_config",
    "merge_family",
    "method_names",
    "register",
]
