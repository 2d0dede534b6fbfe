"""Text encoders from Hugging Face transformers (e.g. all-MiniLM-L6-v2, Llama) as a ``Backbone``.

Features are pooled from the last hidden states: the attention-masked mean (sentence-transformers
pooling) or the last real token (how ``*ForSequenceClassification`` decoders pool). The transformer
sits at ``encoder.model``, so module paths (``model.layers.0.self_attn.q_proj``) and a trained head
attached as ``encoder.score`` have the names of the model's ``*ForSequenceClassification`` class.
Inputs are strings or ``(first, second)`` pairs (e.g. premise and hypothesis), tokenized as a pair.
The same frozen encoder embeds class descriptions, so zero-shot heads work CLIP-style.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from knots.errors import ConfigError
from knots.models.base import Backbone

POOLINGS = ("mean", "last")


class PooledEncoder(nn.Module):
    """``encoder(batch) -> (B, D)``: a transformer followed by masked mean or last-token pooling."""

    def __init__(self, model: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        self.model = model
        self.pooling = pooling

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "last":
            # right padding: the last real token of each row
            last = mask.sum(1).clamp_min(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)).float()


#: Weight dtypes a text backbone can be loaded in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: What is fetched from the hub: config, weights (safetensors) and tokenizer, not other formats.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]


def checkpoint_dir(name: str, path: str | None, hub_id: str | None, revision: str | None, cache_dir: str | None) -> str:
    """The local directory of a checkpoint: ``path`` as given, or the hub snapshot of ``hub_id``.

    A hub checkpoint is downloaded once into the Hugging Face cache (``cache_dir``, default
    ``$HF_HOME/hub``) and then read from it, also offline (``HF_HUB_OFFLINE=1``). When it is neither cached
    nor downloadable the error is one line naming the hub id.
    """
    if path:
        if not Path(path, "config.json").is_file():
            raise ConfigError(f"model {name}: no config.json in {path}")
        return str(path)
    if not hub_id:
        raise ConfigError(f"model {name}: give model.backbone.path (a local checkpoint) or model.backbone.hub_id")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(hub_id, revision=revision, cache_dir=cache_dir, allow_patterns=CHECKPOINT_FILES)
    except Exception as error:  # offline and not cached, gated, missing, network: one line for the user
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"model {name}: cannot get {hub_id} from the Hugging Face hub or its cache ({reason}); "
                          f"download it once (huggingface-cli download {hub_id}) or set model.backbone.path") from None


class TextBackbone(Backbone):
    """A transformers encoder or decoder from a local directory or the Hugging Face hub (cached).

    Args:
        path: directory holding ``config.json``, weights and tokenizer files (read, never downloaded).
        name: identifier for cache keys and reports.
        max_length: tokens per input after truncation.
        batch_size: inputs per forward pass when embedding class names.
        pooling: ``mean`` (masked mean of the last hidden states) or ``last`` (the last real token).
        hub_id: a hub model id (e.g. ``meta-llama/Meta-Llama-3-8B``), used when ``path`` is not given:
            downloaded once (``revision``) into ``cache_dir`` (default: the Hugging Face cache).
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``); features are returned in float32.
        gradient_checkpointing: recompute each layer's activations in the backward pass instead of
            keeping them (training memory of one layer instead of all; about one more forward pass).
        device_map: spread a model that does not fit one device over the node's devices
            (``"auto"``: transformers and accelerate place its layers, e.g. over several GPUs requested with
            ``hydra.launcher.gpus_per_node``); the run's ``device`` is then not applied.

    Without a pad token (Llama's tokenizer) the end-of-text token pads, on the right.
    """

    def __init__(self, path: str | None = None, name: str = "text", max_length: int = 128, batch_size: int = 64,
                 pooling: str = "mean", hub_id: str | None = None, revision: str | None = None,
                 cache_dir: str | None = None, dtype: str = "float32", gradient_checkpointing: bool = False,
                 device_map: str | dict[str, Any] | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        if dtype not in DTYPES:
            raise ConfigError(f"model {name}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if path:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        local = checkpoint_dir(name, path, hub_id, revision, cache_dir)
        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        model = AutoModel.from_pretrained(local, local_files_only=True, dtype=DTYPES[dtype], device_map=device_map)
        #: Spread over several devices by ``device_map`` (accelerate's hooks move activations between them):
        #: the pipeline then leaves its placement alone instead of moving it to ``device``.
        self.dispatched = device_map is not None
        if gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.encoder = PooledEncoder(model, pooling).eval()
        self.feature_dim = int(model.config.hidden_size)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def collate(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        pairs = [tuple(x) if isinstance(x, (tuple, list)) else (str(x),) for x in inputs]
        if any(len(p) != len(pairs[0]) for p in pairs) or len(pairs[0]) not in (1, 2):
            raise ConfigError(f"model {self.name}: inputs must all be texts or all be (first, second) pairs")
        second = [str(p[1]) for p in pairs] if len(pairs[0]) == 2 else None
        enc = self.tokenizer(
            [str(p[0]) for p in pairs],
            second,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch["attention_mask"]

    def sort_key(self, item: Any) -> float:
        if isinstance(item, (tuple, list)):
            return float(sum(len(str(x)) for x in item))
        return float(len(str(item)))

    @torch.no_grad()
    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        texts = [t.format(c) for c in class_names for t in templates]
        was_training = self.encoder.training
        self.encoder.eval()
        feats = []
        for i in range(0, len(texts), self.batch_size):
            batch = {k: v.to(self.device) for k, v in self.collate(texts[i : i + self.batch_size]).items()}
            feats.append(nn.functional.normalize(self.encoder(batch), dim=-1))
        self.encoder.train(was_training)
        per_class = torch.cat(feats).view(len(class_names), len(templates), -1).mean(1)
        return nn.functional.normalize(per_class, dim=-1)
