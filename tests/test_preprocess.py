"""The device-side preprocessing equals transformers' PIL image processor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from corgi.engine.preprocess import to_patches
from corgi.engine.tiny import ensure_tiny_checkpoint


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_patches_equal_the_hf_processor(family):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    processor = Qwen2VLImageProcessorPil.from_pretrained(ensure_tiny_checkpoint(f"tiny-{family}"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(448, 448), (300, 517), (37, 901), (1000, 80)]]
    for min_pixels, max_pixels in [(3136, 200704), (65536, 448 * 448)]:
        ours, grid = to_patches(images, processor, min_pixels, max_pixels, torch.device("cpu"))
        ref = processor(images=images, return_tensors="pt",
                        size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
        assert torch.equal(grid, ref["image_grid_thw"])
        assert ours.shape == ref["pixel_values"].shape
        assert torch.allclose(ours, ref["pixel_values"], atol=1e-5, rtol=0)
