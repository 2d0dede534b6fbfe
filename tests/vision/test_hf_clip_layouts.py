"""Both key layouts of adapters trained on transformers' CLIP convert to the same open_clip adapter.

The authors apply PEFT to the vision transformer itself (``get_peft_model(CLIPModel.vision_model, ...)``,
gstoica27/KnOTS ``models/huggingface_clip.py``), so their files hold bare ``encoder.layers...`` keys;
PEFT applied to a ``CLIPVisionModel`` writes ``vision_model.encoder.layers...`` keys.
"""

import copy
import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from knots.errors import AdapterError
from knots.lora import load_adapter
from knots.vision.hf_clip import convert_released_adapter, open_clip_module
from tests.vision.test_hf_clip import _hf_features, _hf_model, _open_clip_twin

PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
#: adapter_config.json of the released hoffman-lab/KnOTS-ViT-*_lora_R16_* adapters (peft 0.3.0), except r.
RELEASED_CONFIG = {"base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                   "init_lora_weights": True, "lora_alpha": 4, "lora_dropout": 0.1, "modules_to_save": None,
                   "peft_type": "LORA", "r": 4, "target_modules": list(PROJ), "task_type": None}


def _factors(layers=2, width=32, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(i, p): (torch.randn(r, width, generator=g), torch.randn(width, r, generator=g) * 0.1)
            for i in range(layers) for p in PROJ}


def _write(directory, factors, prefix, fmt="safetensors"):
    """A hand-made PEFT adapter: ``base_model.model.<prefix>encoder.layers.i.self_attn.p.lora_{A,B}.weight``."""
    directory.mkdir(parents=True)
    weights = OrderedDict()
    for (i, p), (A, B) in factors.items():
        key = f"base_model.model.{prefix}encoder.layers.{i}.self_attn.{p}"
        weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"] = A, B
    if fmt == "bin":  # what peft 0.3.0 wrote: a pickled OrderedDict of tensors
        torch.save(weights, directory / "adapter_model.bin")
    else:
        save_file(dict(weights), str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(RELEASED_CONFIG))
    return directory


def test_module_names_of_both_layouts_map_to_the_same_open_clip_module():
    target = "visual.transformer.resblocks.7.attn.v_proj"
    for name in ("vision_model.encoder.layers.7.self_attn.v_proj",
                 "base_model.model.vision_model.encoder.layers.7.self_attn.v_proj",
                 "clip.vision_model.encoder.layers.7.self_attn.v_proj",
                 "encoder.layers.7.self_attn.v_proj",
                 "base_model.model.encoder.layers.7.self_attn.v_proj"):
        assert open_clip_module(name) == target, name
    for name in ("text_model.encoder.layers.7.self_attn.v_proj", "model.text_model.encoder.layers.7.self_attn.v_proj",
                 "encoder.layers.7.mlp.fc1", "vision_model.encoder.layers.7.self_attn.v_proj.extra",
                 "decoder.layers.7.self_attn.v_proj"):
        assert open_clip_module(name) is None, name


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hand_made_files_in_each_layout_convert_to_identical_adapters(tmp_path, fmt):
    factors = _factors()
    out = {}
    for layout, prefix in (("vision_model", "vision_model."), ("bare", "")):
        src = _write(tmp_path / f"{layout}_{fmt}", factors, prefix, fmt)
        out[layout] = convert_released_adapter(src, tmp_path / f"{layout}_{fmt}_open_clip", width=32)
    a, b = (load_file(str(out[k] / "adapter_model.safetensors")) for k in ("vision_model", "bare"))
    assert a.keys() == b.keys() and len(a) == 2 * len(factors)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    converted = load_adapter(out["bare"])
    for (i, p), (A, B) in factors.items():
        module = converted.modules[f"visual.transformer.resblocks.{i}.attn.{p}"]
        assert module.scale == 1.0  # alpha == r, as in the released adapters
        torch.testing.assert_close(module.delta(), B @ A)


def test_the_authors_loading_path_and_the_converted_adapter_give_the_same_features(tmp_path):
    """PEFT on the bare vision transformer, saved and loaded back as the authors' utils.py does
    (``PeftModel.from_pretrained(model=<vision transformer>, model_id=...)``), then converted."""
    from peft import LoraConfig, PeftModel, get_peft_model

    hf = _hf_model()
    enc = _open_clip_twin(hf)  # open_clip twin of the base weights
    base_tower = hf.vision_model  # transformers' CLIPVisionTransformer, what the authors wrap
    peft_tower = get_peft_model(copy.deepcopy(base_tower), LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1,
                                                                      target_modules=list(PROJ)))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_tower.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    src = tmp_path / "authors_layout"
    peft_tower.save_pretrained(src)
    keys = list(load_file(str(src / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.encoder.layers.") for k in keys), keys[:2]

    reloaded = PeftModel.from_pretrained(model=copy.deepcopy(base_tower), model_id=str(src)).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        # the authors' forward: visual_projection(vision_model(**x)[1]) (their HFLoRACLIPVisionModel)
        mean, std = torch.tensor((0.5, 0.4, 0.3)).view(1, 3, 1, 1), torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1)
        expected = hf.visual_projection(reloaded(pixel_values=(pixels.float() / 255 - mean) / std)[1])
        assert (expected - _hf_features(hf, pixels)).abs().max() > 1e-3  # the adapter changes the features
        dst = convert_released_adapter(src, tmp_path / "open_clip", width=32)
        oc = PeftModel.from_pretrained(enc, dst).eval()
        torch.testing.assert_close(oc({"pixels": pixels}), expected, rtol=1e-4, atol=1e-5)


def test_a_bare_adapter_of_another_width_is_refused_when_the_width_is_known(tmp_path):
    src = _write(tmp_path / "text_like", _factors(width=16), "")
    with pytest.raises(AdapterError, match="is 16x16, but the vision tower's projections are 32x32"):
        convert_released_adapter(src, tmp_path / "out", width=32)
    assert not (tmp_path / "out").exists()
    convert_released_adapter(src, tmp_path / "unchecked")  # without a width the shapes are not judged


def test_an_adapter_with_both_layouts_is_refused(tmp_path):
    factors = _factors(layers=1)
    src = _write(tmp_path / "both", factors, "")
    extra = {f"base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_{part}.weight": t
             for part, t in zip("AB", factors[(0, "q_proj")])}
    save_file({**load_file(str(src / "adapter_model.safetensors")), **extra}, str(src / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="appears twice"):
        convert_released_adapter(src, tmp_path / "out")


def test_the_conversion_is_an_atomic_verified_directory_written_by_the_exporter(tmp_path):
    from knots.atomic import read_manifest, verify_directory
    from knots.errors import OutputError

    src = _write(tmp_path / "src", _factors(layers=1), "")
    dst = convert_released_adapter(src, tmp_path / "dst", width=32)
    assert verify_directory(dst) == [] and read_manifest(dst)["files"].keys() >= {
        "adapter_config.json", "adapter_model.safetensors", "converted_from.json"}
    config = json.loads((dst / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(f"visual.transformer.resblocks.0.attn.{p}" for p in PROJ)
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 4, None)
    with pytest.raises(OutputError, match="holds an earlier result"):
        convert_released_adapter(src, dst, width=32)
    assert convert_released_adapter(src, dst, width=32, overwrite=True) == dst and verify_directory(dst) == []


def test_released_adapters_are_downloaded_once_and_reconverted_when_damaged(tmp_path, monkeypatch):
    import huggingface_hub

    from knots.vision import released

    calls = []

    def snapshot_download(repo, revision=None, cache_dir=None, allow_patterns=None):
        calls.append(repo)
        return str(_write(tmp_path / "hub" / f"{len(calls)}", _factors(layers=1, width=768), ""))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = released.released_adapters(["cars"], tmp_path / "cache", "ViT-B-32")
    assert calls == ["hoffman-lab/KnOTS-ViT-B-32_lora_R16_stanford_cars"]
    assert out["cars"] == tmp_path / "cache" / "released" / "hoffman-lab--KnOTS-ViT-B-32_lora_R16_stanford_cars"
    assert released.released_adapters(["cars"], tmp_path / "cache", "ViT-B-32") == out and len(calls) == 1
    weights = out["cars"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # damaged: checksum differs
    released.released_adapters(["cars"], tmp_path / "cache", "ViT-B-32")
    assert len(calls) == 2 and load_adapter(out["cars"]).modules
    with pytest.raises(AdapterError, match="is 768x768, but the vision tower's projections are 1024x1024"):
        released.released_adapters(["dtd"], tmp_path / "cache", "ViT-L-14")
