"""The authors' released KnOTS LoRA adapters (Hugging Face hub), converted for the open_clip encoder.

``hoffman-lab/KnOTS-<arch>_lora_R16_<dataset>`` holds a PEFT adapter trained on transformers' CLIP;
:func:`released_adapters` downloads each (once, into ``cache_dir``) and converts it with
:func:`knots.vision.hf_clip.convert_released_adapter` into ``<cache_dir>/released/<repo>`` (an atomic
directory with checksums: one that does not verify is converted again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from knots.atomic import verify_directory
from knots.errors import AdapterError
from knots.vision.hf_clip import convert_released_adapter

#: The hub's dataset names where they differ from the task names used here.
HUB_DATASET_NAMES = {"cars": "stanford_cars"}
#: Vision-tower width per architecture: every converted projection must be width x width.
VISION_WIDTHS = {"ViT-B-32": 768, "ViT-L-14": 1024}


def released_repo(arch: str, task: str, template: str = "hoffman-lab/KnOTS-{arch}_lora_R16_{dataset}") -> str:
    """``hoffman-lab/KnOTS-ViT-B-32_lora_R16_stanford_cars`` for ``("ViT-B-32", "cars")``."""
    return template.format(arch=arch, dataset=HUB_DATASET_NAMES.get(task, task))


def released_adapters(tasks: Sequence[str], cache_dir: str | Path, arch: str,
                      repo_template: str = "hoffman-lab/KnOTS-{arch}_lora_R16_{dataset}",
                      revisions: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Per task, a converted adapter directory (downloaded and converted on first use)."""
    from huggingface_hub import snapshot_download

    out = {}
    for task in tasks:
        repo = released_repo(arch, task, repo_template)
        target = Path(cache_dir) / "released" / repo.replace("/", "--")
        if verify_directory(target):  # absent, or not exactly as converted: (re)convert
            try:
                src = snapshot_download(repo, revision=(revisions or {}).get(task), cache_dir=str(Path(cache_dir) / "hub"),
                                        allow_patterns=["adapter_config.json", "adapter_model.*"])
            except Exception as error:  # offline, missing repo, auth: one line for the user
                raise AdapterError(f"cannot download released adapter {repo} ({str(error).splitlines()[0]})") from None
            convert_released_adapter(src, target, width=VISION_WIDTHS.get(arch), overwrite=True)
        out[task] = target
    return out
