"""Vision: open_clip CLIP with separated attention, the paper's image tasks, released adapters."""
