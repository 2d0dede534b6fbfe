"""The authors' released Llama3-8B NLI adapters, ``hoffman-lab/KnOTS-Llama3_8B_lora_R16_<task>``.

Each is a PEFT LoRA adapter (r 16 on q/k/v/o of every layer) trained on
``AutoModelForSequenceClassification`` with ``task_type="SEQ_CLS"``, so it also holds the task's
trained 3-way head ``score`` (``base_model.model.score.weight``). Module names are those of
:class:`~knots.models.text.TextBackbone` over Llama (``model.layers.<i>.self_attn.<q|k|v|o>_proj``, the
head at ``score``), so no conversion is needed: :func:`released_llama_adapters` downloads each adapter
once into the cache, checks its key names and head shape, and returns its directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from knots.errors import AdapterError
from knots.lora import PEFT_PREFIX, module_name, read_weights

REPO_TEMPLATE = "hoffman-lab/KnOTS-Llama3_8B_lora_R16_{task}"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_released_adapter(path: str | Path, where: str, num_labels: int, head: str = "score",
                           target_modules: Sequence[str] = TARGET_MODULES) -> None:
    """Every key is a LoRA weight of a targeted projection of a Llama layer or the head, and the head is
    ``(num_labels, hidden)``; otherwise one-line ``AdapterError`` naming the file and the problem."""
    weights = read_weights(Path(path))
    head_prefix = f"{PEFT_PREFIX}{head}."
    head_key = f"{head_prefix}weight"
    if head_key not in weights:
        raise AdapterError(f"{where}: no trained head {head!r} ({head_key}) in the adapter")
    shape = tuple(weights[head_key].shape)
    if len(shape) != 2 or shape[0] != num_labels:
        raise AdapterError(f"{where}: head {head!r} has shape {shape}, but the model has {num_labels} labels")
    pattern = re.compile(rf"^model\.layers\.\d+\.self_attn\.({'|'.join(map(re.escape, target_modules))})$")
    for key in weights:
        if key.startswith(head_prefix):
            continue
        if ".lora_" not in key:
            raise AdapterError(f"{where}: unexpected weight {key!r} (neither a LoRA weight nor the head {head!r})")
        module = module_name(key)[0]
        if not pattern.match(module):
            raise AdapterError(f"{where}: LoRA weight {key!r} is not on a {'/'.join(target_modules)} projection of a Llama layer")


def released_llama_adapters(tasks: Sequence[str], cache_dir: str | Path, num_labels: int = 3,
                            repo_template: str = REPO_TEMPLATE, revisions: Mapping[str, str] | None = None,
                            head: str = "score") -> dict[str, Path]:
    """Per task, the released adapter's directory (downloaded once into ``<cache_dir>/hub``), checked."""
    from huggingface_hub import snapshot_download

    out = {}
    for task in tasks:
        repo = repo_template.format(task=task)
        try:
            path = Path(snapshot_download(repo, revision=(revisions or {}).get(task), cache_dir=str(Path(cache_dir) / "hub"),
                                          allow_patterns=["adapter_config.json", "adapter_model.*"]))
        except Exception as error:  # offline and not cached, missing repo, auth: one line for the user
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise AdapterError(f"cannot get released adapter {repo} from the Hugging Face hub or its cache ({reason})") from None
        check_released_adapter(path, repo, num_labels, head)
        out[task] = path
    return out
