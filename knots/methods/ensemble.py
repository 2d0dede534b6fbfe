"""The ensemble of finetuned models: no merge, every finetuned model answers and one rule decides.

The paper's baseline for the joint task (Table 4). ``rule``: ``most_confident`` (per input, the model
with the largest softmax probability) or ``max_logit`` (the element-wise maximum of the logits over
models, as the KnOTS reference code computes it).
"""

from __future__ import annotations

from typing import Any

from knots.errors import ConfigError
from knots.methods import register_method
from knots.methods.base import FinetunedEnsemble, MergeInputs
from knots.metrics import ENSEMBLE_RULES

REFERENCE = "the ensemble baseline of Stoica, Ramesh et al., Model Merging with SVD to Tie the KnOTS, ICLR 2025 (Table 4)"


def check(params: dict[str, Any]) -> None:
    rule = params.get("rule", "most_confident")
    if rule not in ENSEMBLE_RULES:
        raise ConfigError(f"ensemble rule must be one of {', '.join(ENSEMBLE_RULES)}, got {rule!r}")


@register_method("ensemble", reference=REFERENCE, uses=("rule",), check=check)
def ensemble(inputs: MergeInputs, rule: str) -> FinetunedEnsemble:
    """Ensemble of the finetuned models: every model answers; ``rule`` combines their logits."""
    return FinetunedEnsemble(rule)
