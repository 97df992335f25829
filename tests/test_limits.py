"""Limits between clients and on the server's own resources (hardening, round two: issue 13).

Unit-level where the logic is ours (chatbot/limits.py, chatbot/sessions.py), in process on the
real tiny model where the app's handlers are involved; the launched-server checks (login
lock-out, session routes behind the login, API inputs) live with the login server in
test_safe_defaults.py.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from conftest import make_engine

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
MODEL = "tiny-qwen2.5-vl"


# ---- failed logins ----------------------------------------------------------------------------

def test_failed_logins_lock_an_address_out_for_longer_each_time():
    from chatbot.limits import LoginLimiter
    now = [1000.0]
    limiter = LoginLimiter(free=3, cap_s=60, clock=lambda: now[0])
    for _ in range(3):
        limiter.failed("10.0.0.1")
        assert limiter.wait_s("10.0.0.1") == 0            # a few typos are free
    waits = []
    for _ in range(8):
        limiter.failed("10.0.0.1")
        waits.append(limiter.wait_s("10.0.0.1"))
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]            # doubling, capped
    assert limiter.wait_s("10.0.0.2") == 0                  # other addresses are not affected
    now[0] += 61
    assert limiter.wait_s("10.0.0.1") == 0
    limiter.succeeded("10.0.0.1")
    limiter.failed("10.0.0.1")
    assert limiter.wait_s("10.0.0.1") == 0                  # a login resets the count


# ---- the middleware, on a stand-in ASGI app ---------------------------------------------------------

def _guarded(tmp_path, quota_bytes, auth=None):
    """Guard around a small Starlette app that answers like Gradio's routes it sees."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from chatbot.limits import Guard, LoginLimiter

    async def login(request):
        form = await request.form()
        ok = form.get("password") == "right"
        return JSONResponse({"success": ok}, status_code=200 if ok else 400)

    async def anything(request):
        return JSONResponse({"reached": request.url.path})
    inner = Starlette(routes=[Route("/login", login, methods=["POST"]),
                              Route("/{path:path}", anything, methods=["GET", "POST"])])
    inner.auth, inner.tokens, inner.cookie_id = auth, {"tok": "user"}, "c1"
    limiter = LoginLimiter(free=2)

    async def app(scope, receive, send):        # what Starlette does for Gradio's App: scope["app"]
        scope["app"] = inner
        await guard(scope, receive, send)
    guard = Guard(inner, files=str(tmp_path), quota_bytes=quota_bytes, limiter=limiter)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_guard_login_session_routes_and_upload_quota(tmp_path):
    async def scenario():
        async with _guarded(tmp_path, quota_bytes=10_000, auth=("user", "right")) as client:
            # Session routes Gradio leaves open: the login is required.
            for path in ("/gradio_api/heartbeat/abc", "/gradio_api/cancel"):
                method = client.get if "heartbeat" in path else client.post
                assert (await method(path)).status_code == 401, path
                reached = await method(path, cookies={"access-token-c1": "tok"})
                assert reached.status_code == 200 and reached.json()["reached"] == path
            # Logins: two typos free, then 429 without asking the app (the right password too).
            codes = [(await client.post("/login", data={"username": "u", "password": "wrong"})).status_code
                     for _ in range(3)]
            assert codes == [400, 400, 400]
            locked = await client.post("/login", data={"username": "u", "password": "right"})
            assert locked.status_code == 429 and "try again in" in locked.json()["detail"]
            assert int(locked.headers["retry-after"]) >= 1
            # Upload quota over the whole file folder.
            (tmp_path / "held").write_bytes(b"x" * 8000)
            small = await client.post("/gradio_api/upload", content=b"y" * 1000)
            assert small.status_code == 200
            big = await client.post("/gradio_api/upload", content=b"y" * 3000)
            assert big.status_code == 413 and "as many uploaded files" in big.json()["detail"]
        async with _guarded(tmp_path, quota_bytes=10_000) as client:     # no login: routes stay open
            assert (await client.get("/gradio_api/heartbeat/abc")).status_code == 200
    asyncio.run(scenario())


# ---- API inputs -----------------------------------------------------------------------------------

def fake_app():
    from chatbot.app import CorgiApp
    from corgi.config import Config
    engine = SimpleNamespace(lm=SimpleNamespace(model_id="fake", family=SimpleNamespace(name="f"),
                                                dtype="torch.float32", device="cpu"))
    return CorgiApp(engine, Config())


@pytest.fixture(scope="module")
def demo():
    return fake_app().build()


def test_api_inputs_are_checked_before_gradio_processes_them(demo, tmp_path):
    from chatbot.limits import check_call
    gradio_app = SimpleNamespace(get_blocks=lambda: demo)
    fn = {f.api_name: i for i, f in demo.fns.items()}
    uploaded = tmp_path / "abc" / "photo.png"
    uploaded.parent.mkdir()
    Image.new("RGB", (8, 8)).save(uploaded)

    def problem(api, data):
        return check_call(gradio_app, "/gradio_api/queue/join", {"data": data, "fn_index": fn[api]}, str(tmp_path))

    message = {"text": "What?", "files": []}
    assert problem("ask", [None, message, 3, 3, 64, 8, 64]) is None
    assert problem("ask", [None, message, None, 3, 64, 8, 64]) == \
        "Max reasoning steps must be a number from 1 to 20, not None"
    assert "not 'x'" in problem("ask", [None, message, "x", 3, 64, 8, 64])
    assert "not 9999" in problem("regenerate", [None, 3, 3, 9999, 8, 64])
    image = {"path": str(uploaded), "meta": {"_type": "gradio.FileData"}}
    assert problem("set_image", [None, [image]]) is None
    assert problem("set_image", [None, None]) is None                      # nothing came with it
    for path in ("/etc/passwd", str(ASSETS / "shapes.png"), f"{tmp_path}/../etc/passwd", "http://127.0.0.1:1/x.png"):
        assert "is not a file uploaded to this server" in problem("set_image", [None, [{**image, "path": path}]]), path
        attached = {"text": "What?", "files": [{**image, "path": path}]}
        assert "is not a file uploaded to this server" in problem("ask", [None, attached, 3, 3, 64, 8, 64])
    assert "is not a file uploaded" in problem("set_image", [None, [{"url": "http://10.0.0.1/x.png", "path": None}]])
    assert "is not valid input for /set_image" in problem("set_image", [None, "/etc/passwd"])
    notes = tmp_path / "abc" / "notes.txt"
    notes.write_text("hello")
    attached = {"text": "What?", "files": [{**image, "path": str(notes)}]}
    assert "only images can be uploaded or attached" in problem("ask", [None, attached, 3, 3, 64, 8, 64])
    assert "only images can be uploaded or attached" in problem("set_image", [None, [{**image, "path": str(notes)}]])


# ---- the model queue --------------------------------------------------------------------------------

def test_one_session_cannot_make_another_wait_behind_all_its_turns(demo):
    from gradio.queueing import EventQueue

    from chatbot.limits import FairQueue, share_model_queue
    queue = FairQueue()
    for n in range(6):
        queue.append(SimpleNamespace(session_hash="A", n=n))
    queue.append(SimpleNamespace(session_hash="B", n=0))
    queue.append(SimpleNamespace(session_hash="C", n=0))
    queue.append(SimpleNamespace(session_hash="B", n=1))
    assert [(e.session_hash, e.n) for e in queue] == [("A", 0), ("B", 0), ("C", 0), ("A", 1), ("B", 1),
                                                      ("A", 2), ("A", 3), ("A", 4), ("A", 5)]
    queue.remove(queue[0])                                   # Gradio takes the first to run
    queue.append(SimpleNamespace(session_hash="A", n=6))
    assert [(e.session_hash, e.n) for e in queue][-1] == ("A", 6)
    # Installed on the app's real queue, for the model's concurrency group.
    assert share_model_queue(demo)
    events = demo._queue.event_queue_per_concurrency_id["model"]
    assert isinstance(events, EventQueue) and isinstance(events.queue, FairQueue)
    assert events.concurrency_limit == 1


# ---- the session store ---------------------------------------------------------------------------

def test_sessions_with_a_conversation_are_never_pushed_out():
    from chatbot.sessions import SessionStore, ShownTurn
    store = SessionStore(3)
    victim = store.get("victim")
    victim.turns.append(ShownTurn("q", 0, None))             # has asked a question
    for n in range(40):                                      # a client opening cheap sessions
        store.get(f"cheap-{n}")
    assert store.get("victim") is victim and not victim.closed
    assert len(store) == 3
    busy = store.get("busy")
    busy.lock.acquire()                                      # a turn (or warm-up) under way
    other = store.get("other")
    other.turns.append(ShownTurn("q", 0, None))
    refused = store.get("late")                              # every session holds work now
    assert refused.refused and "late" not in store._sessions and len(store) == 3
    assert not victim.closed and not busy.closed and not other.closed
    busy.lock.release()
    store.close("other")                                     # one ends: the next one gets in
    assert not store.get("late").refused


# ---- the app: uploads, memory, disk ------------------------------------------------------------------

@pytest.fixture
def app(tmp_path, monkeypatch):
    from chatbot.app import CorgiApp
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "files"))
    (tmp_path / "files").mkdir()
    # A turn with the least work that is still a whole turn.
    engine = make_engine(MODEL, cache__kv_cache_mb=64, pipeline__reasoning_max_new_tokens=40,
                         pipeline__synthesis_max_new_tokens=24, pipeline__evidence_max_new_tokens=4,
                         pipeline__max_regions=1, pipeline__max_steps=1)
    return CorgiApp(engine, engine.config)


def req(key):
    return SimpleNamespace(session_hash=key)


def chat_texts(update) -> list[str]:
    return [m["content"] if isinstance(m["content"], str) else "" for m in update[1]]


def uploaded(tmp_path, name, data: bytes) -> dict:
    path = tmp_path / "files" / "0123abcd" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"path": str(path), "orig_name": name}


def test_refused_uploads_are_deleted_and_only_uploads_are_opened(app, tmp_path):
    from chatbot.limits import SERVER_FULL
    bad = uploaded(tmp_path, "photo.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    shown = chat_texts(list(app.set_image(None, bad, req("u")))[-1])[-1]
    assert "not an image format that can be read" in shown and str(tmp_path) not in shown
    assert not Path(bad["path"]).exists() and not Path(bad["path"]).parent.exists()
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (16, 16)).save(outside)
    shown = chat_texts(list(app.set_image(None, {"path": str(outside), "orig_name": "x.png"}, req("u")))[-1])[-1]
    assert "was not uploaded to this server" in shown
    assert outside.exists()                                  # never deleted: not ours
    good = uploaded(tmp_path, "shapes.png", (ASSETS / "shapes.png").read_bytes())
    assert "encoded and ready" in chat_texts(list(app.set_image(None, good, req("u")))[-1])[-1]
    assert Path(good["path"]).exists()                       # kept: the browser shows it
    from chatbot.sessions import ShownTurn
    app.store.max_sessions = 1                               # full, and "u" has a conversation now
    app.store.get("u").turns.append(ShownTurn("What is it?", 0, None))
    shown = chat_texts(list(app.set_image(None, good, req("late")))[-1])[-1]
    assert SERVER_FULL in shown and not app.store.get("u").closed


def test_a_huge_png_in_six_sessions_keeps_a_bounded_image_each(app, tmp_path):
    """Issue 13's 6300x6300 1-bit PNG (a few KB), uploaded in 6 sessions: each keeps an image of
    at most image.max_kept_pixels, not 6300x6300."""
    path = tmp_path / "huge.png"
    Image.new("1", (6300, 6300), 1).save(path, optimize=True)
    data = path.read_bytes()
    assert len(data) < 20_000
    kept = app.config.image.max_kept_pixels
    for n in range(6):
        shown = chat_texts(list(app.set_image(None, uploaded(tmp_path, f"huge{n}.png", data), req(f"s{n}")))[-1])
        assert "encoded and ready" in shown[-1], shown[-1]
    images = [app.store.get(f"s{n}").image for n in range(6)]
    assert all(i.width * i.height <= kept and i.width == i.height for i in images)
    assert sum(len(i.tobytes()) for i in images) <= 6 * 3 * kept     # vs 6 x 119 MB before
    assert app.store.image_bytes() <= 6 * 4 * kept                    # what /stats reports


def test_a_full_disk_costs_one_message_not_the_turn_or_the_app(app, tmp_path):
    """Everything the app writes during a turn (the pictures for the browser, the trace and the
    report at its end, in _turn's finally) fails as on a full disk (a real OSError from the file
    system): the turn still ends, with one warning and no exception out of the handler; the
    pictures come back once there is room."""
    from chatbot.render import BOXES
    good = uploaded(tmp_path, "shapes.png", (ASSETS / "shapes.png").read_bytes())
    list(app.set_image(None, good, req("u")))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    files, app._files = app._files, SimpleNamespace(name=str(blocker))      # every write fails now
    updates = list(app.ask(None, {"text": "How many shapes?", "files": []}, None, None, None, None, None, request=req("u")))
    session = app.store.get("u")
    assert len(session.results) == 1, chat_texts(updates[-1])[-3:]
    assert session.trace_path is None and not session.lock.locked()
    assert list(updates[-1][6]) == ["turn 1"]
    assert session.disk_warned == 1 and BOXES not in session.sent
    app._files = files                                                      # room again
    assert isinstance(app.outputs(session)[2], str)                         # the boxes picture is back
