"""Images decoded and preprocessed in DataLoader workers give the same training batches as in process."""

import torch

from knots.pipeline.training import StepBatches, collated_batches


def test_image_batches_from_workers_match_in_process(tiny_clip):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8).numpy())
              for _ in range(20)]
    steps = StepBatches(len(images), 6, seed=2, start=3, stop=9)
    in_process = list(collated_batches(tiny_clip, images, steps))
    workers = list(collated_batches(tiny_clip, images, steps, num_workers=2, seed=2))
    assert len(workers) == len(in_process) == 6
    for (idx_a, a), (idx_b, b) in zip(in_process, workers):
        assert idx_a == idx_b
        assert a["pixels"].dtype == torch.uint8 and a["pixels"].shape == (6, 3, 32, 32)
        assert torch.equal(a["pixels"], b["pixels"])
