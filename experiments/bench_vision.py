"""Throughput of the vision path: preprocessing, evaluation and LoRA finetuning (images per second).

A ViT-B/32-shaped CLIP with random weights (open_clip's ViT-B-32 config, nothing downloaded); speed
does not depend on the weights. Evaluation runs on pre-collated uint8 batches, as the pipeline's
evaluation sets hold them; finetuning is one AdamW step on LoRA r16 (q, k, v, out of every block).

    python experiments/bench_vision.py --arch ViT-B-32 --batch-size 32 --device cpu
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip
    from peft import LoraConfig, get_peft_model

    from knots.vision.clip import LORA_TARGETS, ClipBackbone

    config = open_clip.get_model_config(args.arch)
    config["quick_gelu"] = True
    backbone = ClipBackbone(name=args.arch, path="random", model_config=config).to(args.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(args.batch_size)]
    batch = {k: v.to(args.device) for k, v in backbone.collate(images).items()}
    out = {"arch": args.arch, "device": args.device, "batch_size": args.batch_size,
           "threads": torch.get_num_threads(), "weights": "random"}

    seconds = timed(lambda: backbone.collate(images), args.repeats)
    out["preprocess_images_per_s"] = args.batch_size / seconds  # decode-free: PIL resize + crop

    encoder = backbone.encoder.eval()
    with torch.no_grad():
        seconds = timed(lambda: encoder(batch), args.repeats)
    out["eval_images_per_s"] = args.batch_size / seconds

    model = get_peft_model(encoder, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)
    heads = torch.nn.functional.normalize(torch.randn(10, backbone.feature_dim, device=args.device), dim=-1)
    labels = torch.randint(0, 10, (args.batch_size,), device=args.device)

    def step() -> None:
        feats = torch.nn.functional.normalize(model(batch), dim=-1)
        loss = torch.nn.functional.cross_entropy(100 * feats @ heads.T, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out["finetune_images_per_s"] = args.batch_size / timed(step, args.repeats)
    out["lora_modules"] = sum(1 for n, _ in model.named_modules() if n.endswith(tuple(LORA_TARGETS)))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
