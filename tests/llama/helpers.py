"""Tiny offline fixtures for the Llama path: a random Llama checkpoint with GQA and three sentence-pair tasks.

``make_tiny_llama`` saves what ``meta-llama/Meta-Llama-3-8B`` looks like to transformers, in miniature:
a ``LlamaForCausalLM`` checkpoint (no classification head: ``AutoModelForSequenceClassification`` adds
a freshly initialized ``score``) and a fast tokenizer with Llama 3's special tokens and pair template
(``<|begin_of_text|> A <|begin_of_text|> B``). The pad token is the end-of-text token, as the reference
sets it, or absent (``pad_token=False``) as in the real checkpoint.

``make_tiny_nli_tasks`` writes three small premise/hypothesis tasks in three real layouts and formats.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BOS, EOS, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"

ANIMALS = ["cat", "dog", "cow", "horse", "bird", "fish"]
VERBS = ["runs", "sleeps", "eats", "swims", "sings", "jumps"]
COLORS = ["red", "brown", "white", "black", "grey", "small"]
FILLER = ["a", "the", "is", "not", "now", "here", "."]
WORDS = sorted(set(ANIMALS + VERBS + COLORS + FILLER))

#: Shape of the tiny model: GQA with 4 query heads sharing 2 key/value heads.
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def tiny_vocab() -> list[str]:
    return [UNK, BOS, EOS] + WORDS


def make_tiny_tokenizer(path: Path, pad_token: bool = True) -> Path:
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
    return path


def make_tiny_llama(path: Path, pad_token: bool = True, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random Llama (GQA: 4 query heads, 2 key/value heads) saved like a pretrained checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(path, pad_token=pad_token)
    vocab = tiny_vocab()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), bos_token_id=vocab.index(BOS), eos_token_id=vocab.index(EOS),
                         pad_token_id=vocab.index(EOS) if pad_token else None, tie_word_embeddings=False,
                         initializer_range=0.2, **TINY_LLAMA)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def _pair(rng: random.Random, relation: str) -> tuple[str, str]:
    """A premise/hypothesis pair whose relation is decided by the words it shares."""
    animal, verb, color = rng.choice(ANIMALS), rng.choice(VERBS), rng.choice(COLORS)
    premise = f"the {color} {animal} {verb} {rng.choice(['now', 'here'])} ."
    if relation == "entailment":
        hypothesis = f"a {animal} {verb} ."
    elif relation == "contradiction":
        hypothesis = f"the {animal} is not {rng.choice([v for v in VERBS if v != verb])} ."
    else:  # neutral: a different animal
        hypothesis = f"a {rng.choice([a for a in ANIMALS if a != animal])} {verb} ."
    return premise, hypothesis


def _rows(n: int, relations: list[str], seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [(*_pair(rng, relations[i % len(relations)]), relations[i % len(relations)]) for i in range(n)]


THREE_WAY = {"entailment": 0, "neutral": 1, "contradiction": 2}


def make_tiny_nli_tasks(root: Path, n_train: int = 48, n_eval: int = 16) -> dict[str, Path]:
    """Three sentence-pair tasks, each a directory of splits, in three real dataset layouts:

    - ``entail3`` (SNLI layout, ``save_to_disk``): ``premise``, ``hypothesis``, ``label`` 0/1/2 =
      entailment/neutral/contradiction; train/validation/test, plus rows labelled -1 (no gold label).
    - ``pairs3`` (SICK layout, JSONL): ``sentence_A``, ``sentence_B``, ``label`` 0/1/2 and
      ``relatedness_score``; train/validation/test files.
    - ``binary2`` (SetFit RTE/QNLI layout, CSV): ``text1``, ``text2``, ``label`` 0 = entailment,
      1 = not entailment, ``idx``, ``label_text``; train and validation files only (the validation
      split is cut into validation and test; neutral is masked).
    """
    import datasets
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    three = ["entailment", "neutral", "contradiction"]
    sizes = {"train": n_train, "validation": n_eval, "test": n_eval}

    splits = {}
    for i, (split, n) in enumerate(sizes.items()):
        rows = _rows(n, three, seed=10 + i)
        labels = [THREE_WAY[r] for _, _, r in rows]
        labels[::7] = [-1] * len(labels[::7])  # no annotator majority: dropped
        splits[split] = datasets.Dataset.from_dict(
            {"premise": [p for p, _, _ in rows], "hypothesis": [h for _, h, _ in rows], "label": labels})
    datasets.DatasetDict(splits).save_to_disk(str(root / "entail3"))

    (root / "pairs3").mkdir(exist_ok=True)
    for i, (split, n) in enumerate(sizes.items()):
        with open(root / "pairs3" / f"{split}.jsonl", "w") as f:
            for j, (a, b, r) in enumerate(_rows(n, three, seed=20 + i)):
                f.write(json.dumps({"id": f"{split}-{j}", "sentence_A": a, "sentence_B": b, "label": THREE_WAY[r],
                                    "relatedness_score": 4.5 if r == "entailment" else 2.0}) + "\n")

    (root / "binary2").mkdir(exist_ok=True)
    for i, (split, n) in enumerate({"train": n_train, "validation": 2 * n_eval}.items()):
        rows = _rows(n, ["entailment", "contradiction"], seed=30 + i)
        label = [0 if r == "entailment" else 1 for _, _, r in rows]
        pd.DataFrame({"text1": [p for p, _, _ in rows], "text2": [h for _, h, _ in rows], "label": label,
                      "idx": range(n), "label_text": ["entailment" if y == 0 else "not_entailment" for y in label],
                      }).to_csv(root / "binary2" / f"{split}.csv", index=False)
    return {"entail3": root / "entail3", "pairs3": root / "pairs3", "binary2": root / "binary2"}


def tiny_nli_specs():
    """``NLISpec``s of the three tiny tasks, in the layouts of SNLI, SICK and the SetFit RTE copy."""
    from knots.data.nli import NLISpec, ValidationCut

    three = {0: "entailment", 1: "neutral", 2: "contradiction"}
    return {
        "entail3": NLISpec("entail3", "local/entail3", None, "premise", "hypothesis", "label", three),
        "pairs3": NLISpec("pairs3", "local/pairs3", None, "sentence_A", "sentence_B", "label", three),
        "binary2": NLISpec("binary2", "local/binary2", None, "text1", "text2", "label",
                           {0: "entailment", 1: "contradiction"}, masked=("neutral",),
                           cut=ValidationCut(0.5, shuffle=True)),
    }
