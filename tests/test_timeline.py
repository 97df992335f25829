"""Issue 12: displayed times agree. A turn's phase times tile it (they add up to its total), and
its timeline spans (image encoding, prefill, decode, one per region) account for the tokens the
cache statistics count, live (SpanTimed events) and in the result alike."""
from __future__ import annotations

from dataclasses import replace

from conftest import make_engine, run_turn
from corgi.pipeline import ChatSession
from corgi.types import Phase, SpanTimed


def check_turn(result, events, encoded_in: Phase | None):
    phases = [k for k in result.timings if k != "total"]
    assert abs(sum(result.timings[k] for k in phases) - result.timings["total"]) < 1e-9
    assert [e.span for e in events if isinstance(e, SpanTimed)] == result.timeline
    spans = result.timeline
    # Prefill spans account for every token the turn computed or took from the cache.
    prefills = [s for s in spans if s.part == "prefill"]
    assert sum(s.tokens for s in prefills) == result.cache.prefill_tokens_computed
    assert sum(s.reused for s in prefills) == result.cache.prefix_tokens_reused
    assert {s.phase for s in prefills} == {Phase(p) for p in phases}
    # Each phase's spans lie inside it, in order; phase 3 has one span per region read.
    start = 0.0
    for phase in phases:
        end = start + result.timings[phase]
        own = [s for s in spans if s.phase.value == phase]
        for s in own:
            assert start - 1e-6 <= s.start and s.start + s.seconds <= end + 1e-6, (phase, s)
        if phase != Phase.EVIDENCE.value:
            assert [s.part for s in own if s.part != "image encoding"] == ["prefill", "decode"]
            assert all(a.start + a.seconds <= b.start + 1e-6 for a, b in zip(own, own[1:]))
        else:
            assert sorted(s.part for s in own if s.part.startswith("region")) == \
                sorted(f"region {i + 1}" for i in range(len(result.evidence)))
        start = end
    encodings = [s.phase for s in spans if s.part == "image encoding" and s.phase != Phase.EVIDENCE]
    assert encodings == ([encoded_in] if encoded_in else [])


def test_phase_times_add_up_and_spans_account_for_the_tokens(street_image, receipt_image):
    engine = make_engine("tiny-qwen2.5-vl")
    settings = replace(engine.config.pipeline, plain_answer=True)
    session = ChatSession(engine, street_image)       # not warmed up: the turn encodes the image
    check_turn(*run_turn(session, "What does the sign say?", settings), encoded_in=Phase.PLAIN)
    session.add_images([receipt_image])                 # joins at the next turn, in phase 1+2
    check_turn(*run_turn(session, "And the receipt's total?"), encoded_in=Phase.REASONING)
    result, _ = run_turn(session, "Which shop?")
    assert not [s for s in result.timeline if s.part == "image encoding" and s.phase != Phase.EVIDENCE]
