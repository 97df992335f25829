"""The web UI through its API, as a client sees it: a real server (subprocess, tiny model) driven
by gradio_client over the named endpoints /set_image, /ask, /regenerate, /stop, /new_conversation.

Also home to `start_server`, which the browser test reuses.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"

# Small budgets keep a turn under a second or two on a CPU; the grammar bounds the rest.
TEST_CONFIG = """\
model: {id: tiny-qwen2.5-vl}
image: {min_pixels: 3136, max_pixels: 50176}
pipeline: {max_steps: 3, max_regions: 3, reasoning_max_new_tokens: 96, evidence_max_new_tokens: 8,
           synthesis_max_new_tokens: 64, max_thinking_chars: 40}
ui: {max_upload_mb: 0.1, idle_timeout_s: 600}
"""

# Outputs of every endpoint, in order (the session State is not sent to clients); /ask adds the textbox.
CHAT, BOXES, GALLERY, TIMINGS, DEBUG_TEXT, DEBUG_JSON, TRACE = range(7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, timeout: float = 120.0):
    """Run `python -m chatbot` on a free port; return (url, process) once it answers HTTP."""
    config = folder / "ui-test.yaml"
    config.write_text(TEST_CONFIG)
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    env.setdefault("CORGI_CACHE", str(REPO / ".cache" / "corgi"))
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "chatbot", "--config", str(config), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    # "Running on local URL" is printed before the server answers: poll until it does.
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{(folder / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as response:
                if response.status == 200:
                    return url, proc
        except OSError:
            time.sleep(0.25)
    stop_server(proc)
    raise AssertionError(f"the server did not answer within {timeout} s:\n{(folder / 'server.log').read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, proc = start_server(tmp_path_factory.mktemp("ui-client"))
    yield url
    stop_server(proc)


@pytest.fixture
def client(server):
    from gradio_client import Client
    return Client(server, verbose=False)     # one Client = one browser session


def texts(chat) -> list[str]:
    return [part.get("text", "") for m in chat for part in m["content"]]


def titles(chat) -> list[tuple[str, str]]:
    return [(m["metadata"]["title"], m["metadata"]["status"]) for m in chat if m.get("metadata")]


def column(timings, name) -> dict:
    index = timings["headers"].index(name)
    return {row[0]: row[index] for row in timings["data"]}


def set_image(client, name="street-scene.png"):
    from gradio_client import handle_file
    return client.predict(handle_file(str(ASSETS / name)), api_name="/set_image")


def stream_ask(client, question, *settings):
    job = client.submit({"text": question, "files": []}, *settings, api_name="/ask")
    updates = list(job)
    return updates, job.outputs()[-1]


# ---- the main path ------------------------------------------------------------------------

def test_two_turn_conversation_streams_and_reuses_the_cache(client, server):
    out = set_image(client)
    assert any("**street-scene.png**" in t and "encoded and ready" in t for t in texts(out[CHAT]))
    assert column(out[TIMINGS], "image")["vision misses"] == 1          # encoded once, on upload
    assert out[BOXES]                                                    # the side panel shows it

    updates, final = stream_ask(client, "What colour is the car?")
    first = updates[0][CHAT]
    assert first[-2]["content"][0]["text"] == "What colour is the car?"    # question + a pending phase, at once
    assert first[-1]["metadata"]["status"] == "pending"
    # While the reasoning phase is pending its text grows token by token (then becomes the step list).
    growing = [len(m["content"][0]["text"]) for u in updates for m in u[CHAT][-1:]
               if m.get("metadata", {}) and m["metadata"]["title"].startswith("Reasoning")
               and m["metadata"]["status"] == "pending"]
    assert len(growing) >= 3 and growing == sorted(growing) and growing[-1] > growing[0]
    chat = final[CHAT]
    assert [t for t, _ in titles(chat)][0:3] == ["Reasoning: steps and regions", "Evidence: reading the regions",
                                                 "Synthesis: writing the answer"]
    assert all(status == "done" for _, status in titles(chat))
    answer = [m for m in chat if m["role"] == "assistant" and not m.get("metadata")]
    assert answer and answer[-1]["content"][0]["text"].strip()
    turn1 = column(final[TIMINGS], "turn 1")
    assert turn1["vision misses"] == 0 and turn1["vision hits"] == 0      # warm: no image work at all
    assert updates[0][-1]["value"] == {"text": "", "files": []}, "the first update empties the textbox"

    updates, final = stream_ask(client, "And what about the house?")
    assert len(updates) >= 3
    assert "And what about the house?" in texts(final[CHAT])
    turn2 = column(final[TIMINGS], "turn 2")
    assert turn2["vision misses"] == 0 and turn2["prefix reused"] > 0
    assert turn2["prefix reused"] > turn1["prefix reused"]              # turn 1 is part of the prefix now

    # Debugging: prompts, raw output and parsed result per turn; the trace is the CLI's --json.
    debug = final[DEBUG_JSON]
    assert list(debug) == ["turn 1", "turn 2"]
    assert "What colour is the car?" in debug["turn 1"]["prompts"]["reasoning"]
    assert "==== synthesis output ====" in final[DEBUG_TEXT]
    # gradio_client has downloaded the served file to a local copy (the server keeps its files
    # in a private folder of its own, so the local path is not a server path).
    trace_path = final[TRACE]["value"]
    trace = json.loads(Path(trace_path).read_text(encoding="utf-8"))
    assert trace["model"] == {"id": "tiny-qwen2.5-vl", "family": "qwen2.5-vl", "dtype": "float32", "device": "cpu"}
    assert [t["question"] for t in trace["turns"]] == ["What colour is the car?", "And what about the house?"]
    assert trace["turns"][1]["cache"]["vision_misses"] == 0
    assert set(trace["turns"][0]) == {"question", "answer", "explanation", "steps", "evidence", "key_evidence",
                                      "timings", "raw", "cache", "warnings"}
    # Regions: one gallery item per piece of evidence of the last turn.
    assert len(final[GALLERY] or []) == len(trace["turns"][1]["evidence"])


def test_stop_then_ask_again_and_new_conversation(client):
    set_image(client, "receipt.png")
    question = "What is the total?"
    job = client.submit({"text": question, "files": []}, api_name="/ask")
    for _ in job:          # the first update is the pending phase: stop right there
        job.cancel()
        break
    stopped = client.predict(api_name="/stop")
    assert "Stopped. The conversation goes on from before this question." in texts(stopped[CHAT])
    assert any(title.endswith("(interrupted)") for title, _ in titles(stopped[CHAT]))
    assert not stopped[DEBUG_JSON], "a stopped turn is not a finished turn"

    _, after_stop = stream_ask(client, question)
    assert list(after_stop[DEBUG_JSON]) == ["turn 1"]
    # New conversation drops the turns; the same question on a fresh conversation must give the
    # same turn, token for token: the stopped turn left nothing behind in the conversation.
    fresh = client.predict(api_name="/new_conversation")
    assert texts(fresh[CHAT]) == [] and not fresh[DEBUG_JSON]
    _, again = stream_ask(client, question)
    before, now = after_stop[DEBUG_JSON]["turn 1"], again[DEBUG_JSON]["turn 1"]
    assert now["raw"] == before["raw"] and now["answer"] == before["answer"]
    assert now["cache"]["prompt_tokens"] == before["cache"]["prompt_tokens"]

    regenerated = client.predict(api_name="/regenerate")
    assert list(regenerated[DEBUG_JSON]) == ["turn 1"]
    assert texts(regenerated[CHAT]).count(question) == 1


# ---- bad input ------------------------------------------------------------------------------

def test_bad_input_is_answered_in_the_chat(client, tmp_path):
    from gradio_client import handle_file
    out = client.predict({"text": "What is this?", "files": []}, api_name="/ask")
    assert any("There is no image yet" in t for t in texts(out[CHAT]))

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture")
    out = client.predict(handle_file(str(not_image)), api_name="/set_image")
    assert any("This file cannot be used" in t and "notes.png" in t for t in texts(out[CHAT]))

    big = tmp_path / "noise.png"
    Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(big)   # ~200 kB, limit 0.1 MB
    out = client.predict(handle_file(str(big)), api_name="/set_image")
    assert any("the limit is 0.1 MB" in t for t in texts(out[CHAT]))

    set_image(client)
    out = client.predict({"text": "   ", "files": []}, api_name="/ask")
    assert texts(out[CHAT])[-1] == "Please type a question about the image."

    # The session still works after all that, and an image attached to the message is used.
    out = client.predict({"text": "How many shapes are there?", "files": [handle_file(str(ASSETS / "shapes.png"))]},
                         api_name="/ask")
    assert any("**shapes.png**" in t and "encoded and ready" in t for t in texts(out[CHAT]))
    assert list(out[DEBUG_JSON]) == ["turn 1"]


def test_a_model_failure_is_shown_and_the_session_stays_usable():
    """In-process, with a chat whose model raises: the turn ends with a clear message."""
    from chatbot.app import CorgiApp
    from chatbot.sessions import UserSession
    from corgi.config import Config
    from corgi.types import Phase, PhaseStarted

    class BrokenChat:
        def ask(self, question, settings):
            yield PhaseStarted(Phase.REASONING, "p")
            raise RuntimeError("CUDA out of memory")

        def close(self):
            pass

    engine = SimpleNamespace(lm=SimpleNamespace(model_id="fake", family=SimpleNamespace(name="f"),
                                                dtype="torch.float32", device="cpu"))
    app = CorgiApp(engine, Config())
    session = UserSession("k")
    session.image, session.chat = Image.new("RGB", (32, 32)), BrokenChat()
    with session.lock:
        updates = list(app._turn(session, "q", Config().pipeline))
    chat = updates[-1][1]
    assert chat[-1]["content"] == "The model failed on this turn: RuntimeError: CUDA out of memory"
    assert session.live is None and session.results == [] and not session.lock.locked()


def fake_app():
    from chatbot.app import CorgiApp
    from corgi.config import Config
    engine = SimpleNamespace(lm=SimpleNamespace(model_id="fake", family=SimpleNamespace(name="f"),
                                                dtype="torch.float32", device="cpu"))
    return CorgiApp(engine, Config())


def test_wiring_one_model_queue_stop_cancels_and_idle_sessions_expire():
    import gradio as gr
    app = fake_app()
    demo = app.build()
    fns = {f.api_name: f for f in demo.fns.values()}
    for name in ("set_image", "ask", "regenerate"):           # everything that runs the model
        assert (fns[name].concurrency_id, fns[name].concurrency_limit) == ("model", 1), name
        assert fns[name].show_progress == "full", "the queue position must stay visible"
    assert fns["set_image"].preprocess is False
    # Stop and New conversation: a cancel of the running turn first, *then* their function (the
    # browser runs a listener's cancels only after its function, which waits for the turn to end).
    turn_ids = {i for i, f in demo.fns.items() if f.api_name in ("ask", "regenerate")}
    for name in ("stop", "new_conversation"):
        first = demo.fns[fns[name].trigger_after]
        assert first.fn is None and not fns[name].cancels, name
        (cancel,) = [f for f in demo.fns.values() if f.is_cancel_function and f.targets == first.targets]
        assert set(cancel.cancels) == turn_ids, name
    (state,) = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    assert state.time_to_live == app.config.ui.idle_timeout_s and state.delete_callback == app.expire
    assert any(t == (None, "unload") for f in demo.fns.values() for t in f.targets)


def test_tab_close_and_idle_time_out_free_the_session():
    app = fake_app()
    chats = []
    for key in ("tab", "idle"):
        session = app.store.get(key)
        session.chat = SimpleNamespace(close=lambda key=key: chats.append(key))
    app.unload(SimpleNamespace(session_hash="tab"))
    assert chats == ["tab"] and len(app.store) == 1
    app.expire(app.store.get("idle"))
    assert chats == ["tab", "idle"] and len(app.store) == 0
    app.expire(None)                                          # a State that never held a session


def test_pipeline_settings_validate_and_copy():
    from chatbot.app import pipeline_settings
    from corgi.config import PipelineConfig
    from corgi.pipeline import InputError
    base = PipelineConfig()
    new = pipeline_settings(base, (2, 3, 64.0, 8, None))
    assert (new.max_steps, new.max_regions, new.reasoning_max_new_tokens, new.evidence_max_new_tokens) == (2, 3, 64, 8)
    assert new.synthesis_max_new_tokens == base.synthesis_max_new_tokens and base.max_steps == 6
    with pytest.raises(InputError, match="between 1 and 20"):
        pipeline_settings(base, (0, 3, 64, 8, 32))
    with pytest.raises(InputError, match="whole number"):
        pipeline_settings(base, ("many", 3, 64, 8, 32))
