"""The batched-window vision attention equals transformers' per-window SDPA loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODELS, loaded_model
from corgi.engine import vision_attention
from corgi.engine.preprocess import to_patches


@pytest.mark.parametrize("model", TINY_MODELS)
def test_varlen_equals_per_window_loop(model, monkeypatch):
    lm = loaded_model(model)
    visual_config = lm.model.model.visual.config
    assert visual_config._attn_implementation == vision_attention.NAME   # set at load time
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(300, 420), (340, 390), (112, 700)]]        # unequal windows at the edges
    pixels, grid = to_patches(images, lm.image_processor, 3136, 200704, lm.device)
    calls, computed, seen = [], [], {}
    original = vision_attention.varlen_sdpa
    monkeypatch.setattr(vision_attention, "varlen_sdpa", lambda *a, **k: calls.append(1) or original(*a, **k))
    groups = vision_attention.window_groups

    def counted_groups(cu):
        seen[id(cu)] = cu                               # keeps it alive: ids stay distinct
        if not hasattr(cu, "_corgi_window_groups"):
            computed.append(id(cu))
        return groups(cu)
    monkeypatch.setattr(vision_attention, "window_groups", counted_groups)
    from transformers import AttentionInterface
    AttentionInterface.register(vision_attention.NAME, vision_attention.varlen_sdpa)
    with torch.inference_mode():
        ours = lm.model.model.get_image_features(pixels, grid, return_dict=True).pooler_output
        monkeypatch.setattr(visual_config, "_attn_implementation", "sdpa")
        reference = lm.model.model.get_image_features(pixels, grid, return_dict=True).pooler_output
    AttentionInterface.register(vision_attention.NAME, original)
    assert calls, "the varlen path was not used"
    # the segments are read back to the host once per distinct cu_seqlens tensor (windows,
    # whole images), not in every block: a read-back makes the host wait for the GPU
    assert len(computed) == len(seen) <= 2 and len(calls) == lm.model.model.visual.config.depth
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
