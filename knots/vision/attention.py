"""Self-attention with four separate projections (q, k, v, out) in place of a fused one.

open_clip's ViT blocks use ``nn.MultiheadAttention``, which keeps q, k and v in one packed
``in_proj_weight``. LoRA (and the paper) needs each projection to be its own ``nn.Linear`` so that
it gets its own adapter and its own KnOTS SVD. :class:`SeparatedAttention` computes exactly what the
fused module computes (same call signature, both ``batch_first`` layouts, additive or boolean
masks, key padding masks) and names its projections like Hugging Face's CLIP does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from knots.errors import ConfigError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class SeparatedAttention(nn.Module):
    """Multi-head self-attention with independent ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``."""

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "SeparatedAttention":
        """Copy the weights of a fused self-attention module (same dtype and device)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError("only plain self-attention (no kdim/vdim, bias_k or add_zero_attn) can be separated")
        has_bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, bias=has_bias, batch_first=mha.batch_first,
                  dropout=mha.dropout)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for name, weight in zip(PROJECTIONS[:3], mha.in_proj_weight.chunk(3, dim=0)):
                getattr(new, name).weight.copy_(weight)
            if has_bias:
                for name, b in zip(PROJECTIONS[:3], mha.in_proj_bias.chunk(3, dim=0)):
                    getattr(new, name).bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if has_bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """Same contract as ``nn.MultiheadAttention.forward`` with ``need_weights=False``."""
        if need_weights:
            raise ConfigError("SeparatedAttention does not return attention weights")
        key = query if key is None else key
        value = key if value is None else value
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt_len, _ = query.shape
        src_len = key.shape[1]

        def heads(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(query), tgt_len)
        k = heads(self.k_proj(key), src_len)
        v = heads(self.v_proj(value), src_len)
        mask = _additive_mask(attn_mask, key_padding_mask, bsz, self.num_heads, tgt_len, src_len, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, None


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, bsz: int,
                   num_heads: int, tgt_len: int, src_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Combine MHA-style masks (bool: True = blocked; float: added) into one additive mask."""
    def as_float(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    combined = None
    if attn_mask is not None:
        combined = as_float(attn_mask)
        if combined.dim() == 3:  # (B * H, L, S)
            combined = combined.view(bsz, num_heads, tgt_len, src_len)
    if key_padding_mask is not None:
        padding = as_float(key_padding_mask).view(bsz, 1, 1, src_len)
        combined = padding if combined is None else combined + padding
    return combined


def separate_attention(module: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` inside ``module`` by :class:`SeparatedAttention`.

    Returns how many were replaced. The replacement happens in place and keeps attribute names,
    so ``...resblocks.3.attn`` stays ``...resblocks.3.attn`` and gains ``.q_proj`` and friends.
    """
    targets = [(name, child) for name, child in module.named_modules()
               if isinstance(child, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, SeparatedAttention.from_multihead(mha))
    return len(targets)
