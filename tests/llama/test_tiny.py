"""The tiny Llama (knots.models.tiny) behaves like the real checkpoint: GQA, Llama 3 pair template, pad handling."""

from __future__ import annotations

import torch


def test_tiny_llama_loads_as_sequence_classifier_with_gqa(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from knots.models.tiny import BOS, EOS, write_tiny_llama

    path = write_tiny_llama(tmp_path / "llama", pad_token=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    cfg = model.config
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape[0] == attn.q_proj.weight.shape[0] * cfg.num_key_value_heads // cfg.num_attention_heads
    assert tok.pad_token == EOS and cfg.pad_token_id == tok.pad_token_id
    enc = tok("the cat runs", "a cat runs")
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == [BOS, "the", "cat", "runs", BOS, "a", "cat", "runs"]
    # right padding with pad = end-of-text: the score pools the last real token, as without padding
    pairs = [("the red cat runs now .", "a cat runs ."), ("a dog .", "a cow eats .")]
    batch = tok([p for p, _ in pairs], [h for _, h in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(**tok(p, h, return_tensors="pt")).logits for p, h in pairs])
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # the second row is padded
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_tiny_llama_without_pad_token_like_the_real_checkpoint(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from knots.models.tiny import write_tiny_llama

    path = write_tiny_llama(tmp_path / "llama")
    assert AutoTokenizer.from_pretrained(path, local_files_only=True).pad_token is None
    assert AutoConfig.from_pretrained(path, local_files_only=True).pad_token_id is None


def test_device_map_loads_a_dispatched_model_that_the_pipeline_leaves_in_place(tmp_path):
    """``device_map`` goes through transformers and accelerate. This machine has one device (the CPU), so
    the map places every layer there; on a node with several GPUs ``auto`` spreads the layers over them."""
    import torch

    from knots.modelpool import ModelPool
    from knots.models.tiny import tiny_llama
    from types import SimpleNamespace

    plain = tiny_llama(str(tmp_path), pooling="last")
    spread = tiny_llama(str(tmp_path), pooling="last", device_map="auto")
    assert spread.dispatched and not plain.dispatched
    batch = plain.collate([("a premise", "a hypothesis"), ("another", "one")])
    with torch.no_grad():
        torch.testing.assert_close(spread.encoder(batch), plain.encoder(batch), rtol=0, atol=0)
    cfg = SimpleNamespace(name="llama-tiny", backbone={"_target_": "knots.models.tiny.tiny_llama", "cache_dir": str(tmp_path),
                                                       "pooling": "last", "device_map": "auto"})
    pool = ModelPool.build(cfg, "cuda:0" if torch.cuda.is_available() else "cpu")
    assert pool.backbone.dispatched
