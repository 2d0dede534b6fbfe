"""SeparatedAttention computes exactly what nn.MultiheadAttention computes."""

import pytest
import torch
from torch import nn

from knots.vision.attention import SeparatedAttention, separate_attention


def _pair(batch_first: bool, dtype=torch.float64, bias: bool = True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, bias=bias).to(dtype)
    with torch.no_grad():  # MHA initialises biases to zero; make them matter
        for p in mha.parameters():
            p.normal_(0, 0.2)
    return mha.eval(), SeparatedAttention.from_multihead(mha).eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "float", "bool", "padding", "per_head"])
def test_matches_multihead_attention(batch_first, mask_kind):
    mha, sep = _pair(batch_first)
    B, L = 3, 7
    x = torch.randn((B, L, 32) if batch_first else (L, B, 32), dtype=torch.float64)
    kwargs = {}
    if mask_kind == "float":
        kwargs["attn_mask"] = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    elif mask_kind == "bool":
        kwargs["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    elif mask_kind == "padding":
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[0, -2:] = True
        kwargs["key_padding_mask"] = pad
    elif mask_kind == "per_head":
        kwargs["attn_mask"] = torch.randn(B * 4, L, L, dtype=torch.float64)
    ref = mha(x, x, x, need_weights=False, **kwargs)[0]
    out = sep(x, x, x, need_weights=False, **kwargs)[0]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_unbatched_input_and_no_bias():
    mha, sep = _pair(True, bias=False)
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(sep(x)[0], mha(x, x, x, need_weights=False)[0], rtol=1e-10, atol=1e-10)


def test_projections_are_separate_linears_that_receive_gradients():
    _, sep = _pair(True, dtype=torch.float32)
    sep.train()
    x = torch.randn(2, 5, 32)
    sep(x)[0].sum().backward()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer = getattr(sep, name)
        assert isinstance(layer, nn.Linear)
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("batch_first", [True, False])
def test_open_clip_transformer_keeps_outputs(batch_first):
    """open_clip's own Transformer, both layouts, with its causal text mask."""
    from open_clip.transformer import Transformer

    torch.manual_seed(1)
    model = Transformer(32, 2, 4, batch_first=batch_first).double().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    causal = torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1)
    with torch.no_grad():
        refs = [model(x), model(x, attn_mask=causal)]
    assert separate_attention(model) == 2
    assert isinstance(model.resblocks[1].attn, SeparatedAttention)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), refs[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x, attn_mask=causal), refs[1], rtol=1e-10, atol=1e-10)
