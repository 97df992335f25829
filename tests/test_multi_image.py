"""Issue 12 item 3: several images in one conversation.

Caches on == off token for token when a second image joins at turn 2 and when the first turn
has two images: with the cache off every phase prefills the whole sequence from scratch, its
positions from HF's get_rope_index over all images; with it on, the joined image is a chunk
placed by slicing that same computation. Equal tokens prove the positions agree."""
from __future__ import annotations

import pytest

from conftest import HYBRID_MODELS, make_engine, run_turn
from corgi.pipeline import ChatSession


def _joined_run(model, street_image, receipt_image, cache: bool):
    session = ChatSession(make_engine(model, cache__enabled=cache), street_image)
    first, _ = run_turn(session, "What does the sign say?")
    kv_after_first = session.conv.kv_len
    assert session.add_images([receipt_image]) == [1]
    second, _ = run_turn(session, "What is the total?")
    return session, first, second, kv_after_first


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", *HYBRID_MODELS])
def test_joined_image_caches_on_equal_off(model, street_image, receipt_image):
    on, on1, on2, kv_after_first = _joined_run(model, street_image, receipt_image, True)
    off, off1, off2, _ = _joined_run(model, street_image, receipt_image, False)
    assert on.conv.token_ids == off.conv.token_ids
    assert [on1.raw, on2.raw] == [off1.raw, off2.raw]
    assert on1.images == [0] and on2.images == [1] and len(on.conv.images) == 2
    assert all(s.bbox is None or s.bbox.image == 1 for s in on2.steps)
    # Nothing earlier re-encoded or re-prefilled: one vision miss (the new image), and phase
    # 1+2 started from the cache that turn 1 left.
    assert on2.cache.vision_misses == 1 and on2.cache.vision_hits == 0
    assert on2.cache.prefix_tokens_reused >= kv_after_first
    # The first turn's tokens are still the prefix of the conversation.
    assert on.conv.token_ids[:len(on.conv.token_ids)] == off.conv.token_ids


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", *HYBRID_MODELS])
def test_two_image_first_turn_caches_on_equal_off_and_one_vision_batch(model, street_image, receipt_image):
    runs = []
    for cache in (True, False):
        engine = make_engine(model, cache__enabled=cache)
        session = ChatSession(engine, [street_image, receipt_image])
        calls = engine.vision.tower_calls
        result, _ = run_turn(session, "Which image has text?")
        runs.append((session, result, engine.vision.tower_calls - calls))
    (on, on_result, on_calls), (off, off_result, _) = runs
    assert on.conv.token_ids == off.conv.token_ids and on_result.raw == off_result.raw
    assert on_result.images == [0, 1]
    # Both images in one tower call (phase 3's crops are one more batch of their own).
    assert on_result.cache.vision_misses == 2
    assert on_calls == 1 + (on_result.cache.region_vision_misses > 0)
    for step in on_result.steps:
        assert step.bbox is None or step.bbox.image in (0, 1)
    assert "Image 2" in on_result.prompts["reasoning"] and '"image"' in on_result.prompts["reasoning"]


def test_regenerate_takes_the_joined_image_out_and_back(street_image, receipt_image):
    session = ChatSession(make_engine("tiny-qwen2.5-vl"), street_image)
    run_turn(session, "What does the sign say?")
    before = list(session.conv.token_ids)
    session.add_images([receipt_image])
    second, _ = run_turn(session, "What is the total?")
    session.undo_last_turn()
    assert session.conv.token_ids == before and len(session.conv.images) == 1
    assert session.pending == [receipt_image] and session.current == [0]
    again, _ = run_turn(session, "What is the total?")             # Regenerate
    assert again.raw == second.raw and again.images == [1]
    assert again.cache.vision_misses == 0 and again.cache.vision_hits == 1    # from the vision cache


def test_stop_in_a_turn_that_added_an_image(street_image, receipt_image):
    session = ChatSession(make_engine("tiny-qwen2.5-vl"), street_image)
    run_turn(session, "What does the sign say?")
    before = list(session.conv.token_ids)
    session.add_images([receipt_image])
    stream = session.ask("What is the total?")
    next(stream), next(stream)
    stream.close()
    assert session.conv.token_ids == before and len(session.conv.images) == 1
    assert session.pending == [receipt_image]
