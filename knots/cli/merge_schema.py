"""The typed schema of ``knots-merge`` (``conf/merge.yaml``), registered in Hydra's ConfigStore.

Hydra merges ``merge.yaml`` and the command line into these types, so a wrongly typed value
(``overwrite=maybe``, ``method.top_k=abc``, ``method.seed=1.5``) fails at composition, on one line.
The values live in the YAML files; the schema only types them. The method node is derived from
:class:`knots.merging.Hyperparameters`, so a new hyperparameter is typed without touching this file.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from omegaconf import MISSING

from knots.merging.family import Hyperparameters
from knots.methods.config import METADATA_KEYS

SCHEMA_NAME = "merge_schema"
#: Keys of ``conf/method/*.yaml`` read by the experiment pipeline (search ranges, repeats, targets);
#: ``knots-merge`` accepts and ignores them.
PIPELINE_METHOD_KEYS = tuple(key for key in METADATA_KEYS if key != "name")


def _config_type(hint: Any) -> Any:
    """The OmegaConf type of a hyperparameter: ``Literal`` choices become ``str`` (checked later)."""
    return str if typing.get_origin(hint) is Literal else hint


def _method_settings() -> type:
    hints = typing.get_type_hints(Hyperparameters)
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=MISSING))]
    fields += [(f.name, _config_type(hints[f.name]), field(default=MISSING)) for f in dataclasses.fields(Hyperparameters)]
    fields += [(key, Any, field(default=None)) for key in PIPELINE_METHOD_KEYS]
    return dataclasses.make_dataclass("MethodSettings", fields)


MethodSettings = _method_settings()


@dataclass
class AlignmentSettings:
    svd_path: str = MISSING
    compute_dtype: str = MISSING
    storage_dtype: str = MISSING
    load: Optional[str] = None
    save: bool = MISSING


@dataclass
class MergeSettings:
    """Every setting of ``knots-merge``; ``conf/merge.yaml`` documents each one."""

    adapters: list[str] = MISSING
    names: Optional[list[str]] = None
    adapter_name: Optional[str] = None
    out: str = MISSING
    overwrite: bool = MISSING
    save_delta: bool = MISSING
    save_adapter: bool = MISSING
    export_rank: Optional[int] = None
    max_shard_size_mb: float = MISSING
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    progress: bool = MISSING
    threads: Optional[int] = None
    method: MethodSettings = field(default_factory=MethodSettings)  # type: ignore[valid-type]


def register_merge_schema() -> None:
    """Store the schema under :data:`SCHEMA_NAME` (``merge.yaml`` lists it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=MergeSettings)
