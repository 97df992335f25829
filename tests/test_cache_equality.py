"""Issue 4: warm caches change the cost, never the tokens.

Every comparison runs the real tiny models with greedy decoding and grammar constraint on:
caches on vs off, interleaved conversations vs solo, evicted-and-rebuilt vs warm, batched
region captions vs one by one.
"""
from __future__ import annotations

import pytest

from conftest import MOE_MODELS, TINY_MODELS, make_engine, run_turn
from corgi import prompts
from corgi.pipeline import ChatSession

QUESTIONS = ["What does the sign say?", "What colour is the car?", "Is it daytime?"]


def conversation(engine, image, questions):
    session = ChatSession(engine, image)
    results = [run_turn(session, q)[0] for q in questions]
    return session, results


_cold: dict = {}


def cold_run(model, image, turns: int) -> tuple[list[list[int]], list]:
    """The naive pipeline (caches off) on `image`, the first `turns` of QUESTIONS: the token list
    after each turn, and each turn's result. With the caches off a turn depends only on the
    tokens before it, so one cold conversation per (model, image) serves every test here that
    asks for it or a prefix of it (each cold turn re-encodes the image and re-reads the whole
    prompt: the dearest turns of this file)."""
    key = (model, image.size, image.tobytes())
    if len(_cold.get(key, ([], []))[0]) < turns:
        session = ChatSession(make_engine(model, cache__enabled=False), image)
        _cold[key] = ([], [])
        for question in QUESTIONS[:turns]:
            result, _ = run_turn(session, question)
            _cold[key][0].append(list(session.conv.token_ids))
            _cold[key][1].append(result)
    tokens, results = _cold[key]
    return tokens[:turns], results[:turns]


def cold_tokens(model, image, turns: int) -> list[int]:
    return cold_run(model, image, turns)[0][-1]


# The hybrid twin's caches-on/off comparison is in test_hybrid.py
# (test_interleaved_conversations_equal_solo: warm conversations against the naive pipeline, with
# these cache counters); its tokens are the dearest on a CPU, so it is not run twice.
@pytest.mark.parametrize("model", TINY_MODELS + MOE_MODELS)
def test_caches_on_and_off_give_identical_tokens(model, street_image):
    # The expert-MLP twins (eager decode, the same cache code as their dense families): two
    # turns, one follow-up.
    questions = QUESTIONS[:2] if model in MOE_MODELS else QUESTIONS
    warm, warm_results = conversation(make_engine(model), street_image, questions)
    cold_turn_tokens, cold_results = cold_run(model, street_image, len(questions))

    assert warm.conv.token_ids == cold_turn_tokens[-1]         # every phase, every turn
    for w, c in zip(warm_results, cold_results):
        assert w.raw == c.raw
        assert [e.to_json() for e in w.evidence] == [e.to_json() for e in c.evidence]

    # Warm: the image is encoded once, follow-ups compute only their new text.
    assert warm_results[0].cache.vision_misses == 1
    for follow_up in warm_results[1:]:
        stats = follow_up.cache
        assert stats.vision_misses == 0 and stats.vision_hits == 0
        assert stats.prefix_tokens_reused > 0
        # Computed = this turn's prompts and generated tokens, not the history before it.
        assert stats.prefill_tokens_computed < stats.prompt_tokens / 2
    # Cold: every phase (1+2 and 4) re-encodes the image and re-reads the whole prompt.
    for result in cold_results:
        assert result.cache.vision_misses == 2
        assert result.cache.prefix_tokens_reused == 0


# Qwen2-VL shares Qwen2.5-VL's rope-delta code; the hybrid family has its own test (test_hybrid.py).
@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_interleaved_conversations_never_mix(model, street_image):
    """Two images of different shapes (different rope deltas), turn by turn on one engine."""
    receipt_image = street_image.crop((0, 300, 640, 400)).resize((900, 140))   # wide: another delta
    engine = make_engine(model)
    a, b = ChatSession(engine, street_image), ChatSession(engine, receipt_image)
    assert a.conv.rope_delta != b.conv.rope_delta
    for question in QUESTIONS[:2]:
        run_turn(a, question)
        run_turn(b, question)
    assert a.conv.token_ids == cold_tokens(model, street_image, 2)
    solo_b, _ = conversation(make_engine(model, cache__enabled=False), receipt_image, QUESTIONS[:2])
    assert b.conv.token_ids == solo_b.conv.token_ids


def test_kv_budget_evicts_and_rebuilds_transparently(street_image, receipt_image):
    model = TINY_MODELS[0]
    engine = make_engine(model, cache__kv_cache_mb=0.05)     # room for about one conversation
    a, b = ChatSession(engine, street_image), ChatSession(engine, receipt_image)
    run_turn(a, QUESTIONS[0])
    run_turn(b, QUESTIONS[0])
    assert a.conv.kv is None, "the least recently used conversation is evicted"
    assert b.conv.kv is not None, "the conversation in use is never evicted"
    assert engine.kv_bytes_total() == b.conv.kv_bytes > 0
    result, _ = run_turn(a, QUESTIONS[1])                      # comes back: rebuilt from tokens
    assert result.cache.vision_hits == 1 and result.cache.vision_misses == 0   # features still cached
    assert a.conv.token_ids == cold_tokens(model, street_image, 2)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_batched_region_captions_equal_one_by_one(model, street_image):
    from corgi import boxes
    from corgi.types import Box, StepKind
    engine = make_engine(model)
    regions = [(Box(0.6, 0.1, 0.8, 0.35), StepKind.TEXT, "The sign says STOP."),
               (Box(0.45, 0.5, 0.65, 0.7), StepKind.OBJECT, "A blue car."),
               (Box(0.05, 0.15, 0.4, 0.65), StepKind.OBJECT, "A red house with a door."),
               (Box(0.8, 0.0, 1.0, 0.25), StepKind.OBJECT, "The sun.")]
    crops = [boxes.crop(street_image, box, 0.25) for box, _, _ in regions]
    before, after = prompts.crop_head()
    heads = [(before, after + prompts.crop_instruction(kind, text)) for _, kind, text in regions]

    def run(indices):
        rows = {i: [] for i in indices}
        for row, token in engine.generate_batch([crops[i] for i in indices], [heads[i] for i in indices],
                                                12, 448 * 448):
            rows[indices[row]].append(token)
        return rows

    batched = run([0, 1, 2, 3])
    for i in range(len(regions)):
        assert batched[i] == run([i])[i], f"region {i} differs between batch and single"
    # Crops of different sizes really were padded against each other.
    sizes = {engine.image_grid(c, 3136, 448 * 448) for c in crops}
    assert len(sizes) > 1


def test_stop_mid_turn_leaves_the_conversation_usable(street_image):
    from corgi.types import TextDelta
    model = TINY_MODELS[0]
    engine = make_engine(model)
    session = ChatSession(engine, street_image)
    run_turn(session, QUESTIONS[0])
    length = len(session.conv.token_ids)
    stream = session.ask(QUESTIONS[1])
    for event in stream:
        if isinstance(event, TextDelta):
            break
    stream.close()                                   # what the UI's Stop does
    assert len(session.conv.token_ids) == length     # the stopped turn left no tokens
    assert session.conv.kv_len <= length
    result, _ = run_turn(session, QUESTIONS[1])      # and the next turn equals an unstopped one
    assert session.conv.token_ids == cold_tokens(model, street_image, 2)
