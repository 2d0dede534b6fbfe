"""Evaluating a model with an update applied: the targeted weights become base + delta, in place.

No model is copied: only the targeted weights are saved (one copy of them), and they are restored
by copying back, so the weights after the block are bit-identical to the weights before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from knots.errors import ConfigError


@contextmanager
def applied(module: nn.Module, delta: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily add ``delta`` (``{"<parameter name>": dW}``) to ``module``'s weights."""
    params = dict(module.named_parameters())
    missing = [k for k in delta if k not in params]
    if missing:
        raise ConfigError(f"update for unknown parameter {missing[0]!r}")
    saved = {k: params[k].detach().clone() for k in delta}
    try:
        with torch.no_grad():
            for k, d in delta.items():
                params[k].add_(d.to(params[k].dtype).to(params[k].device))
        yield
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                params[k].copy_(w)
