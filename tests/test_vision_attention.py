"""The batched-window vision attention equals transformers' per-window SDPA loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODELS, fast_config, loaded_model
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


# Qwen2.5-VL: windowed and whole-image attention (two segment tensors) in one tower. The other
# families' blocks take the same path with one segment tensor (the suite's time is the limit).
@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl"])
def test_compiled_blocks_equal_eager_and_serve_every_size_without_recompiling(model):
    """vision.compile_tower_blocks: the window attention is a custom op the graph goes around, so
    one dynamic-shape graph serves images and crops of every size; a recompile would be a stall
    mid-turn on a GPU. aot_eager: dynamo's tracing and guards as on the GPU, without inductor's
    CPU code generation (tens of seconds)."""
    from torch._dynamo.utils import counters
    from corgi.engine.loading import load_model
    from corgi.engine.vision import VisionEncoder, compile_tower_blocks
    cfg = fast_config(model)
    lm = load_model(cfg.model, cfg.image)          # its own copy: the compile is in place
    encoder = VisionEncoder(lm, cache_bytes=0, enabled=False)
    rng = np.random.default_rng(2)
    sets = [[(h, w)] for h, w in [(300, 420), (112, 700)]] + [[(448, 448)] * 3, [(200, 500), (640, 120)]]
    sets = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in s] for s in sets]
    eager = [encoder.encode(images, 3136, 200704) for images in sets]
    before = counters["stats"]["unique_graphs"]
    assert compile_tower_blocks(lm.model, backend="aot_eager")
    built = counters["stats"]["unique_graphs"]
    assert built > before, "the probe image compiled nothing"
    graphs = []
    for images, reference in zip(sets, eager):
        compiled = encoder.encode(images, 3136, 200704)
        graphs.append(counters["stats"]["unique_graphs"])
        for a, b in zip(compiled, reference):
            assert a.grid_thw == b.grid_thw
            assert b.embeds.abs().max() > 0
            assert torch.allclose(a.embeds, b.embeds, atol=1e-5, rtol=1e-5)
            for x, y in zip(a.deepstack, b.deepstack):
                assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)
    assert graphs == [built] * len(sets), f"recompiled after the probe for a new size: graphs {graphs}"


def test_a_vision_compile_that_fails_leaves_the_tower_eager(caplog):
    """A GPU host whose toolchain cannot build the blocks' graphs (inductor, triton, a compiler)
    gets one warning at load and an eager tower, not a failure on every image."""
    from corgi.engine.loading import load_model
    from corgi.engine.vision import VisionEncoder, compile_tower_blocks
    cfg = fast_config("tiny-qwen2.5-vl")
    lm = load_model(cfg.model, cfg.image)
    encoder = VisionEncoder(lm, cache_bytes=0, enabled=False)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    reference = encoder.encode([image], 3136, 200704)[0].embeds

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C compiler on this host")
    with caplog.at_level("WARNING", logger="corgi.engine.vision"):
        assert not compile_tower_blocks(lm.model, backend=no_compiler)
    assert "vision blocks could not be compiled" in caplog.text and "no C compiler" in caplog.text
    assert all(block._compiled_call_impl is None for block in lm.model.model.visual.blocks)
    assert torch.equal(encoder.encode([image], 3136, 200704)[0].embeds, reference)
