"""Issue 6 on the CPU: the static-KV decode step (the one CUDA graphs replay on a GPU) gives
the same greedy tokens as the HF eager path, in conversations and in region batches."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODELS, make_engine, run_turn
from corgi import boxes, prompts
from corgi.engine.static_decode import StaticDecoder
from corgi.pipeline import ChatSession
from corgi.types import Box, StepKind


@pytest.mark.parametrize("model", TINY_MODELS)
def test_static_decoder_matches_eager_in_a_conversation(model, street_image):
    eager = ChatSession(make_engine(model), street_image)
    static_engine = make_engine(model, model__compile=True, model__warmup=False)
    static = ChatSession(static_engine, street_image)
    for question in ("What does the sign say?", "And the car?"):
        run_turn(eager, question)
        run_turn(static, question)
    assert static.conv.token_ids == eager.conv.token_ids
    assert static_engine.static.buckets, "the static path was really used"
    assert static.conv.kv_len == eager.conv.kv_len   # K/V handed back to the conversation


@pytest.mark.parametrize("model", TINY_MODELS)
def test_static_decoder_matches_eager_for_region_batches(model, street_image):
    regions = [(Box(0.6, 0.1, 0.8, 0.35), StepKind.TEXT), (Box(0.45, 0.5, 0.65, 0.7), StepKind.OBJECT),
               (Box(0.05, 0.15, 0.4, 0.65), StepKind.OBJECT)]
    crops = [boxes.crop(street_image, box, 0.25) for box, _ in regions]
    before, after = prompts.crop_head()
    heads = [(before, after + prompts.crop_instruction(kind, "a region")) for _, kind in regions]

    def tokens(engine):
        rows = {}
        for row, token in engine.generate_batch(crops, heads, 16, 448 * 448, min_new_tokens=16):
            rows.setdefault(row, []).append(token)
        return rows

    static_engine = make_engine(model, model__compile=True, model__warmup=False)
    assert tokens(static_engine) == tokens(make_engine(model))
    assert (4, 512) in static_engine.static.buckets    # 3 rows ran in the 4-row bucket


def test_caption_warm_up_leaves_nothing_behind(street_image):
    """The warm-up's padded caption batch (run on CUDA at load) shares buckets and the vision
    cache with real turns: the region batch after it decodes as on a fresh engine."""
    regions = [Box(0.6, 0.1, 0.8, 0.35), Box(0.05, 0.15, 0.4, 0.65)]
    crops = [boxes.crop(street_image, box, 0.25) for box in regions]
    before, after = prompts.crop_head()
    heads = [(before, after + prompts.crop_instruction(StepKind.OBJECT, s)) for s in ("a sign", "the red car")]

    def tokens(engine):
        rows = {}
        for row, token in engine.generate_batch(crops, heads, 12, 448 * 448, min_new_tokens=12):
            rows.setdefault(row, []).append(token)
        return rows

    warmed = make_engine(TINY_MODELS[0], model__compile=True, model__warmup=False)
    warmed.warm_up_captions(batch_sizes=(3,))
    assert (4, 512) in warmed.static.buckets           # the warm-up's 3 rows went through a bucket
    assert tokens(warmed) == tokens(make_engine(TINY_MODELS[0], model__compile=True, model__warmup=False))


def test_one_step_logits_match_hf(street_image):
    """The hand-written layer equals the HF layer to float32 rounding."""
    engine = make_engine(TINY_MODELS[1])
    session = ChatSession(engine, street_image)
    engine.append(session.conv, prompts.reasoning_prompt("hi", 2, boxes.REL1000))
    hf_logits = engine.prefill(session.conv)                     # prompt through HF
    last = session.conv.token_ids.pop()                          # feed the last token again, via both paths
    session.conv.truncate(len(session.conv.token_ids))
    decoder = StaticDecoder(engine.lm.model, engine.lm.device, engine.lm.dtype, False, False)
    bucket = decoder.bucket(1, session.conv.kv_len + 4)
    start = session.conv.kv_len
    bucket.load(session.conv.kv, start, torch.tensor([start + session.conv.rope_delta]), None)
    static_logits = bucket.step(torch.tensor([last]))
    assert torch.allclose(static_logits, hf_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3.5"])
def test_a_short_prefill_through_the_static_bucket_equals_hf(model, street_image):
    """A text chunk of up to 1024 tokens after a cached prefix (a follow-up, the next phase's
    prompt) goes through the bucket's multi-token forward, 64 tokens a forward
    (engine._prefill_static): the HF prefill's logits, and a cache that HF then continues
    from as if it had prefilled the chunk itself (K/V columns, and Qwen3.5's linear states).
    A longer chunk goes through HF, except on a hybrid model, whose text chunks all take the
    bucket (HF's linear-attention kernels compile on first use of a shape: engine.py)."""
    hf, static = make_engine(model), make_engine(model, model__compile=True, model__warmup=False)
    follow_up = " ".join(["What colour is the car next to the sign, and is it parked?"] * 24)  # > 256 tokens
    long_text = " ".join(["Describe the street once more, in full detail."] * 110)           # > 1024 tokens
    seen = {}
    for name, engine in (("hf", hf), ("static", static)):
        conv = ChatSession(engine, street_image).conv
        engine.append(conv, prompts.reasoning_prompt("hi", 2, boxes.REL1000))
        engine.prefill(conv)                                      # the image prompt: HF in both
        engine.append(conv, follow_up)
        chunk = len(conv.token_ids) - conv.kv_len
        short = engine.prefill(conv)                              # static path in the static engine
        engine.append(conv, long_text)
        long_chunk = len(conv.token_ids) - conv.kv_len
        seen[name] = (chunk, short, engine.prefill(conv), conv.kv_len, long_chunk)
    assert 256 < seen["hf"][0] <= 1024 < seen["hf"][4]
    buckets = 2 if static.lm.family.hybrid else 1       # the long chunk needs a larger bucket
    assert [b.last_width for b in static.static.buckets.values()] == [64] * buckets, "static, 64 wide"
    assert seen["static"][3] == seen["hf"][3]
    assert torch.allclose(seen["static"][1], seen["hf"][1], atol=1e-4, rtol=1e-4)
    assert torch.allclose(seen["static"][2], seen["hf"][2], atol=1e-4, rtol=1e-4)
