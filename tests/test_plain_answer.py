"""Issue 12 item 9: the plain answer branches off the turn's warm prefix (nothing re-encoded,
no image token re-prefilled) and leaves no token in the conversation."""
from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import HYBRID_MODELS, fast_config, make_engine, run_turn
from corgi.config import ConfigError
from corgi.pipeline import ChatSession
from corgi.types import Phase, PhaseFinished, PhaseStarted, TextDelta


def _session(model, image, plain: bool):
    engine = make_engine(model, pipeline__plain_answer=plain)
    session = ChatSession(engine, image)
    session.warm_up()
    return session


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", *HYBRID_MODELS])
def test_plain_answer_is_a_branch_that_leaves_the_conversation_unchanged(model, street_image):
    without, with_plain = _session(model, street_image, False), _session(model, street_image, True)
    for question in ("What does the sign say?", "And the car?"):
        a, _ = run_turn(without, question)
        b, events = run_turn(with_plain, question)
        # The next turn's context is the run without the plain answer, token for token.
        assert with_plain.conv.token_ids == without.conv.token_ids
        assert (b.answer, b.steps, b.raw["reasoning"]) == (a.answer, a.steps, a.raw["reasoning"])
        assert a.plain_answer is None and isinstance(b.plain_answer, str)
        assert "plain" in b.timings and "plain" not in a.timings
        assert b.to_json()["plain_answer"] == b.plain_answer
        # Events: one PLAIN phase, first, streamed.
        assert isinstance(events[0], PhaseStarted) and events[0].phase == Phase.PLAIN
        assert any(isinstance(e, PhaseFinished) and e.phase == Phase.PLAIN for e in events)
        assert any(isinstance(e, TextDelta) and e.phase == Phase.PLAIN for e in events) or not b.raw["plain"]
        # Nothing re-encoded, no image token re-prefilled: the only extra tokens computed are
        # the plain prompt's (its decoded tokens are not prefill), and phase 1+2 reused the prefix.
        extra = len(with_plain.engine.encode_text(b.prompts["plain"]))
        assert b.cache.vision_misses == a.cache.vision_misses == 0
        assert b.cache.vision_hits == a.cache.vision_hits == 0
        assert b.cache.prefill_tokens_computed - a.cache.prefill_tokens_computed == extra


def test_stop_during_the_plain_phase_leaves_the_conversation_at_the_turn_start(street_image):
    session = _session("tiny-qwen2.5-vl", street_image, True)
    before = list(session.conv.token_ids)
    stream = session.ask("What does the sign say?")
    for event in stream:
        if isinstance(event, TextDelta) and event.phase == Phase.PLAIN:
            break
    stream.close()
    assert session.conv.token_ids == before
    result, _ = run_turn(session, "What does the sign say?", replace(session.settings, plain_answer=False))
    assert result.steps is not None


def test_plain_answer_config_is_validated():
    assert fast_config("tiny-qwen2.5-vl").pipeline.plain_answer is False
    with pytest.raises(ConfigError):
        fast_config("tiny-qwen2.5-vl", pipeline__plain_answer="yes")
    with pytest.raises(ConfigError):
        fast_config("tiny-qwen2.5-vl", pipeline__plain_max_new_tokens=0)
