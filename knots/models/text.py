"""Sentence encoders from Hugging Face transformers (e.g. all-MiniLM-L6-v2) as a ``Backbone``.

Features are the attention-masked mean of the last hidden states (sentence-transformers pooling).
The same frozen encoder embeds the class descriptions, so zero-shot heads work CLIP-style.
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


class MeanPooledEncoder(nn.Module):
    """``encoder(batch) -> (B, D)``: a transformer followed by masked mean pooling."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class TextBackbone(Backbone):
    """A BERT-style encoder loaded from a local directory (never from the network).

    Args:
        path: directory holding ``config.json``, weights and tokenizer files.
        name: identifier for cache keys and reports.
        lora_target_modules: PEFT target names inside the encoder.
        max_length: tokens per input after truncation.
        batch_size: inputs per forward pass when embedding class names.
    """

    def __init__(
        self,
        path: str,
        name: str,
        lora_target_modules: Sequence[str],
        max_length: int = 128,
        batch_size: int = 64,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not Path(path, "config.json").is_file():
            raise ConfigError(f"model {name}: no config.json in {path}")
        self.name = name
        self.max_length = max_length
        self.batch_size = batch_size
        self.lora_target_modules = list(lora_target_modules)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.encoder = MeanPooledEncoder(model).eval()
        self.feature_dim = int(model.config.hidden_size)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def collate(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [str(x) for x in inputs],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch["attention_mask"]

    def sort_key(self, item: Any) -> float:
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
