"""CLIP through open_clip as a pipeline ``Backbone``: LoRA-ready image encoder, frozen text heads.

The image encoder is open_clip's ``visual`` tower with every fused ``nn.MultiheadAttention``
replaced by :class:`~knots.vision.attention.SeparatedAttention`, so each block exposes
``attn.q_proj``, ``attn.k_proj``, ``attn.v_proj`` and ``attn.out_proj`` (Hugging Face CLIP's names).
Images are decoded, resized and cropped once into ``uint8`` tensors; scaling to ``[0, 1]`` and the
mean/std normalization happen inside the encoder, on the encoder's device, so a batch crosses to
the accelerator as bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from knots.data.tasks import materialize
from knots.errors import ConfigError
from knots.models.base import Backbone
from knots.vision.attention import PROJECTIONS, separate_attention

#: PEFT ``target_modules``: the four attention projections of every image-encoder block.
LORA_TARGETS = list(PROJECTIONS)


class ClipImageEncoder(nn.Module):
    """``encoder({"pixels": uint8 (B, 3, H, W)}) -> (B, D)`` image features (not normalized)."""

    def __init__(self, visual: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8`` pixels -> the float input open_clip's ``ToTensor`` + ``Normalize`` would give."""
        dtype = self.visual.conv1.weight.dtype
        return ((pixels.to(dtype) - self.mean.to(dtype)) / self.std.to(dtype))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.visual(self.normalize(batch["pixels"]))


def pixel_transform(preprocess: Any) -> Any:
    """open_clip's eval transform without ``ToTensor``/``Normalize``, ending in ``uint8`` pixels."""
    from torchvision import transforms as T

    steps = [s for s in getattr(preprocess, "transforms", [preprocess])
             if not isinstance(s, (T.ToTensor, T.Normalize))]
    return T.Compose([*steps, T.PILToTensor()])


class ClipBackbone(Backbone):
    """An open_clip CLIP model seen by the pipeline.

    Args:
        name: identifier for cache keys and reports.
        path: open_clip pretrained tag (``openai``) or checkpoint file; ``random`` for random weights.
        arch: open_clip architecture name (``ViT-B-32``, ``ViT-L-14``).
        cache_dir: where open_clip keeps downloaded weights.
        model_config: an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``,
            ``quick_gelu``) for a custom model; used instead of ``arch`` when given.
        seed: seeds the random initialisation of custom models.
        text_batch_size: prompts per forward pass when building class heads.
    """

    def __init__(
        self,
        name: str,
        path: str | None = "openai",
        arch: str | None = None,
        cache_dir: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        seed: int = 0,
        text_batch_size: int = 256,
    ) -> None:
        self.name = name
        self.text_batch_size = text_batch_size
        pretrained = None if path in (None, "", "random") else path
        model, preprocess, tokenizer = load_clip(arch, pretrained, cache_dir, model_config, seed)
        cfg = model.visual.preprocess_cfg
        replaced = separate_attention(model.visual)
        if replaced == 0:
            raise ConfigError(f"model {name}: the image tower has no nn.MultiheadAttention to separate")
        self.encoder = ClipImageEncoder(model.visual, cfg["mean"], cfg["std"]).eval()
        model.visual = None  # the encoder owns the image tower; `model` keeps the text tower
        self.text_model = model.eval()
        self.tokenizer = tokenizer
        self.transform = pixel_transform(preprocess)
        self.image_size = tuple(cfg["size"]) if isinstance(cfg["size"], (list, tuple)) else (cfg["size"],) * 2
        self.feature_dim = int(self.encoder.visual.output_dim)
        for module in (self.encoder, self.text_model):
            for p in module.parameters():
                p.requires_grad_(False)
        self._heads: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}

    def preprocess(self, image: Any) -> torch.Tensor:
        """One PIL image -> ``uint8 (3, H, W)``: resize, crop, RGB (open_clip's eval transform)."""
        return self.transform(image)

    def collate(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Stack ``uint8 (3, H, W)`` tensors; PIL images (lazy ones loaded first) are preprocessed."""
        pixels = []
        for x in inputs:
            if not torch.is_tensor(x):
                x = self.preprocess(materialize(x))
            if tuple(x.shape[-2:]) != self.image_size:
                raise ConfigError(f"model {self.name}: got a {tuple(x.shape[-2:])} image tensor, expected {self.image_size}")
            pixels.append(x)
        return {"pixels": torch.stack(pixels)}

    @torch.no_grad()
    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        key = (tuple(class_names), tuple(templates))
        if key not in self._heads:
            self._heads[key] = self._embed_classes(class_names, templates)
        return self._heads[key].clone()

    def _embed_classes(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Per class: embed every template, normalize, average, normalize (CLIP's zero-shot heads)."""
        if not class_names or not templates:
            raise ConfigError("class heads need at least one class name and one template")
        prompts = [t.format(c) for c in class_names for t in templates]
        device = next(self.text_model.parameters()).device
        features = []
        for i in range(0, len(prompts), self.text_batch_size):
            tokens = self.tokenizer(prompts[i:i + self.text_batch_size]).to(device)
            features.append(nn.functional.normalize(self.text_model.encode_text(tokens).float(), dim=-1))
        per_class = torch.cat(features).view(len(class_names), len(templates), -1).mean(1)
        return nn.functional.normalize(per_class, dim=-1).to(self.device)

    def to(self, device: torch.device | str) -> "ClipBackbone":
        """Move both towers (the heads are rebuilt on the new device on demand)."""
        self.encoder.to(device)
        self.text_model.to(device)
        self._heads = {k: v.to(device) for k, v in self._heads.items()}
        return self


def load_clip(arch: str | None, pretrained: str | None, cache_dir: str | None,
              model_config: Mapping[str, Any] | None, seed: int) -> tuple[nn.Module, Any, Any]:
    """Build an open_clip model, its eval transform and its tokenizer (fp32, CPU)."""
    import open_clip

    if model_config is not None:
        if pretrained:
            raise ConfigError("a custom model_config has random weights: set the model path to 'random'")
        cfg = copy.deepcopy(dict(model_config))
        torch.manual_seed(seed)
        try:
            model = open_clip.model.CLIP(**cfg)
        except TypeError as error:
            raise ConfigError(f"invalid open_clip model_config: {error}") from None
        image_size = model.visual.image_size
        pp = open_clip.transform.PreprocessCfg(size=tuple(image_size))
        model.visual.preprocess_cfg = {k: getattr(pp, k) for k in ("size", "mean", "std", "interpolation", "resize_mode")}
        text_cfg = cfg.get("text_cfg", {})
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    else:
        if not arch:
            raise ConfigError("a CLIP model needs either `arch` (with `pretrained`) or `model_config`")
        if arch not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip architecture {arch!r}")
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
        try:
            model = open_clip.create_model(
                arch, pretrained=pretrained, cache_dir=cache_dir,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
        except RuntimeError as error:
            raise ConfigError(f"cannot load open_clip {arch} ({pretrained}): {str(error).splitlines()[0]}") from None
        tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    pp_cfg = model.visual.preprocess_cfg
    preprocess = open_clip.image_transform(
        pp_cfg["size"], is_train=False, mean=pp_cfg["mean"], std=pp_cfg["std"],
        interpolation=pp_cfg.get("interpolation"), resize_mode=pp_cfg.get("resize_mode"))
    return model.float().eval(), preprocess, tokenizer
