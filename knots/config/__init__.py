"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, and their validation."""

from knots.config.schema import RunConfig, register_configs, to_run_config

__all__ = ["RunConfig", "register_configs", "to_run_config"]
