"""Reading PEFT LoRA adapters into per-module factors ``dW = s * B @ A``.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
``adapter_model.bin``). Key names differ across PEFT versions: with or without the adapter name
(``lora_A.default.weight``), with or without ``base_layer`` segments. Every key is normalised to the
module's path in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from knots.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSUPPORTED_PARTS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA factors: ``dW = scale * B @ A`` in ``(out, in)`` layout.

    ``fan_in_fan_out`` marks layers whose weight is stored transposed (GPT-2's ``Conv1D``); the
    base-model parameter then receives ``dW.T``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the update."""
        return (self.B.shape[0], self.A.shape[1])

    def scaled_B(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * B``: folding the scale into B keeps ``dW = scaled_B @ A``."""
        B = self.B if dtype is None else self.B.to(dtype)
        return B * self.scale

    def delta(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The dense update ``scale * B @ A`` in ``(out, in)`` layout."""
        A = self.A if dtype is None else self.A.to(dtype)
        return self.scaled_B(dtype) @ A


def parameter_layout(delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """An ``(out, in)`` update in the layout of the base parameter it is added to (transposed for
    ``fan_in_fan_out`` layers such as GPT-2's ``Conv1D``)."""
    return delta.T if fan_in_fan_out else delta


@dataclass
class LoraAdapter:
    """A LoRA adapter as factors per module, plus the config it was read from."""

    name: str
    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def delta_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``{"<module>.weight": dW}``: the adapter's update in the base model's parameter layout."""
        return {f"{name}.weight": parameter_layout(m.delta(dtype), m.fan_in_fan_out) for name, m in self.modules.items()}


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the module's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    denominator = math.sqrt(rank) if config.get("use_rslora", False) else rank
    return float(alpha) / denominator


def module_name(key: str) -> tuple[str, str, str | None]:
    """Split a state-dict key into ``(module path, 'A' or 'B', adapter name or None)``."""
    match = _LORA_KEY.match(key)
    if match is None:
        raise AdapterError(f"unrecognised LoRA weight key {key!r}")
    module = match["module"]
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX):]
    module = module.replace(".base_layer", "")
    return module, match["part"], match["adapter"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config: Mapping[str, Any], where: str) -> None:
    """Reject adapters that are not plain LoRA, and configs whose values have the wrong type."""
    peft_type = config.get("peft_type", "LORA")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{where}: adapter type {peft_type} is not LoRA; only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters (use_dora=true) are not supported; only plain LoRA")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: adapters that train biases (bias={config['bias']!r}) are not supported")
    if "r" not in config:
        raise AdapterError(f"{where}: adapter_config.json has no 'r'")
    if not (isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] >= 1):
        raise AdapterError(f"{where}: adapter_config.json: r must be a positive integer, got {config['r']!r}")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise AdapterError(f"{where}: adapter_config.json: lora_alpha must be a number, got {config['lora_alpha']!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise AdapterError(f"{where}: adapter_config.json: {key} must be true or false, got {config[key]!r}")
    for key, valid, kind in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"), ("alpha_pattern", _is_number, "a number")):
        patterns = config.get(key) or {}
        if not isinstance(patterns, Mapping):
            raise AdapterError(f"{where}: adapter_config.json: {key} must be a mapping, got {patterns!r}")
        for pattern, value in patterns.items():
            if not valid(value):
                raise AdapterError(f"{where}: adapter_config.json: {key}[{pattern!r}] must be {kind}, got {value!r}")


def check_same_base_model(adapters: list[LoraAdapter]) -> str | None:
    """A one-line warning when the adapters name different base models (``base_model_name_or_path``)."""
    bases = {adapter.name: adapter.base_model for adapter in adapters if adapter.base_model}
    if len(set(bases.values())) <= 1:
        return None
    listed = "; ".join(f"{name}: {base}" for name, base in bases.items())
    return f"the adapters were trained on different base models ({listed}); the merge assumes one base model"


def choose_adapter(names: list[str], adapter_name: str | None, where: str) -> str | None:
    """Which named adapter of a weights file to read: the only one, or ``adapter_name`` among several.

    Keys carry the adapter's name (``lora_A.<name>.weight``) in some PEFT versions and files saved
    from a model holding several adapters; keys without a name belong to every choice.
    """
    if len(names) <= 1:
        return names[0] if names else None
    if adapter_name in names:
        return adapter_name
    listed = ", ".join(names)
    if adapter_name is None:
        raise AdapterError(f"{where}: the weights hold {len(names)} adapters ({listed}); choose one with adapter_name=<name>")
    raise AdapterError(f"{where}: no adapter named {adapter_name!r} in the weights (found {listed})")


def adapter_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    name: str,
    source: str = "",
    adapter_name: str | None = None,
) -> LoraAdapter:
    """Build a :class:`LoraAdapter` from PEFT LoRA weights and their config."""
    where = source or name
    check_config(config, where)
    lora_keys = [key for key in state_dict if ".lora_" in key]  # modules_to_save copies and other extras are not LoRA updates
    for key in state_dict:
        if any(part in key for part in _UNSUPPORTED_PARTS):
            raise AdapterError(f"{where}: {key!r} is not a linear LoRA weight (embedding/DoRA layers are not supported)")
    chosen = choose_adapter(sorted({found for key in lora_keys if (found := module_name(key)[2]) is not None}), adapter_name, where)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[tuple[str, str], str] = {}
    for key in lora_keys:
        module, part, adapter = module_name(key)
        if adapter not in (None, chosen):
            continue
        if (module, part) in sources:
            raise AdapterError(f"{where}: module {module!r} has two lora_{part} weights ({sources[module, part]!r} and {key!r})")
        sources[module, part] = key
        tensor = state_dict[key]
        if not torch.is_tensor(tensor) or tensor.dim() != 2:
            raise AdapterError(f"{where}: {key!r} is not a 2-D tensor")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{where}: {key!r} contains NaN or Inf values")
        halves.setdefault(module, {})[part] = tensor
    modules: dict[str, LoraModule] = {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for module, parts in sorted(halves.items()):
        if set(parts) != {"A", "B"}:
            missing = ({"A", "B"} - set(parts)).pop()
            raise AdapterError(f"{where}: module {module!r} has no lora_{missing} weight")
        A, B = parts["A"], parts["B"]
        if A.shape[0] != B.shape[1]:
            raise AdapterError(f"{where}: module {module!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} of different ranks")
        configured = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if A.shape[0] != configured:
            raise AdapterError(
                f"{where}: module {module!r} has rank {A.shape[0]} in its weights but {configured} in adapter_config.json "
                "(r / rank_pattern); the weights and the config do not belong together"
            )
        modules[module] = LoraModule(A=A, B=B, scale=lora_scale(config, module, A.shape[0]), fan_in_fan_out=fan_in_fan_out)
    if not modules:
        raise AdapterError(f"{where}: no LoRA weights found")
    return LoraAdapter(name=name, modules=modules, config=dict(config), source=source)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{path}: unreadable JSON ({error.__class__.__name__}: {error})") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin``."""
    safetensors_path, bin_path = directory / SAFETENSORS_NAME, directory / BIN_NAME
    try:
        if safetensors_path.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_path))
        if bin_path.is_file():
            return torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise many different exception types
        path = safetensors_path if safetensors_path.is_file() else bin_path
        message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        raise AdapterError(f"{path}: corrupt or unreadable weights ({message})") from None
    raise AdapterError(f"{directory}: no {SAFETENSORS_NAME} or {BIN_NAME}")


def load_adapter(path: str | Path, name: str | None = None, adapter_name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory not found")
    config = read_json(directory / CONFIG_NAME)
    if not isinstance(config, dict):
        raise AdapterError(f"{directory / CONFIG_NAME}: expected a JSON object")
    weights = read_weights(directory)
    return adapter_from_state_dict(weights, config, name or directory.name, source=str(directory), adapter_name=adapter_name)


def adapter_from_peft_model(model: Any, name: str, adapter_name: str = "default") -> LoraAdapter:
    """Read the LoRA factors of one adapter of an in-memory ``PeftModel``."""
    from peft import get_peft_model_state_dict

    config = model.peft_config[adapter_name].to_dict()
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = {key: value.detach().to("cpu") for key, value in state.items()}
    return adapter_from_state_dict(state, config, name, source=f"<memory:{name}>", adapter_name=adapter_name)
