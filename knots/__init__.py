"""knots: merging LoRA-finetuned models with KnOTS and the task-arithmetic family."""

__version__ = "0.1.0"
