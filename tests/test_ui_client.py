"""The web UI through its API, as a client sees it: a real server (subprocess, tiny model, the
shared `ui_server` of conftest.py) driven by gradio_client over the named endpoints /set_image,
/ask, /regenerate, /stop, /new_conversation. Also: every tiny family serves a turn through its own
server, a heavier checkpoint serves one too, and the page config Gradio deep-copies on every page
load reaches no model.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from conftest import HYBRID_MODELS, MOE_MODELS, TINY_MODELS
from server import ASSETS, texts

# Outputs of every endpoint, in order (the session State is not sent to clients); /ask adds the textbox.
(CHAT, BOXES, GALLERY, TIMINGS, DEBUG_TEXT, DEBUG_JSON, TRACE, IMAGES, STEPS, PICKED, TIMELINE, REPORT,
 STOP, REGENERATE) = range(14)
HEAVY_MODEL = "small-qwen2.5-vl"      # many times the tiny twin's weights: what a page load must not copy
# Its turn with the least work that is still a whole turn (one step, one region, a small image).
HEAVY_CONFIG = """\
image: {min_pixels: 3136, max_pixels: 12544}
pipeline: {max_steps: 1, max_regions: 1, reasoning_max_new_tokens: 24, evidence_max_new_tokens: 4,
           synthesis_max_new_tokens: 16, max_thinking_chars: 10}
ui: {max_upload_mb: 0.1, idle_timeout_s: 600}
"""


@pytest.fixture(scope="module")
def server(ui_server):
    return ui_server


@pytest.fixture
def client(server):
    return server.client()     # one Client = one browser session


def titles(chat) -> list[tuple[str, str]]:
    return [(m["metadata"]["title"], m["metadata"]["status"]) for m in chat if m.get("metadata")]


def column(timings, name) -> dict:
    index = timings["headers"].index(name)
    return {row[0]: row[index] for row in timings["data"]}


def set_image(client, name="street-scene.png"):
    from gradio_client import handle_file
    return client.predict([handle_file(str(ASSETS / name))], api_name="/set_image")


def stream_ask(client, question, *settings):
    job = client.submit({"text": question, "files": []}, *settings, api_name="/ask")
    updates = list(job)
    return updates, job.outputs()[-1]


# ---- the main path ------------------------------------------------------------------------

def test_two_turn_conversation_streams_and_reuses_the_cache(client, server):
    out = set_image(client)
    assert any("**street-scene.png**" in t and "encoded and ready" in t for t in texts(out[CHAT]))
    # Encoded once, on upload (or found in the vision cache, which sessions share by content: the
    # server is shared, and another test may have sent this picture first).
    image = column(out[TIMINGS], "image")
    assert image["vision misses"] + image["vision hits"] == 1, image
    assert out[BOXES]                                                    # the side panel shows it

    updates, final = stream_ask(client, "What colour is the car?")
    first = updates[0][CHAT]
    assert first[-2]["content"][0]["text"] == "What colour is the car?"    # question + a pending phase, at once
    assert first[-1]["metadata"]["status"] == "pending"
    # While the reasoning phase is pending its text grows token by token (a step's raw JSON is
    # replaced by its readable line when the step closes, so it may shrink then; then it becomes
    # the step list).
    growing = [len(m["content"][0]["text"]) for u in updates if isinstance(u[CHAT], list) for m in u[CHAT][-1:]
               if m.get("metadata", {}) and m["metadata"]["title"].startswith("Reasoning")
               and m["metadata"]["status"] == "pending"]
    assert len(growing) >= 3 and growing[-1] > growing[0]
    chat = final[CHAT]
    assert [t for t, _ in titles(chat)][0:3] == ["Reasoning: steps and regions", "Evidence: reading the regions",
                                                 "Synthesis: writing the answer"]
    assert all(status == "done" for _, status in titles(chat))
    answer = [m for m in chat if m["role"] == "assistant" and not m.get("metadata")]
    assert answer and answer[-1]["content"][0]["text"].strip()
    turn1 = column(final[TIMINGS], "turn 1")
    assert turn1["vision misses"] == 0 and turn1["vision hits"] == 0      # warm: no image work at all
    assert updates[0][-1]["value"] == {"text": "", "files": []}, "the first update empties the textbox"

    streamed = [out, *updates]
    updates, final = stream_ask(client, "And what about the house?")
    streamed += updates
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
    assert set(trace["turns"][0]) == {"question", "images", "answer", "explanation", "steps", "evidence",
                                      "key_evidence", "plain_answer", "timings", "raw", "cache", "timeline",
                                      "warnings"}
    assert trace["images"] == ["street-scene.png"] and trace["settings"]["max_steps"] >= 1
    # The shareable report: one self-contained HTML file of the conversation.
    report = Path(final[REPORT]["value"]).read_text(encoding="utf-8")
    assert report.startswith("<!DOCTYPE html>") and "And what about the house?" in report
    assert "http://" not in report.split("</style>", 1)[1] and "<script" not in report
    # Regions: one gallery item per piece of evidence of the last turn (the gallery is sent when
    # it changes: never sent means still empty).
    shown = [u[GALLERY] for u in streamed if isinstance(u[GALLERY], list) or u[GALLERY] is None]
    assert len((shown[-1] if shown else []) or []) == len(trace["turns"][1]["evidence"])


def test_the_plain_answer_beside_the_corgi_answer(client):
    """The settings switch: the question is also answered plainly (a branch off the same warm
    prefix), shown beside the CoRGI answer with both times, and kept in the trace."""
    set_image(client, "shapes.png")
    job = client.submit({"text": "How many shapes are there?", "files": []}, plain=True, api_name="/ask")
    list(job)
    final = job.outputs()[-1]
    chat = final[CHAT]
    assert [t for t, _ in titles(chat)][0] == "Plain answer (no grounding, for comparison)"
    answer = [m for m in chat if m["role"] == "assistant" and not m.get("metadata")][-1]["content"][0]["text"]
    assert "| CoRGI (grounded), " in answer and "| Plain answer, " in answer and " s |" in answer
    trace = json.loads(Path(final[TRACE]["value"]).read_text(encoding="utf-8"))
    turn = trace["turns"][-1]
    assert isinstance(turn["plain_answer"], str) and "plain" in turn["timings"] and trace["settings"]["plain_answer"]
    assert turn["cache"]["vision_misses"] == 0          # nothing re-encoded for the extra answer
    assert {"plain", "reasoning"} <= {span["phase"] for span in turn["timeline"] if span["part"] == "prefill"}


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
    # Only the note that the image is still loaded, no turn.
    assert len(texts(fresh[CHAT])) == 1 and "receipt.png" in texts(fresh[CHAT])[0] and not fresh[DEBUG_JSON]
    assert "still loaded" in texts(fresh[CHAT])[0]
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
    out = client.predict([handle_file(str(not_image))], api_name="/set_image")
    assert any("This file cannot be used" in t and "notes.png" in t for t in texts(out[CHAT]))

    big = tmp_path / "noise.png"
    big.write_bytes(os.urandom(9 * 1024 * 1024))     # 9 MB, limit 8 MB (size is checked first)
    out = client.predict([handle_file(str(big))], api_name="/set_image")
    assert any("the limit is 8 MB" in t for t in texts(out[CHAT]))

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
    from chatbot.sessions import ShownImage, UserSession
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
    session.set_images([ShownImage("x.png", Image.new("RGB", (32, 32)), "d")])
    session.chat = BrokenChat()
    with session.lock:
        updates = list(app._turn(session, "q", Config().pipeline))
    chat = updates[-1][1]
    assert chat[-1]["content"] == "The model failed on this turn: RuntimeError: CUDA out of memory"
    assert session.live is None and session.results == [] and not session.lock.locked()


def quick_session():
    """An app without a model and a session with an image whose turns start and end at once."""
    from chatbot.sessions import ShownImage, UserSession
    from corgi.types import Phase, PhaseStarted

    class QuickChat:
        def ask(self, question, settings):
            yield PhaseStarted(Phase.REASONING, "p")

        def close(self):
            pass

    session = UserSession("k")
    session.set_images([ShownImage("x.png", Image.new("RGB", (32, 32)), "d")])
    session.chat = QuickChat()
    return fake_app(), session


def test_a_stop_that_cancels_a_queued_question_says_so_once():
    """Stop can cancel a question still waiting in the model queue: its turn never runs, so Stop
    itself puts the question back in the chat with a note (not a silent disappearance)."""
    from chatbot.app import STOPPED_QUEUED
    app, session = quick_session()
    echoed, _ = app.echo([], {"text": "Is it red?", "files": []}, session)
    assert len(echoed) == 2 and echoed[0]["content"] == "Is it red?"    # the question, "waiting"
    chat = app.stop(session, None)[1]                     # the queued /ask was cancelled
    assert [m["content"] for m in chat[-2:]] == ["Is it red?", STOPPED_QUEUED]
    assert app.stop(session, None)[1] == chat             # said once

    # A question whose turn ran: a later Stop (nothing left to stop) adds nothing.
    app.echo(chat, {"text": "Is it blue?", "files": []}, session)
    list(app.ask(session, {"text": "Is it blue?", "files": []}, *[None] * 5))
    after = app.stop(session, None)[1]
    assert STOPPED_QUEUED not in [m["content"] for m in after[len(chat):]]
    assert not session.lock.locked()


def test_a_question_typed_while_the_tab_asks_is_held_in_the_box_and_the_chat_says_so():
    """Gradio sends no second ask of a tab while its first is queued or running, so the echo
    must not show that question as waiting: it stays in the box (not emptied when the first
    turn starts) and the chat says so once the first turn ends."""
    import gradio as gr
    from chatbot.app import HELD_QUESTION
    app, session = quick_session()
    chat, _ = app.echo([], {"text": "Is it red?", "files": []}, session)      # its ask is queued
    held, _ = app.echo(chat, {"text": "Is it <b>blue</b>?", "files": []}, session)
    assert held == chat and session.echoed == 1                               # not echoed, not counted
    updates = list(app.ask(session, {"text": "Is it red?", "files": []}, *[None] * 5))
    assert all(update[-1] == gr.skip() for update in updates)                 # the box keeps it
    note = HELD_QUESTION.format(what="“Is it &lt;b&gt;blue&lt;/b&gt;?”")          # text, not markup
    assert updates[-1][1][-1]["content"] == note
    assert len(app.echo(updates[-1][1], {"text": "Is it blue?", "files": []}, session)[0]) == \
        len(updates[-1][1]) + 2                                               # asked again: echoed
    list(app.ask(session, {"text": "Is it blue?", "files": []}, *[None] * 5))
    assert [m["content"] for m in app.stop(session, None)[1]].count(note) == 1


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


# ---- page loads never copy the model ---------------------------------------------------------------

def model_objects() -> tuple[type, ...]:
    """What must never be reachable from the page config: the model and everything holding it."""
    import torch

    from chatbot.app import CorgiApp
    from chatbot.sessions import SessionStore, UserSession
    from corgi.engine.engine import Engine
    from corgi.engine.loading import LoadedModel
    from corgi.pipeline import ChatSession
    return (torch.Tensor, torch.nn.Module, Engine, LoadedModel, ChatSession, CorgiApp, SessionStore, UserSession)


def reachable(root, forbidden: tuple[type, ...]) -> list[str]:
    """Paths from `root` to objects of the forbidden types, through containers, attributes,
    bound methods (their owner), closures, default arguments and partials: stricter than
    deepcopy, which copies a function as itself. Weak references and modules are not followed."""
    import functools
    import types
    import weakref
    found, seen, stack = [], set(), [(root, "config")]
    while stack:
        obj, path = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), type,
                                               types.ModuleType, weakref.ref)):
            continue
        seen.add(id(obj))
        if isinstance(obj, forbidden):
            found.append(f"{path}: {type(obj).__name__}")
            continue
        if isinstance(obj, dict):
            children = [(v, f"{path}[{k!r}]") for k, v in obj.items()] + [(k, f"{path} key") for k in obj]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        elif isinstance(obj, types.MethodType):
            children = [(obj.__self__, f"{path}.__self__"), (obj.__func__, f"{path}.__func__")]
        elif isinstance(obj, types.FunctionType):
            children = [(cell.cell_contents, f"{path}.<{name}>")
                        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ())]
            children += [(obj.__defaults__, f"{path}.__defaults__"), (obj.__kwdefaults__, f"{path}.__kwdefaults__")]
        elif isinstance(obj, functools.partial):
            children = [(obj.func, f"{path}.func"), (obj.args, f"{path}.args"), (obj.keywords, f"{path}.keywords")]
        else:
            children = [(v, f"{path}.{k}") for k, v in (getattr(obj, "__dict__", None) or {}).items()]
            children += [(getattr(obj, s), f"{path}.{s}") for s in getattr(type(obj), "__slots__", ())
                         if isinstance(s, str) and hasattr(obj, s)]
        stack.extend(children)
    return found


def test_the_page_config_gradio_copies_per_page_load_reaches_no_model():
    """Gradio deep-copies the page config on every GET / and GET /config (routes.py:
    utils.safe_deepcopy(blocks.config)), and the State blocks' config (delete_callback included)
    for deep links. Built on a real engine, that copy must succeed in one go (safe_deepcopy
    otherwise retries piece by piece, copying whatever it reached each time) and copy no tensor,
    no model, no engine, no session."""
    import gradio as gr

    from chatbot.app import CorgiApp
    from conftest import fast_config, make_engine
    model = TINY_MODELS[0]
    app = CorgiApp(make_engine(model), fast_config(model))
    demo = app.build()
    app.store.get("a-tab")           # a live session in the store: the callback must not reach it either
    states = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    assert states
    configs = {"Blocks.config": demo.config, "Blocks.get_config_file()": demo.get_config_file()}
    configs.update({f"State {s._id} config": demo.default_config.config_for_block(s._id, [], s) for s in states})
    forbidden = model_objects()
    for name, config in configs.items():
        memo: dict = {}
        copy.deepcopy(config, memo)           # raises if anything in it cannot be copied
        copied = sorted({type(v).__name__ for v in memo.values() if isinstance(v, forbidden)})
        assert not copied, f"copying {name} copies {copied}"
        assert not reachable(config, forbidden), (name, reachable(config, forbidden)[:5])
    for state in states:                      # the callbacks themselves, and the initial values
        assert not reachable([state.delete_callback, state.value], forbidden)


def test_idle_expiry_does_not_keep_the_app_alive():
    """The State's callback holds the session store weakly: it frees sessions while the app
    lives and does nothing (no error) after."""
    import gc

    from chatbot.app import idle_expiry
    from chatbot.sessions import SessionStore
    store = SessionStore(4)
    expire = idle_expiry(store)
    session = store.get("idle")
    expire(session)
    assert session.closed and len(store) == 0
    orphan = store.get("later")
    del store
    gc.collect()
    expire(orphan)
    assert orphan.closed


def test_an_image_sent_again_is_not_rewritten_while_it_downloads(tmp_path, monkeypatch):
    """Gradio 6.31 rewrote a content-named image file in place on every postprocess of a PIL
    image, so a browser fetching the boxes image while a turn streamed got a cut-off file. The
    app hands Gradio files it wrote once: an existing one is kept as it is, new ones are written
    under a temporary name and renamed into place (and Gradio itself copies paths atomically)."""
    from chatbot.display_files import save_jpeg
    image = Image.new("RGB", (40, 30), "red")
    first = save_jpeg(image, tmp_path, "boxes")
    with open(first, "rb") as download:                  # a browser, half-way through the file
        head = download.read(16)

        def written(*args, **kwargs):
            raise AssertionError("the image was written again")
        monkeypatch.setattr(os, "fdopen", written)
        again = save_jpeg(image, tmp_path, "boxes")
        monkeypatch.undo()
        assert again == first
        assert head + download.read() == Path(first).read_bytes()
    other = save_jpeg(Image.new("RGB", (40, 30), "blue"), tmp_path, "boxes")
    assert other != first and Image.open(other).getpixel((0, 0))[2] > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(first).name, Path(other).name])   # no staging file


def test_a_skipped_output_is_rebuilt_by_this_gradio():
    """The fact chatbot/app.py's adaptive text-update spacing rests on: in Gradio 6.31 gr.skip()
    is an empty property update, and Gradio answers it by building the component anew (with its
    page config) in the session state, so a streamed update costs about as much for an unchanged
    panel as for a changed one. Should Gradio one day pass a skip through untouched, this fails:
    then the spacing can go back to a fixed THROTTLE_S."""
    import asyncio
    import gradio as gr
    from gradio.state_holder import SessionState
    with gr.Blocks() as demo:
        panel = gr.Markdown("unchanged")
        gr.Button("go").click(lambda: gr.skip(), None, panel)
    state = SessionState(demo)
    out = asyncio.run(demo.postprocess_data(demo.fns[0], gr.skip(), state))
    assert out == [{"__type__": "update"}]
    assert state[panel._id] is not panel and isinstance(state[panel._id], gr.Markdown)    # rebuilt


# ---- every family, and a heavier checkpoint, through a launched server ------------------------------

def one_turn(server, question="What colour is the car?") -> tuple:
    """set_image + one /ask through gradio_client; the final outputs of both."""
    client = server.client()
    try:
        loaded = set_image(client)
        _, final = stream_ask(client, question)
    finally:
        client.close()
    return loaded, final


def check_served_turn(server, model: str) -> None:
    page = httpx.get(server.url + "/", timeout=60)
    assert page.status_code == 200 and f"Model: `{model}`" in page.text
    config = httpx.get(server.url + "/config", timeout=60)
    assert config.status_code == 200 and config.json()["components"]
    loaded, final = one_turn(server)
    assert any("encoded and ready" in t for t in texts(loaded[CHAT])), texts(loaded[CHAT])[-1:]
    assert list(final[DEBUG_JSON]) == ["turn 1"], texts(final[CHAT])[-2:]
    assert all(status == "done" for _, status in titles(final[CHAT]))
    answer = [m for m in final[CHAT] if m["role"] == "assistant" and not m.get("metadata")]
    assert answer and answer[-1]["content"][0]["text"].strip()
    trace = json.loads(Path(final[TRACE]["value"]).read_text(encoding="utf-8"))
    assert trace["model"]["id"] == model
    assert server.alive()
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


@pytest.mark.parametrize("model", TINY_MODELS + HYBRID_MODELS + MOE_MODELS)
def test_every_family_serves_a_turn(model, launch, tmp_path):
    """Each tiny twin: the UI served (the shared ui_server's family through the launched
    `python -m chatbot`, the others by Gradio's server in this process, on the model the run
    already loaded), the page and its config, one turn through gradio_client."""
    if model == "tiny-qwen2.5-vl":
        check_served_turn(launch(model=model), model)
        return
    from conftest import loaded_model
    from corgi.config import load_config
    from corgi.engine.engine import Engine
    from server import UI_CONFIG, InProcessServer, config_for
    path = tmp_path / "app.yaml"
    path.write_text(config_for(UI_CONFIG, model))
    config = load_config(str(path))
    server = InProcessServer(Engine(loaded_model(model), config), config)
    try:
        check_served_turn(server, model)
    finally:
        server.stop()


def test_a_heavier_checkpoint_launches_and_serves_page_loads_and_a_turn(launch):
    """A heavier checkpoint: with a callback that dragged the engine into the page config, every
    page load copied the weights (and Gradio's 3 s start-up check of the page could fail)."""
    server = launch(HEAVY_CONFIG, model=HEAVY_MODEL, shared=False)
    try:
        for _ in range(3):                     # page loads, as browsers (and reloads) make them
            for path in ("/", "/config"):
                assert httpx.get(server.url + path, timeout=120).status_code == 200, path
        check_served_turn(server, HEAVY_MODEL)
        assert "shareable link must be created" not in server.log_text()
    finally:
        server.stop()
