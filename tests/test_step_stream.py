"""Issue 12 item 4 (library side): each phase 1+2 step is emitted as StepStreamed the moment
its JSON object closes, before StepsParsed, and the streamed steps are the final parse's."""
from __future__ import annotations

import pytest

from conftest import HYBRID_MODELS, make_engine, run_turn
from corgi.pipeline import ChatSession
from corgi.types import StepsParsed, StepStreamed, TextDelta, Phase


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", *HYBRID_MODELS])
def test_steps_stream_before_the_final_parse_and_equal_it(model, street_image):
    # structured output (grammar) on; room for more than one step (the suite's default budget
    # often closes the list after the first)
    session = ChatSession(make_engine(model, pipeline__reasoning_max_new_tokens=140), street_image)
    result, events = run_turn(session, "What does the sign say?")
    parsed_at = next(i for i, e in enumerate(events) if isinstance(e, StepsParsed))
    streamed = [(i, e.step) for i, e in enumerate(events) if isinstance(e, StepStreamed)]
    assert result.steps and [s for _, s in streamed] == result.steps == events[parsed_at].result.steps
    assert all(i < parsed_at for i, _ in streamed)
    # Live: the first step arrives while reasoning text is still streaming.
    first = streamed[0][0]
    assert any(isinstance(e, TextDelta) and e.phase == Phase.REASONING for e in events[first + 1:parsed_at])
