"""Faults inside a turn (hardening, part 3), in process on the real tiny model.

  * A model error or out-of-memory in any phase of one user's turn: that turn ends with a clear
    message, its tokens (and any half-written K/V) are dropped, the same user's next turn equals
    an unfaulted one token for token, and another user's conversation is untouched.
  * Stop (closing the turn's event stream, which is what the UI's Stop does) after the first
    event of every phase: the next turn equals an unstopped one, token for token.

Faults are injected where real ones happen: inside the last decoder layer's forward, so the
layers before it have already written this step's K/V (an OOM is raised mid-forward, not before
it), or inside the vision tower.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import make_engine, run_turn
from corgi.images import load_image
from corgi.pipeline import ChatSession
from corgi.types import AnswerReady, EvidenceReady, OutOfMemory, Phase, PhaseStarted, StepsParsed, TextDelta, TurnFinished

from test_load import REPO

MODEL = "tiny-qwen2.5-vl"
QUESTIONS = ["Read the receipt.", "What is the total?"]     # turn 2 reads two regions: every phase runs the model
OOM_MESSAGE = "The model ran out of memory on this turn."


@pytest.fixture(scope="module")
def images():
    # The receipt's second turn reads two regions, so every phase runs the model.
    return {name: load_image(REPO / "assets" / name, 10**8) for name in ("receipt.png", "street-scene.png")}


@pytest.fixture(scope="module")
def references(images):
    """The token list after each turn of an undisturbed run (caches off: the naive pipeline)."""
    engine = make_engine(MODEL, cache__enabled=False)
    refs = {}
    for name, image in images.items():
        session = ChatSession(engine, image)
        refs[name] = []
        for question in QUESTIONS:
            result, _ = run_turn(session, question)
            refs[name].append((list(session.conv.token_ids), result.raw))
    return refs


class Fault:
    """Raise `error` from inside the model's last decoder layer (or its vision tower) once
    armed; later calls run normally."""

    def __init__(self, engine, error: BaseException, where: str = "layer"):
        model = engine.lm.model.model
        self.module = model.language_model.layers[-1] if where == "layer" else model.visual
        self.error, self.armed, self.fired = error, False, 0
        self.original = self.module.forward

        def forward(*args, **kwargs):
            if self.armed:
                self.armed = False
                self.fired += 1
                raise self.error
            return self.original(*args, **kwargs)
        self.module.forward = forward

    def remove(self):
        self.module.forward = self.original


def first_event_of(phase: str):
    """A predicate for the first event of `phase` worth stopping or failing at."""
    return {
        "reasoning-start": lambda e: isinstance(e, PhaseStarted) and e.phase == Phase.REASONING,
        "reasoning-decode": lambda e: isinstance(e, TextDelta) and e.phase == Phase.REASONING,
        "steps-parsed": lambda e: isinstance(e, StepsParsed),
        "evidence-start": lambda e: isinstance(e, PhaseStarted) and e.phase == Phase.EVIDENCE,
        "evidence-decode": lambda e: isinstance(e, TextDelta) and e.phase == Phase.EVIDENCE,
        "evidence-ready": lambda e: isinstance(e, EvidenceReady),
        "synthesis-start": lambda e: isinstance(e, PhaseStarted) and e.phase == Phase.SYNTHESIS,
        "synthesis-decode": lambda e: isinstance(e, TextDelta) and e.phase == Phase.SYNTHESIS,
        "answer-ready": lambda e: isinstance(e, AnswerReady),
    }[phase]


# ---- the pipeline ------------------------------------------------------------------------------

FAULTS = [
    # (phase after whose first event the model fails, error)
    ("reasoning-start", torch.OutOfMemoryError("CUDA out of memory (simulated)")),   # the prompt's prefill
    ("reasoning-decode", torch.OutOfMemoryError("CUDA out of memory (simulated)")),  # a decode step
    ("evidence-start", torch.OutOfMemoryError("CUDA out of memory (simulated)")),    # the regions' batch
    ("synthesis-decode", torch.OutOfMemoryError("CUDA out of memory (simulated)")),
    ("reasoning-decode", RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED (simulated)")),  # any model error
]


@pytest.mark.parametrize("phase, error", FAULTS, ids=[f"{p}-{type(e).__name__}" for p, e in FAULTS])
def test_a_fault_in_one_turn_drops_that_turn_only(phase, error, images, references):
    engine = make_engine(MODEL, cache__kv_cache_mb=64)
    user, other = ChatSession(engine, images["receipt.png"]), ChatSession(engine, images["street-scene.png"])
    run_turn(user, QUESTIONS[0])
    run_turn(other, QUESTIONS[0])
    length = len(user.conv.token_ids)
    fault = Fault(engine, error)
    try:
        stream = user.ask(QUESTIONS[1])
        # torch's out-of-memory error leaves the engine as corgi's (the UI and CLI need no torch).
        with pytest.raises(OutOfMemory if isinstance(error, torch.OutOfMemoryError) else type(error)):
            for event in stream:
                if first_event_of(phase)(event):
                    fault.armed = True
        assert fault.fired == 1, "the fault was injected inside the model"
    finally:
        fault.remove()
    # Dropped: the turn's tokens; and the K/V, when the failed forward had half-written it.
    assert len(user.conv.token_ids) == length and len(user.turns) == 1
    assert user.conv.kv is None or {layer.get_seq_length() for layer in user.conv.kv.layers} == {user.conv.kv_len}
    assert user.conv.kv_len <= length
    # Later turns and other users: exactly as if nothing had happened.
    run_turn(other, QUESTIONS[1])
    result, _ = run_turn(user, QUESTIONS[1])
    assert user.conv.token_ids == references["receipt.png"][1][0]
    assert result.raw == references["receipt.png"][1][1]
    assert other.conv.token_ids == references["street-scene.png"][1][0]


STOP_POINTS = ["reasoning-start", "reasoning-decode", "steps-parsed", "evidence-start", "evidence-decode",
               "evidence-ready", "synthesis-start", "synthesis-decode", "answer-ready"]


def test_stop_after_the_first_event_of_every_phase(images, references):
    """Each stop, then the same question asked in full, equals the undisturbed turn; the full
    turn is then undone (Regenerate's path), so every stop starts from the same place."""
    engine = make_engine(MODEL)
    session = ChatSession(engine, images["receipt.png"])
    run_turn(session, QUESTIONS[0])
    length = len(session.conv.token_ids)
    expected_tokens, expected_raw = references["receipt.png"][1]
    for point in STOP_POINTS:
        stream = session.ask(QUESTIONS[1])
        for event in stream:
            assert not isinstance(event, TurnFinished), f"{point}: the turn ended before its stop point"
            if first_event_of(point)(event):
                break
        stream.close()                                     # what the UI's Stop does
        assert len(session.conv.token_ids) == length, point
        assert session.conv.kv_len <= length and len(session.turns) == 1, point
        result, _ = run_turn(session, QUESTIONS[1])
        assert session.conv.token_ids == expected_tokens, point
        assert result.raw == expected_raw, point
        session.undo_last_turn()


# ---- the UI's handlers ---------------------------------------------------------------------------

@pytest.fixture
def app():
    from chatbot.app import CorgiApp
    engine = make_engine(MODEL, cache__kv_cache_mb=64)
    return CorgiApp(engine, engine.config)


def request(key: str):
    return SimpleNamespace(session_hash=key)


def run(generator) -> list[tuple]:
    return list(generator)


def upload(name: str) -> dict:
    return {"path": str(REPO / "assets" / name), "orig_name": name}


def ask(app, key: str, question: str) -> list[tuple]:
    return run(app.ask(None, {"text": question, "files": []}, None, None, None, None, None, None, request(key)))


def chat_texts(update: tuple) -> list[str]:
    return [m["content"] if isinstance(m["content"], str) else "" for m in update[1]]


def last_raw(app, key: str) -> dict:
    return app.store.get(key).results[-1].raw


def test_ui_out_of_memory_in_a_turn_is_one_clear_message(app, references):
    run(app.set_image(None, upload("receipt.png"), request("user")))
    run(app.set_image(None, upload("street-scene.png"), request("other")))
    ask(app, "user", QUESTIONS[0])
    ask(app, "other", QUESTIONS[0])
    fault = Fault(app.engine, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    try:
        updates = app.ask(None, {"text": QUESTIONS[1], "files": []}, None, None, None, None, None, None, request("user"))
        seen = []
        for update in updates:
            seen.append(update)
            if len(seen) == 3:       # the turn is under way: the next model step runs out of memory
                fault.armed = True
        assert fault.fired == 1
    finally:
        fault.remove()
    shown = chat_texts(seen[-1])
    assert shown[-1].startswith(OOM_MESSAGE), shown[-1]
    assert "Tried to allocate" not in shown[-1]             # the user gets advice, not allocator output
    user = app.store.get("user")
    assert len(user.results) == 1 and user.live is None and not user.lock.locked()
    assert not app.model_lock.locked()
    # The other user, then this user again: undisturbed results.
    ask(app, "other", QUESTIONS[1])
    assert last_raw(app, "other") == references["street-scene.png"][1][1]
    final = ask(app, "user", QUESTIONS[1])[-1]
    assert last_raw(app, "user") == references["receipt.png"][1][1]
    assert list(final[6]) == ["turn 1", "turn 2"]


def test_ui_model_error_while_encoding_the_image(app, references):
    """The vision tower fails on upload: a clear message, and the next question starts over."""
    fault = Fault(app.engine, RuntimeError("device-side assert triggered (simulated)"), where="vision")
    fault.armed = True
    try:
        updates = run(app.set_image(None, upload("receipt.png"), request("user")))
        assert fault.fired == 1
    finally:
        fault.remove()
    assert chat_texts(updates[-1])[-1] == ("The model failed on this image: RuntimeError: device-side assert "
                                           "triggered (simulated)")
    ask(app, "user", QUESTIONS[0])
    ask(app, "user", QUESTIONS[1])
    assert [r.raw for r in app.store.get("user").results] == [raw for _, raw in references["receipt.png"]]


@pytest.mark.parametrize("point", ["reasoning-decode", "evidence-ready", "synthesis-decode"])
def test_ui_stop_during_a_phase_keeps_the_conversation(app, references, point):
    run(app.set_image(None, upload("receipt.png"), request("user")))
    ask(app, "user", QUESTIONS[0])
    session = app.store.get("user")
    events = []
    original = session.chat.ask

    def spy(*args, **kwargs):           # records the pipeline events behind the UI updates
        for event in original(*args, **kwargs):
            events.append(event)
            yield event
    session.chat.ask = spy
    updates = app.ask(None, {"text": QUESTIONS[1], "files": []}, None, None, None, None, None, None, request("user"))
    for _ in updates:
        if any(first_event_of(point)(e) for e in events):
            break
    updates.close()                     # Gradio closes the generator when Stop cancels the event
    del session.chat.ask
    assert any(first_event_of(point)(e) for e in events)
    # The update Stop cancelled may not have reached the page: nothing counts as shown any more.
    assert session.sent == {}
    stopped = app.stop(None, request("user"))
    assert chat_texts(stopped)[-1] == "Stopped. The conversation goes on from before this question."
    assert len(session.results) == 1 and not session.lock.locked() and not app.model_lock.locked()
    ask(app, "user", QUESTIONS[1])
    assert [r.raw for r in session.results] == [raw for _, raw in references["receipt.png"]]
    assert session.chat.conv.token_ids == references["receipt.png"][1][0]


def test_streamed_updates_rebuild_exactly_with_gradios_own_diff(app):
    """Gradio streams each update as edits against the previous one, and its 6.31 diff
    mis-indexes deletions in nested lists (a failed turn's timings column vanishing from every
    row came out corrupted). No process-wide patch of it: the app keeps its streamed outputs'
    shapes (lists only grow within a run), so Gradio's own diff rebuilds each one exactly,
    through a turn that fails half-way."""
    import copy

    import gradio.utils
    from gradio_client.utils import apply_diff

    assert gradio.utils.diff.__module__ == "gradio.utils"
    run(app.set_image(None, upload("receipt.png"), request("user")))
    ask(app, "user", QUESTIONS[0])
    fault = Fault(app.engine, RuntimeError("simulated failure"))
    seen = []
    try:
        for update in app.ask(None, {"text": QUESTIONS[1], "files": []}, None, None, None, None, None, None,
                              request("user")):
            seen.append(update)
            if len(seen) == 6:
                fault.armed = True
        assert fault.fired == 1
    finally:
        fault.remove()
    assert chat_texts(seen[-1])[-1].startswith("The model failed on this turn: RuntimeError")
    for index in (1, 4, 11):         # chat, timings table, timeline
        values = [u[index] for u in seen if not (isinstance(u[index], dict) and u[index].get("__type__") == "update")]
        assert len(values) >= 2, index
        for old, new in zip(values, values[1:]):
            old, new = json_safe(old), json_safe(new)
            assert apply_diff(copy.deepcopy(old), gradio.utils.diff(old, new)) == new, index
    tables = [u[4] for u in seen if isinstance(u[4], dict) and "headers" in u[4]]
    assert tables[-1]["headers"][-1] == "turn 2 (stopped)" and len(tables[-1]["headers"]) == len(tables[-2]["headers"])


def json_safe(value):
    import json
    return json.loads(json.dumps(value, default=str))


def test_ui_stop_closes_a_turn_that_gradio_left_suspended(app, references):
    """Gradio stores a generator for closing only once its first step has returned; a Stop that
    lands during that step cancels the event and leaves the generator suspended at its first
    update, holding the session. Stop must end that turn itself: "Stopped", nothing pending."""
    run(app.set_image(None, upload("receipt.png"), request("user")))
    ask(app, "user", QUESTIONS[0])
    session = app.store.get("user")
    abandoned = app.ask(None, {"text": QUESTIONS[1], "files": []}, None, None, None, None, None, None,
                        request("user"))
    first = next(abandoned)             # the pending phase: the turn holds the session from here
    assert session.lock.locked() and session.live is not None, chat_texts(first)
    stopped = app.stop(None, request("user"))
    assert chat_texts(stopped)[-1] == "Stopped. The conversation goes on from before this question."
    assert not any(m.get("metadata", {}).get("status") == "pending" for m in stopped[1])
    assert session.live is None and not session.lock.locked() and not app.model_lock.locked()
    assert list(abandoned) == []        # if Gradio ever resumes it, it is over
    ask(app, "user", QUESTIONS[1])
    assert [r.raw for r in session.results] == [raw for _, raw in references["receipt.png"]]
