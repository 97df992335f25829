"""Warm conversations on a hybrid model (Qwen3.5: Gated DeltaNet + attention), greedy.

The linear layers' state cannot be cut back, so Stop, Regenerate, a failed phase and
eviction go back to a snapshot taken at a phase or turn boundary (engine/state.py) and
recompute what follows. Every test compares against the naive pipeline (no caches).
"""
from __future__ import annotations

import pytest

from conftest import HYBRID_MODELS, make_engine, run_turn
from corgi import prompts
from corgi.engine import state
from corgi.pipeline import ChatSession
from corgi.types import TextDelta

MODEL = HYBRID_MODELS[0]
QUESTIONS = ["What does the sign say?", "What colour is the car?", "Is it daytime?"]


def engine_of(**overrides):
    """Shorter phases than the other families' tests: the tiny twin's 248k-row lm_head and
    the torch fallback of the delta rule make each Qwen3.5 token dearer on the CPU."""
    budgets = dict(pipeline__reasoning_max_new_tokens=70, pipeline__synthesis_max_new_tokens=45,
                   pipeline__max_thinking_chars=30)
    return make_engine(MODEL, **dict(budgets, **overrides))


def conversation(engine, image, questions):
    session = ChatSession(engine, image)
    for q in questions:
        run_turn(session, q)
    return session


@pytest.fixture(scope="module")
def reference(street_image):
    """The naive pipeline's tokens for QUESTIONS[:2] (no KV, no snapshots)."""
    return conversation(engine_of(cache__enabled=False), street_image, QUESTIONS[:2]).conv.token_ids


def test_the_cache_is_hybrid_and_snapshots_count_in_memory(street_image):
    engine = engine_of()
    session = conversation(engine, street_image, QUESTIONS[:1])
    conv = session.conv
    kinds = {type(layer).__name__ for layer in conv.kv.layers}
    assert any(state.is_linear(layer) for layer in conv.kv.layers) and "GrowingLayer" in kinds
    assert conv.snapshots, "every prefill marks a boundary"
    snapshot_bytes = sum(s.nbytes for s in conv.snapshots)
    assert snapshot_bytes > 0 and engine.snapshot_bytes_total() == snapshot_bytes
    assert conv.kv_bytes == state.cache_nbytes(conv.kv) + snapshot_bytes == engine.kv_bytes_total()


def test_stopped_then_continued_equals_never_stopped(street_image, reference):
    session = ChatSession(engine_of(), street_image)
    run_turn(session, QUESTIONS[0])
    length = len(session.conv.token_ids)
    stream = session.ask(QUESTIONS[1])
    for event in stream:
        if isinstance(event, TextDelta):
            break
    stream.close()                                   # the UI's Stop
    assert len(session.conv.token_ids) == length
    assert session.conv.kv is not None, "restored from a snapshot, not dropped"
    assert session.conv.kv_len <= length
    run_turn(session, QUESTIONS[1])
    assert session.conv.token_ids == reference


def test_regenerate_goes_back_to_the_turn_start(street_image, reference):
    session = conversation(engine_of(), street_image, QUESTIONS[:2])
    session.undo_last_turn()
    assert session.conv.kv is not None and session.conv.kv_len <= len(session.conv.token_ids)
    run_turn(session, QUESTIONS[1])
    assert session.conv.token_ids == reference


def test_evicted_and_rebuilt_equals_solo(street_image, receipt_image, reference):
    engine = engine_of(cache__kv_cache_mb=0.01)      # room for one conversation at most
    a, b = ChatSession(engine, street_image), ChatSession(engine, receipt_image)
    run_turn(a, QUESTIONS[0])
    run_turn(b, QUESTIONS[0])
    assert a.conv.kv is None and not a.conv.snapshots, "evicted: state and snapshots"
    run_turn(a, QUESTIONS[1])
    assert a.conv.token_ids == reference


def test_interleaved_conversations_equal_solo(street_image, reference):
    wide = street_image.crop((0, 300, 640, 400)).resize((900, 140))     # another rope delta
    engine = engine_of()
    a, b = ChatSession(engine, street_image), ChatSession(engine, wide)
    results = []
    for q in QUESTIONS[:2]:
        results.append(run_turn(a, q)[0])
        run_turn(b, q)
    assert a.conv.token_ids == reference
    # Warm (test_cache_equality.py's counters for the other families): the image is encoded
    # once, the follow-up computes only its new text.
    first, follow_up = (r.cache for r in results)
    assert first.vision_misses == 1
    assert follow_up.vision_misses == 0 and follow_up.vision_hits == 0
    assert 0 < follow_up.prefill_tokens_computed < follow_up.prompt_tokens / 2
    assert follow_up.prefix_tokens_reused > 0
    solo_b = conversation(engine_of(cache__enabled=False), wide, QUESTIONS[:2])
    assert b.conv.token_ids == solo_b.conv.token_ids


def test_prefill_warm_up_keeps_nothing_and_changes_nothing(street_image, reference):
    """The CUDA warm-up's filler prefills (batches with left padding, then a chunk on top of
    a state) run on the CPU too when called: no state is kept, later turns are unchanged."""
    engine = engine_of()
    engine.warm_up_prefill(rows=(1, 2), lengths=(5,))
    assert engine.kv_bytes_total() == 0 and engine.snapshot_bytes_total() == 0
    assert conversation(engine, street_image, QUESTIONS[:2]).conv.token_ids == reference


@pytest.mark.parametrize("compiled", [False, True])
def test_batched_captions_equal_one_by_one(street_image, compiled):
    """Left padding must not leak into the recurrent state of the padded rows. compiled: the
    static batch bucket, where prompt-lookup drafts are verified per row and the rejected ones
    cut back by replaying each row's linear states (the eager batch verifies none)."""
    from corgi import boxes
    from corgi.engine import decode
    from corgi.types import Box, CacheStats, StepKind
    engine = engine_of(**({"model__compile": True, "model__warmup": False} if compiled else {}))
    regions = [(Box(0.6, 0.1, 0.8, 0.35), StepKind.TEXT, "The sign says STOP."),
               (Box(0.05, 0.15, 0.4, 0.65), StepKind.OBJECT, "A red house with a door."),
               (Box(0.8, 0.0, 1.0, 0.25), StepKind.OBJECT, "The sun.")]
    crops = [boxes.crop(street_image, box, 0.25) for box, _, _ in regions]
    before, after = prompts.crop_head()
    heads = [(before, after + prompts.crop_instruction(kind, text)) for _, kind, text in regions]
    assert len({engine.image_grid(c, 3136, 448 * 448) for c in crops}) > 1     # really padded

    def run(indices, stats=None):
        rows = {i: [] for i in indices}
        for row, token in engine.generate_batch([crops[i] for i in indices], [heads[i] for i in indices],
                                                10, 448 * 448, stats=stats):
            rows[indices[row]].append(token)
        return rows

    class EveryStep(decode.PromptLookup):
        """Drafts the row's last k tokens at every step (the twin rejects nearly all of them)."""
        def draft(self, limit):
            return self.ids[-min(self.k, limit):]

    # The batch verifies drafts at every step; the single rows draft nothing.
    engine._lookup = lambda ids, sampling: EveryStep(ids, k=4)
    batched = run([0, 1, 2], stats := CacheStats())
    engine._lookup = lambda ids, sampling: None
    for i in range(len(regions)):
        assert batched[i] == run([i])[i], f"region {i} differs between batch and single"
    assert (stats.drafted_tokens > 0) == compiled


def test_static_step_equals_eager_through_the_pipeline(street_image):
    """model.compile: the hybrid static step (conv shift + recurrent update over static
    buffers; CUDA graphs on GPUs, eager here) gives the naive pipeline's tokens. Jump-forward
    off on both sides: its forced chunks go through HF's chunked delta rule on the eager side and
    token by token on the static side, which round differently (~2e-5 on logits of ~10), enough
    to flip a near-tie of the random twin (tests/test_fewer_steps.py covers jump-forward)."""
    reference = conversation(engine_of(cache__enabled=False, pipeline__jump_forward=False), street_image,
                             QUESTIONS[:2]).conv.token_ids
    engine = engine_of(model__compile=True, pipeline__jump_forward=False)
    session = conversation(engine, street_image, QUESTIONS[:2])
    assert type(engine.static.stack).__name__ == "HybridTextStack"
    assert engine.static_bytes() > 0
    assert session.conv.token_ids == reference


def test_thinking_off_gives_an_empty_think_block(street_image):
    engine = engine_of(pipeline__thinking=False)
    result, _ = run_turn(ChatSession(engine, street_image), QUESTIONS[0])
    assert result.raw["reasoning"].startswith("<think></think>")
    assert result.steps
