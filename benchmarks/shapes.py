"""Random-weight models with the real checkpoints' dimensions, for timing without downloads.

    lm = loaded_random_model("qwen2.5-vl-3b", "cuda", torch.bfloat16)
    engine = Engine(lm, config)                     # runs unchanged on it

Random weights of the real shape cost exactly the compute of the real checkpoint (same
matmuls, same attention lengths). Token counts must be forced (benchmarks.common.ForcedEngine,
or min_new_tokens == max_new_tokens in HF generate): a random model's text is noise.

Tokenizer and image processor come from the tiny builder's checkpoint of the same family:
its token ids are < 2048, valid rows of a 151936-entry embedding, and the model config's
image/video/vision token ids are set to the tiny tokenizer's. Caveat: that tokenizer has
~2000 real tokens, so anything that scales with the tokenizer (xgrammar's mask fill) is
cheaper than with Qwen's 151k-token tokenizer; pass `tokenizer_folder` to use a real one.
"""
from __future__ import annotations

import time

import torch

from corgi.families import BY_MODEL_TYPE as FAMILIES
from corgi.engine.loading import LoadedModel, SpecialTokens

# From the checkpoints' config.json (see /work/shared/notes/qwen-vl-in-transformers.md).
_QWEN25_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, hidden_act="silu",
                      patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                      spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, in_channels=3)
REAL_SHAPES = {
    "qwen2.5-vl-3b": dict(
        family="qwen2.5-vl",
        text=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
                  rope_theta=1e6, mrope_section=[16, 24, 24]),
        vision=dict(_QWEN25_VISION)),
    "qwen2.5-vl-7b": dict(
        family="qwen2.5-vl",
        text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                  rope_theta=1e6, mrope_section=[16, 24, 24]),
        vision=dict(_QWEN25_VISION)),
    "qwen3-vl-4b": dict(
        family="qwen3-vl",
        text=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True,
                  rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True),
        vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                    hidden_act="gelu_pytorch_tanh", patch_size=16, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], spatial_merge_size=2, temporal_patch_size=2,
                    in_channels=3)),
}

# Tiny widths with the same structure, for the smoke tests (not real checkpoints).
SMOKE_SHAPES = {
    "smoke-qwen2.5-vl": dict(
        family="qwen2.5-vl",
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=151936, tie_word_embeddings=True,
                  rope_theta=1e6, mrope_section=[2, 3, 3]),
        vision=dict(_QWEN25_VISION, depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                    fullatt_block_indexes=[1])),
    "smoke-qwen3-vl": dict(
        family="qwen3-vl",
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, vocab_size=151936, tie_word_embeddings=True,
                  rope_theta=5e6, mrope_section=[2, 3, 3], mrope_interleaved=True),
        vision=dict(REAL_SHAPES["qwen3-vl-4b"]["vision"], depth=2, hidden_size=32, num_heads=2,
                    intermediate_size=64, deepstack_visual_indexes=[0, 1])),
}
SHAPES = {**REAL_SHAPES, **SMOKE_SHAPES}


def _special(tokenizer) -> SpecialTokens:
    tid = lambda t: int(tokenizer.convert_tokens_to_ids(t))
    return SpecialTokens(im_start=tid("<|im_start|>"), im_end=tid("<|im_end|>"),
                         end_of_text=tid("<|endoftext|>"), vision_start=tid("<|vision_start|>"),
                         vision_end=tid("<|vision_end|>"), image_pad=tid("<|image_pad|>"))


def model_config(shape_name: str, tokenizer, layers_override: int | None = None,
                 vision_depth_override: int | None = None):
    """The transformers config of the shape; special token ids from `tokenizer`. The overrides
    cut depth only (every width stays real), for quick CPU checks."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig
    shape = SHAPES[shape_name]
    t, v = dict(shape["text"]), dict(shape["vision"])
    if layers_override is not None:
        t["num_hidden_layers"] = layers_override
    if vision_depth_override is not None:
        d = vision_depth_override
        v["depth"] = d
        if "fullatt_block_indexes" in v:      # keep at least one full-attention block
            v["fullatt_block_indexes"] = [i for i in v["fullatt_block_indexes"] if i < d] or [d - 1]
        if "deepstack_visual_indexes" in v:   # one deepstack level per text layer at most
            keep = [i for i in v["deepstack_visual_indexes"] if i < d] or list(range(min(3, d)))
            v["deepstack_visual_indexes"] = keep[:t["num_hidden_layers"]]
    v["out_hidden_size"] = t["hidden_size"]
    sp = _special(tokenizer)
    video_pad = int(tokenizer.convert_tokens_to_ids("<|video_pad|>"))
    rope = {"rope_type": "default", "rope_theta": t.pop("rope_theta"), "mrope_section": t.pop("mrope_section")}
    if t.pop("mrope_interleaved", False):
        rope["mrope_interleaved"] = True
    tie = t["tie_word_embeddings"]
    text = dict(t, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=128000,
                initializer_range=0.02, use_cache=True, rope_parameters=rope,
                bos_token_id=sp.end_of_text, eos_token_id=sp.im_end)
    tokens = dict(image_token_id=sp.image_pad, video_token_id=video_pad, vision_start_token_id=sp.vision_start,
                  vision_end_token_id=sp.vision_end, bos_token_id=sp.end_of_text, eos_token_id=sp.im_end,
                  tie_word_embeddings=tie)
    if shape["family"] == "qwen2.5-vl":
        text.update(use_sliding_window=False, max_window_layers=text["num_hidden_layers"])
        return Qwen2_5_VLConfig(text_config=text, vision_config=dict(v, initializer_range=0.02), **tokens)
    text.update(attention_bias=False)
    return Qwen3VLConfig(text_config=text, vision_config=dict(v, initializer_range=0.02), **tokens)


@torch.no_grad()
def _random_init(model: torch.nn.Module, seed: int) -> None:
    """normal_(0, 0.02) for every matrix, 1 for norm weights, 0 for biases: one cheap kernel per
    parameter (HF's _init_weights walks every module; the values do not matter for timing)."""
    device = next(model.parameters()).device
    if device.type == "meta":          # structure only (parameter counts): nothing to fill
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()


def build_random_model(shape_name: str, device="cuda", dtype=torch.bfloat16, *, tokenizer_folder=None,
                       layers_override: int | None = None, vision_depth_override: int | None = None,
                       min_pixels: int | None = None, max_pixels: int | None = None, seed: int = 0):
    """(model, tokenizer, image_processor): a random-weight model of the real shape, on `device`."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from corgi.engine.tiny import ensure_tiny_checkpoint

    family = SHAPES[shape_name]["family"]
    tiny = ensure_tiny_checkpoint(f"tiny-{family}")    # ~2 s the first time, then cached
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or tiny)
    kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(tiny, **kwargs)   # patch 14 / 16, merge 2
    config = model_config(shape_name, tokenizer, layers_override, vision_depth_override)
    cls = getattr(transformers, FAMILIES[config.model_type].model_class)
    # Allocate straight on the device, in the target dtype, skipping every init kernel.
    with torch.device(device), no_init_weights():
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()        # no_init_weights also skipped the tying
    _random_init(model, seed)
    model.eval().requires_grad_(False)
    stop = [_special(tokenizer).im_end, _special(tokenizer).end_of_text]
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=stop[1], pad_token_id=stop[1], eos_token_id=stop)
    return model, tokenizer, image_processor


def loaded_random_model(shape_name: str, device="cuda", dtype=torch.bfloat16, **kwargs) -> LoadedModel:
    """A corgi LoadedModel around build_random_model(), so Engine(loaded, config) runs on it."""
    model, tokenizer, image_processor = build_random_model(shape_name, device, dtype, **kwargs)
    family = FAMILIES[model.config.model_type]
    return LoadedModel(model=model, tokenizer=tokenizer, image_processor=image_processor, family=family,
                       model_id=shape_name, path=f"random:{shape_name}", special=_special(tokenizer),
                       device=torch.device(device), dtype=dtype,
                       patch_size=int(image_processor.patch_size), merge_size=int(image_processor.merge_size))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="build a random model of a real shape and report its size")
    ap.add_argument("--shape", default="qwen2.5-vl-3b", choices=sorted(REAL_SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="text layers (default: real)")
    ap.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default: real)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lm = loaded_random_model(args.shape, args.device, torch.bfloat16, layers_override=args.layers,
                             vision_depth_override=args.vision_depth)
    print(f"{args.shape}: {parameter_count(lm.model) / 1e9:.3f} B parameters, built in "
          f"{time.perf_counter() - t0:.1f} s on {args.device}")
