"""Hugging Face transformers CLIP -> open_clip: module names, vision weights and LoRA adapters.

The released KnOTS adapters were trained with PEFT on transformers' CLIP. Two key layouts occur:

- ``vision_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj``: PEFT applied to a whole
  ``CLIPModel`` or ``CLIPVisionModel``;
- ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj`` (bare): PEFT applied to the vision transformer
  itself, as the authors' code does (``get_peft_model(CLIPModel.vision_model, ...)`` in their
  ``models/huggingface_clip.py``, loaded back with ``PeftModel.from_pretrained(model=<that vision
  transformer>, ...)`` in ``utils.py``). Bare keys are read as the vision tower; a text-tower
  adapter in that layout has other widths and is refused when ``width`` is given.

With separated attention the open_clip image encoder has exactly these four linear maps per block
(``visual.transformer.resblocks.{i}.attn.*``), and transformers' CLIP and open_clip compute the
same function from the same OpenAI weights, so a LoRA update ``dW`` carries over unchanged: only
the module path is renamed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from knots.errors import AdapterError
from knots.lora import PEFT_PREFIX, load_adapter

#: ``[...]vision_model.encoder...`` (PEFT on CLIPModel / CLIPVisionModel) or bare ``encoder...`` (PEFT on
#: the vision transformer itself), after PEFT's ``base_model.model.`` prefix is removed.
_HF_ATTN = re.compile(r"^(?:(?:.*\.)?vision_model\.)?encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_HF_TEXT = re.compile(r"(?:^|\.)text_model\.")
#: open_clip module path (relative to :class:`~knots.vision.clip.ClipImageEncoder`) of block ``i``'s projection.
OPEN_CLIP_ATTN = "visual.transformer.resblocks.{layer}.attn.{proj}"


def open_clip_module(hf_module: str) -> str | None:
    """Map an HF vision attention projection path to the open_clip encoder path; ``None`` if not one."""
    match = _HF_ATTN.match(hf_module.removeprefix(PEFT_PREFIX))
    if match is None:
        return None
    return OPEN_CLIP_ATTN.format(layer=match[1], proj=match[2])


def convert_released_adapter(src: str | Path, dst: str | Path, width: int | None = None, overwrite: bool = False) -> Path:
    """Rewrite a PEFT adapter trained on transformers' CLIP as one for the open_clip image encoder.

    Both key layouts are read (``vision_model.encoder...`` and bare ``encoder...``, see the module
    docstring); an adapter that holds both is refused. Text-tower LoRA modules are accepted only if
    their update is exactly zero (trained with a frozen, precomputed text head, their ``B`` never
    moves). Any other module is an error. ``width``: the vision tower's width (768 for ViT-B/32,
    1024 for ViT-L/14); when given, every projection must be ``width x width``, which tells a
    vision adapter from a text-tower one in the bare layout.

    The result is written by the project's adapter exporter (:func:`knots.merging.export.write_adapter`:
    ``adapter_config.json`` + ``adapter_model.safetensors``, readable by ``knots.lora.load_adapter`` and
    ``PeftModel.from_pretrained``) into an atomic directory (:func:`knots.atomic.atomic_directory`, with
    checksums), plus ``converted_from.json``. The updates are unchanged: each module's LoRA scale is
    folded into ``B`` (the released adapters have ``lora_alpha == r``, so their factors are copied as
    they are). ``overwrite`` replaces an earlier conversion at ``dst``.
    """
    from knots.atomic import atomic_directory, write_json
    from knots.merging.export import write_adapter

    adapter = load_adapter(src)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for hf_name, module in adapter.modules.items():
        target = open_clip_module(hf_name)
        if target is None:
            if _HF_TEXT.search(hf_name) and not module.B.any():
                continue
            raise AdapterError(f"{src}: module {hf_name!r} is not a vision attention projection of transformers' CLIP")
        if module.fan_in_fan_out:
            raise AdapterError(f"{src}: fan_in_fan_out adapters cannot be mapped onto open_clip")
        if width is not None and module.shape != (width, width):
            raise AdapterError(f"{src}: module {hf_name!r} is {module.shape[0]}x{module.shape[1]}, but the vision "
                               f"tower's projections are {width}x{width} (an adapter for another model or tower?)")
        if target in factors:
            raise AdapterError(f"{src}: {target!r} appears twice (both the vision_model. and the bare key layout)")
        factors[target] = (module.scaled_B(), module.A)
    if not factors:
        raise AdapterError(f"{src}: no vision attention LoRA modules found")
    template = {k: v for k, v in adapter.config.items() if k not in ("base_model_name_or_path", "layers_to_transform")}
    template.update(base_model_name_or_path=None, task_type=None)
    with atomic_directory(dst, overwrite=overwrite, protect=[src], checksums=True) as staging:
        write_adapter(((name, B, A) for name, (B, A) in sorted(factors.items())), template, staging)
        write_json(staging / "converted_from.json", {"path": str(src), "base_model": adapter.base_model})
    return Path(dst)


def open_clip_visual_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPVisionModelWithProjection`` (or ``CLIPModel``) weights -> open_clip ``visual``
    weights with separated attention (keys relative to ``visual``)."""
    rules = [
        (r"vision_model\.embeddings\.class_embedding", "class_embedding"),
        (r"vision_model\.embeddings\.patch_embedding\.weight", "conv1.weight"),
        (r"vision_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
        (r"vision_model\.pre_layrnorm\.(weight|bias)", r"ln_pre.\1"),
        (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_post.\1"),
        (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.(\w+_proj)\.(weight|bias)",
         r"transformer.resblocks.\1.attn.\2.\3"),
        (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
        (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
        (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
        (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    ]
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        if key == "visual_projection.weight":
            out["proj"] = value.T.contiguous()
            continue
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
    return out
