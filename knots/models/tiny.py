"""A tiny random Llama, written on first use, for offline smoke runs of the Llama path.

:func:`write_tiny_llama` saves what ``meta-llama/Meta-Llama-3-8B`` looks like to transformers, in
miniature: a ``LlamaForCausalLM`` checkpoint built from a ``LlamaConfig`` with grouped-query attention
(fewer key/value heads than query heads) and a fast tokenizer with Llama 3's special tokens, pair
template (``<|begin_of_text|> A <|begin_of_text|> B``) and no pad token (the backbone pads with
end-of-text, as the reference does). Its vocabulary is the synthetic NLI tasks' words
(:mod:`knots.data.synthetic_nli`). :func:`tiny_llama` is a backbone target: it writes the checkpoint into
the cache once, then loads it like any checkpoint, through :class:`~knots.models.text.TextBackbone`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

BOS, EOS, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"

#: The tiny model's shape: 2 layers, GQA with 4 query heads sharing 2 key/value heads.
TINY_LLAMA: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def tiny_vocab() -> list[str]:
    from knots.data.synthetic_nli import WORDS

    return [UNK, BOS, EOS, *WORDS]


def write_tiny_tokenizer(path: str | Path, pad_token: bool = False) -> Path:
    """A word-level fast tokenizer with Llama 3's special tokens and pair template, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(tiny_vocab())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])])
    extra = {"pad_token": EOS} if pad_token else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, **extra).save_pretrained(str(path))
    return Path(path)


def write_tiny_llama(path: str | Path, seed: int = 0, pad_token: bool = False, initializer_range: float = 0.2,
                     **shape: Any) -> Path:
    """Save a random Llama checkpoint (``TINY_LLAMA`` shape, updated by ``shape``) and its tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(path, pad_token=pad_token)
    vocab = tiny_vocab()
    config = LlamaConfig(vocab_size=len(vocab), bos_token_id=vocab.index(BOS), eos_token_id=vocab.index(EOS),
                         pad_token_id=vocab.index(EOS) if pad_token else None, tie_word_embeddings=False,
                         initializer_range=initializer_range, **{**TINY_LLAMA, **shape})
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        LlamaForCausalLM(config).save_pretrained(str(path))
    finally:
        torch.random.set_rng_state(generator_state)
    return path


def tiny_llama(cache_dir: str, name: str = "llama-tiny", seed: int = 0, shape: dict[str, Any] | None = None,
               **options: Any) -> Any:
    """Backbone target: the tiny Llama, written once to ``<cache_dir>/tiny-llama-<hash>`` (the hash names
    its seed and shape), then loaded by ``TextBackbone(path=..., **options)``."""
    from knots.models.text import TextBackbone
    from knots.atomic import atomic_directory

    shape = dict(shape or {})
    digest = hashlib.sha256(json.dumps([seed, shape, tiny_vocab()], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"tiny-llama-{digest}"
    if not (path / "config.json").is_file():
        with atomic_directory(path, overwrite=True, writer="knots tiny llama") as tmp:  # a concurrent writer wrote the same
            write_tiny_llama(tmp, seed=seed, **shape)
    return TextBackbone(path=str(path), name=name, **options)
