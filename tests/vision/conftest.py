"""Tiny, randomly initialised CLIP models shared by the vision tests (no downloads)."""

import pytest

#: A 2-block ViT on 32 px images with a 1-block text tower: seconds to build and run on CPU.
TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_config():
    return TINY_CLIP


@pytest.fixture(scope="session")
def tiny_clip():
    from knots.vision.clip import ClipBackbone

    return ClipBackbone(name="tiny-clip", path="random", model_config=TINY_CLIP, seed=0)
