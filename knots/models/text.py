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
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class TextBackbone(Backbone):
    """A transformers encoder or decoder loaded from a local directory (never from the network).

    Args:
        path: directory holding ``config.json``, weights and tokenizer files.
        name: identifier for cache keys and reports.
        max_length: tokens per input after truncation.
        batch_size: inputs per forward pass when embedding class names.
        pooling: ``mean`` (masked mean of the last hidden states) or ``last`` (the last real token).
    """

    def __init__(self, path: str, name: str, max_length: int = 128, batch_size: int = 64, pooling: str = "mean") -> None:
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not Path(path, "config.json").is_file():
            raise ConfigError(f"model {name}: no config.json in {path}")
        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
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
