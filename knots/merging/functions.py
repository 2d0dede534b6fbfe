"""Small, pure tensor functions behind every merge: trim, drop, elect, combine.

A *task stack* is a tensor of shape ``(n_tasks, ...)``: one task vector (or one slice of it) per row.
Semantics follow the TIES and DARE reference implementations used by KnOTS (Stoica et al., 2025).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Literal

import torch

SignVote = Literal["mass", "count"]
MergeFunc = Literal["mean", "sum"]


def keep_count(numel: int, top_k: float) -> int:
    """How many entries the reference top-K trim aims to keep: ``int(numel * (K / 100))``.

    The TIES and KnOTS references divide K by 100 first (``K /= 100; k = int(d * K)``); that rounds
    differently from ``int(numel * K / 100)`` where ``numel * K / 100`` is an integer: for 600 entries
    at K = 57 it is 341, not 342, so the threshold is the 259th smallest magnitude, not the 258th.
    """
    return int(numel * (top_k / 100.0))


def kth_smallest_rank(numel: int, top_k: float) -> int:
    """1-based rank (ascending) of the magnitude threshold of a top-K% trim.

    The reference keeps ``|x| >= kthvalue(|x|, numel - int(numel * (K / 100)))``; at least one entry
    survives.
    """
    return max(numel - keep_count(numel, top_k), 1)


def magnitude_threshold(values: torch.Tensor, top_k: float) -> torch.Tensor:
    """The magnitude threshold of a top-K% trim over all entries of ``values``."""
    flat = values.detach().abs().flatten()
    return flat.kthvalue(kth_smallest_rank(flat.numel(), top_k)).values


def streaming_kth_smallest(
    chunks: Callable[[], Iterable[torch.Tensor]],
    k: torch.Tensor | list[int],
    total: int,
    sample_size: int = 1 << 16,
    margin: float = 4.0,
) -> torch.Tensor:
    """Exact k-th smallest (1-based) per row of the values yielded by ``chunks()``.

    ``chunks()`` yields tensors of shape ``(rows, ...)``; row ``j`` of the result is the ``k[j]``-th
    smallest of all ``total`` row-``j`` entries across the chunks. A sampling selection (Floyd and Rivest): a
    strided sample brackets the answer, one pass counts the entries below the bracket and gathers the
    few inside it. Memory stays at one chunk plus the bracket, so a whole-model top-K never
    concatenates the model; the answer is exact whatever the sample, which only sets the speed.
    """
    k = torch.as_tensor(k, dtype=torch.int64)
    rows = k.numel()
    counts, samples = 0, []
    stride = max(total // sample_size, 1)
    for chunk in chunks():
        flat = chunk.detach().reshape(rows, -1)
        counts += flat.shape[1]
        samples.append(flat[:, ::stride])
    if (k < 1).any() or (k > counts).any():
        raise ValueError(f"k={k.tolist()} is outside 1..{counts}")
    sample = torch.cat(samples, dim=1).sort(dim=1).values
    position = k.double() / counts * sample.shape[1]
    spread = margin * sample.shape[1] ** 0.5 + 1
    low_index = (position - spread).floor().long()
    high_index = (position + spread).ceil().long()
    low = torch.where(low_index >= 0, sample.gather(1, low_index.clamp(0, sample.shape[1] - 1)[:, None])[:, 0], -torch.inf)
    high = torch.where(high_index < sample.shape[1], sample.gather(1, high_index.clamp(0, sample.shape[1] - 1)[:, None])[:, 0], torch.inf)
    while True:
        below = torch.zeros(rows, dtype=torch.int64)
        inside: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        for chunk in chunks():
            flat = chunk.detach().reshape(rows, -1)
            below += (flat < low[:, None].to(flat.dtype)).sum(dim=1)
            selected = (flat >= low[:, None].to(flat.dtype)) & (flat <= high[:, None].to(flat.dtype))
            for row in range(rows):
                inside[row].append(flat[row][selected[row]])
        found = torch.tensor([sum(part.numel() for part in parts) for parts in inside])
        too_high, too_low = k <= below, k > below + found
        if not (too_high.any() or too_low.any()):
            return torch.stack([torch.cat(parts).kthvalue(int(rank)).values for parts, rank in zip(inside, k - below)])
        low = torch.where(too_high, -torch.inf, low)
        high = torch.where(too_low, torch.inf, high)


def trim(stack: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry whose magnitude is below its task's threshold (one threshold per row)."""
    shape = (-1,) + (1,) * (stack.dim() - 1)
    return torch.where(stack.abs() >= thresholds.reshape(shape).to(stack.dtype), stack, 0.0)


def seeded_generator(seed: int, *keys: object) -> torch.Generator:
    """A generator whose stream depends only on ``seed`` and ``keys``, not on call order."""
    digest = hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def dare(values: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability ``p``, rescale survivors by ``1 / (1 - p)``."""
    if p == 0:
        return values
    keep = torch.rand(values.shape, generator=generator, dtype=torch.float32) >= p
    return values * keep.to(values.dtype) / (1.0 - p)


def elect_sign(stack: torch.Tensor, vote: SignVote = "mass") -> torch.Tensor:
    """Per-entry sign: of the summed values (``mass``) or of the summed signs (``count``); 0 on ties."""
    if vote == "mass":
        return torch.sign(stack.sum(dim=0))
    if vote == "count":
        return torch.sign(torch.sign(stack).sum(dim=0))
    raise ValueError(f"unknown sign vote {vote!r}; expected 'mass' or 'count'")


def agreeing_sum_and_count(stack: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and number of the entries that agree with the elected sign.

    As in the TIES reference, an entry whose sign is 0 selects the negative values.
    """
    direction = torch.where(sign == 0, -1.0, sign).to(stack.dtype)
    agrees = (stack * direction) > 0
    return (stack * agrees).sum(dim=0), agrees.sum(dim=0)


def finish_disjoint(total: torch.Tensor, count: torch.Tensor, merge_func: MergeFunc) -> torch.Tensor:
    """The disjoint merge from the agreeing entries' sum and count: their mean or their sum."""
    if merge_func == "sum":
        return total
    if merge_func == "mean":
        return total / count.clamp(min=1).to(total.dtype)
    raise ValueError(f"unknown merge function {merge_func!r}; expected 'mean' or 'sum'")


def combine(stack: torch.Tensor, merge_func: MergeFunc = "sum") -> torch.Tensor:
    """Task arithmetic's combination: the plain sum (or mean) over tasks."""
    if merge_func == "sum":
        return stack.sum(dim=0)
    if merge_func == "mean":
        return stack.mean(dim=0)
    raise ValueError(f"unknown merge function {merge_func!r}; expected 'mean' or 'sum'")
