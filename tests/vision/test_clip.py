"""The open_clip backbone: separated projections, LoRA targets, preprocessing and zero-shot heads."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from knots.errors import ConfigError
from knots.heads import ZERO_SHOT_SCALE, HeadSet
from knots.vision.attention import SeparatedAttention
from knots.vision.clip import ClipBackbone, load_clip


def _images(n, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


def test_encoder_matches_the_original_open_clip_model(tiny_clip, tiny_config):
    """Same seed, same weights: separated attention + uint8 pixels give open_clip's own features."""
    model, preprocess, _ = load_clip(None, None, None, tiny_config, seed=0)
    images = _images(3)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([preprocess(im) for im in images]))
        out = tiny_clip.encoder(tiny_clip.collate(images))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert tiny_clip.collate(images)["pixels"].dtype == torch.uint8


def test_every_vision_block_exposes_four_projections(tiny_clip):
    blocks = tiny_clip.encoder.visual.transformer.resblocks
    assert all(isinstance(b.attn, SeparatedAttention) for b in blocks)
    names = [n for n, m in tiny_clip.encoder.named_modules() if isinstance(m, nn.Linear) and ".attn." in n]
    assert len(names) == 4 * len(blocks)
    assert not any(p.requires_grad for p in tiny_clip.encoder.parameters())
    assert not any(p.requires_grad for p in tiny_clip.text_model.parameters())


def test_peft_lora_targets_only_the_attention_projections(tiny_clip):
    import copy

    from peft import LoraConfig, get_peft_model

    encoder = copy.deepcopy(tiny_clip.encoder)
    peft_model = get_peft_model(encoder, LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    lora = {n.rsplit(".lora_", 1)[0] for n, p in peft_model.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.visual.transformer.resblocks.{i}.attn.{p}"
                for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert lora == expected
    out = peft_model({"pixels": tiny_clip.collate(_images(2))["pixels"]})
    assert out.shape == (2, tiny_clip.feature_dim)


def test_class_heads_average_normalized_template_embeddings(tiny_clip):
    names, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "a drawing of the {}.", "{}"]
    heads = tiny_clip.class_embeddings(names, templates)
    assert heads.shape == (3, tiny_clip.feature_dim)
    torch.testing.assert_close(heads.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        for c, name in enumerate(names):
            tokens = tiny_clip.tokenizer([t.format(name) for t in templates])
            per_template = tiny_clip.text_model.encode_text(tokens)
            per_template = per_template / per_template.norm(dim=-1, keepdim=True)
            mean = per_template.mean(0)
            torch.testing.assert_close(heads[c], mean / mean.norm(), rtol=1e-5, atol=1e-6)
    # averaging happens after normalizing: a template that only rescales would not change a head,
    # but a different template does
    assert not torch.allclose(heads, tiny_clip.class_embeddings(names, templates[:1]))


def test_class_heads_are_cached_and_not_aliased(tiny_clip):
    names, templates = ["a", "b"], ["{}"]
    first = tiny_clip.class_embeddings(names, templates)
    first.zero_()
    assert tiny_clip.class_embeddings(names, templates).abs().sum() > 0
    assert len([k for k in tiny_clip._heads if k == (tuple(names), tuple(templates))]) == 1


def test_zero_shot_logits_are_100_times_cosine(tiny_clip):
    from knots.data.tasks import TaskData

    task = TaskData("t", ["x", "y"], ["{}"], train=[], validation=[], test=[])
    heads = HeadSet.zero_shot({"t": tiny_clip.class_embeddings(["x", "y"], ["{}"])}, [task])
    with torch.no_grad():
        raw = tiny_clip.encoder(tiny_clip.collate(_images(2)))
    out = heads.per_task["t"].logits(heads.prepare(raw))
    assert ZERO_SHOT_SCALE == 100.0
    assert out.abs().max() <= 100.0 + 1e-4
    embeddings = heads.per_task["t"].weight
    torch.testing.assert_close(out, 100 * nn.functional.cosine_similarity(raw[:, None], embeddings[None], dim=-1))


def test_bad_model_configs_raise_config_errors():
    with pytest.raises(ConfigError):
        ClipBackbone(name="x", arch="ViT-NOPE-1", path="random")
    with pytest.raises(ConfigError):
        ClipBackbone(name="x", path="random", model_config={"embed_dim": 8, "bogus": 1})
    with pytest.raises(ConfigError):
        ClipBackbone(name="x", arch=None, model_config=None)
    with pytest.raises(ConfigError, match="random"):
        ClipBackbone(name="x", path="openai", model_config={"embed_dim": 8})
