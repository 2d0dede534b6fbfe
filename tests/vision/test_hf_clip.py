"""Released adapters (PEFT on transformers' CLIP) carry over exactly to the open_clip encoder."""

import json

import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer

from knots.errors import AdapterError
from knots.lora import load_adapter
from knots.vision.attention import separate_attention
from knots.vision.clip import ClipImageEncoder
from knots.vision.hf_clip import convert_released_adapter, open_clip_module, open_clip_visual_state_dict

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _hf_model():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu")
    model = CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():  # transformers zero-initialises biases and unit LayerNorms; randomise all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _open_clip_twin(hf):
    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0,
                               output_dim=16, act_layer=QuickGELU)
    separate_attention(visual)
    missing, unexpected = visual.load_state_dict(open_clip_visual_state_dict(hf.state_dict()), strict=True)
    assert not missing and not unexpected
    return ClipImageEncoder(visual, MEAN, STD).eval()


def _hf_features(hf, pixels):
    x = (pixels.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return hf(pixel_values=x).image_embeds


def _trained_hf_adapter(hf, tmp_path, with_text_zero=False):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a "trained" adapter: B is no longer zero
    src = tmp_path / "hf_adapter"
    peft_model.save_pretrained(src)
    return peft_model.eval(), src


def test_module_names_map_one_to_one():
    assert open_clip_module("base_model.model.vision_model.encoder.layers.11.self_attn.out_proj") == \
        "visual.transformer.resblocks.11.attn.out_proj"
    assert open_clip_module("vision_model.encoder.layers.0.self_attn.q_proj") == "visual.transformer.resblocks.0.attn.q_proj"
    assert open_clip_module("text_model.encoder.layers.0.self_attn.q_proj") is None
    assert open_clip_module("vision_model.encoder.layers.0.mlp.fc1") is None


def test_hf_clip_and_open_clip_compute_the_same_features():
    hf = _hf_model()
    enc = _open_clip_twin(hf)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(enc({"pixels": pixels}), _hf_features(hf, pixels), rtol=1e-4, atol=1e-5)


def test_converted_adapter_gives_the_same_features_as_on_hf_clip(tmp_path):
    from peft import PeftModel

    hf = _hf_model()
    enc = _open_clip_twin(hf)  # twin of the base weights, before LoRA
    hf_lora, src = _trained_hf_adapter(hf, tmp_path)
    dst = convert_released_adapter(src, tmp_path / "open_clip_adapter")
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        base = enc({"pixels": pixels})
        expected = _hf_features(hf_lora, pixels)
        assert (expected - base).abs().max() > 1e-3  # the adapter really changes the features
        oc_lora = PeftModel.from_pretrained(enc, dst).eval()
        torch.testing.assert_close(oc_lora({"pixels": pixels}), expected, rtol=1e-4, atol=1e-5)

    hf_adapter, oc_adapter = load_adapter(src), load_adapter(dst)
    assert len(oc_adapter.modules) == len(hf_adapter.modules) == 8
    for name, module in hf_adapter.modules.items():
        mapped = oc_adapter.modules[open_clip_module(name)]
        assert module.scale == 2.0 and mapped.scale == 1.0  # the exporter folds the scale into B
        torch.testing.assert_close(mapped.B, module.scaled_B())
        torch.testing.assert_close(mapped.A, module.A)
        torch.testing.assert_close(mapped.delta(), module.delta())
    assert json.loads((dst / "adapter_config.json").read_text())["r"] == 4


def test_merging_the_delta_into_weights_matches_too(tmp_path):
    hf = _hf_model()
    enc = _open_clip_twin(hf)
    hf_lora, src = _trained_hf_adapter(hf, tmp_path)
    adapter = load_adapter(convert_released_adapter(src, tmp_path / "oc"))
    with torch.no_grad():
        for name, module in adapter.modules.items():
            enc.get_submodule(name).weight += module.delta()
        pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        torch.testing.assert_close(enc({"pixels": pixels}), _hf_features(hf_lora, pixels), rtol=1e-4, atol=1e-5)


def test_non_vision_modules_are_rejected_unless_their_update_is_zero(tmp_path):
    from safetensors.torch import save_file

    def write(name, B):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
        save_file({
            "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 4),
            "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(4, 2),
            "base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 4),
            "base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": B,
        }, str(d / "adapter_model.safetensors"))
        return d

    out = load_adapter(convert_released_adapter(write("zero_text", torch.zeros(4, 2)), tmp_path / "ok"))
    assert list(out.modules) == ["visual.transformer.resblocks.0.attn.q_proj"]
    with pytest.raises(AdapterError, match="text_model"):
        convert_released_adapter(write("trained_text", torch.ones(4, 2)), tmp_path / "bad")
    assert not (tmp_path / "bad" / "adapter_model.safetensors").exists()
