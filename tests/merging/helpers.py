"""Builders shared by the merge tests: random LoRA adapters, tiny PEFT models."""

from __future__ import annotations

import torch
from torch import nn

from knots.lora import LoraAdapter, LoraModule


def random_adapters(n_tasks: int, shapes: dict[str, tuple[int, int]], rank: int | list[int] = 4, seed: int = 0, dtype=torch.float64) -> list[LoraAdapter]:
    """``n_tasks`` adapters over ``shapes`` ({module: (out, in)}) with random factors."""
    generator = torch.Generator().manual_seed(seed)
    ranks = rank if isinstance(rank, list) else [rank] * n_tasks
    adapters = []
    for task, r in enumerate(ranks):
        modules = {
            name: LoraModule(A=torch.randn(r, i, generator=generator, dtype=dtype), B=torch.randn(o, r, generator=generator, dtype=dtype), scale=0.5 + task)
            for name, (o, i) in shapes.items()
        }
        adapters.append(LoraAdapter(name=f"task{task}", modules=modules))
    return adapters


class TinyModel(nn.Module):
    """Two blocks with q/v projections of different shapes, enough for PEFT targeting."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(width, width), "v_proj": nn.Linear(width, width // 2)}) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer["q_proj"](x) + layer["v_proj"](x).repeat(1, 2))
        return x


def write_peft_adapter(directory, seed: int, r: int = 4, alpha: int = 8, use_rslora: bool = False, rank_pattern=None, alpha_pattern=None, **save_kwargs) -> None:
    """Write a PEFT LoRA adapter with random (non-zero) weights on ``TinyModel``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=["q_proj", "v_proj"],
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    model = get_peft_model(TinyModel(), config)
    torch.manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn_like(parameter) * 0.3
    model.save_pretrained(str(directory), **save_kwargs)


def assert_peft_forward_matches_delta(adapter_dir, delta: dict[str, torch.Tensor]) -> None:
    """PEFT loads the adapter at ``adapter_dir`` on ``TinyModel``; its forward equals the base model plus ``delta``."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = TinyModel()
    reference = TinyModel()
    reference.load_state_dict({k: v + delta.get(k, 0) for k, v in base.state_dict().items()})
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(peft_model(x), reference(x), atol=1e-5)
