"""Limits per client and what a closed session leaves behind, against Gradio's real server
(the launcher's `launch`: Guard middleware, fair queue, launch settings) with gradio_client.

No model is needed (the app is built on a stand-in engine): the handlers used here
(/new_conversation, /ask without an image) never reach it. A second client address on this machine: a relay that
connects to the server from 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from server import free_port


class Relay:
    """Forwards connections on its own port to 127.0.0.1:`port`, connecting from `source`."""

    def __init__(self, port: int, source: str):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.target, self.source = self.listener.getsockname()[1], port, source
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target), source_address=(self.source, 0))
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    files = tmp_path_factory.mktemp("files")
    mp.setenv("GRADIO_TEMP_DIR", str(files))
    mp.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")      # a closed client is noticed at once
    from chatbot.__main__ import launch
    from chatbot.app import CorgiApp
    from corgi.config import from_dict
    config = from_dict({"ui": {"host": "127.0.0.1", "port": free_port(), "max_sessions_per_client": 2,
                               "max_queued_turns_per_client": 2}})
    engine = SimpleNamespace(lm=SimpleNamespace(model_id="fake", family=SimpleNamespace(name="f"),
                                                dtype="torch.float32", device="cpu"))
    corgi = CorgiApp(engine, config)
    demo = corgi.build()
    launch(demo, config, str(files), quiet=True)
    relay = Relay(config.ui.port, "127.0.0.2")
    yield SimpleNamespace(corgi=corgi, demo=demo, url=f"http://127.0.0.1:{config.ui.port}",
                          other=f"http://127.0.0.1:{relay.port}")
    relay.close()
    demo.close()
    mp.undo()


ASK = ({"text": "What?", "files": []}, 3, 3, 64, 8, 64, False)     # /ask: question, sliders, plain


def close_all(served, clients):
    """Close the clients and wait until the app has freed their sessions (demo.unload)."""
    for c in clients:
        c.close()
    assert wait_for(lambda: not any(c.session_hash in served.corgi.store._sessions for c in clients))


def client(url):
    from gradio_client import Client
    return Client(url, verbose=False)


def wait_for(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_closed_sessions_leave_no_records_in_gradio_or_the_app(served):
    """Gradio keeps a closed session's SessionState (Blocks config copy, the gr.State value) until
    its capacity overflows, and its queue event ids forever; the unload handler drops them."""
    demo = served.demo
    holder, queue = demo.server_app.state_holder, demo._queue
    clients = [client(served.url) for _ in range(3)]
    for c in clients:
        c.predict(api_name="/new_conversation")
    hashes = [c.session_hash for c in clients]
    assert all(h in holder.session_data and h in queue.pending_event_ids_session for h in hashes)
    for c in clients:
        c.close()

    def gone():
        return not any(h in holder.session_data or h in queue.pending_event_ids_session
                       or h in queue.pending_messages_per_session or h in served.corgi.store._sessions
                       for h in hashes)
    assert wait_for(gone), ([h in holder.session_data for h in hashes],
                            [h in queue.pending_event_ids_session for h in hashes])


def test_one_client_cannot_hold_every_session_but_another_is_served(served):
    from chatbot.sessions import CLIENT_FULL, ShownTurn
    store = served.corgi.store
    first = [client(served.url) for _ in range(3)]
    for c in first:
        c.predict(api_name="/new_conversation")
    mine = [h for h, s in store._sessions.items() if s.client == "127.0.0.1"]
    assert len(mine) == 2 and first[0].session_hash not in mine      # its own oldest cheap one went
    for h in mine:
        store._sessions[h].turns.append(ShownTurn("q", 0, None))    # both hold a conversation now
    late = client(served.url)
    chat = late.predict(*ASK, api_name="/ask")[0]
    assert CLIENT_FULL.format(n=2) in str(chat[-1]["content"])
    assert late.session_hash not in store._sessions and all(h in store._sessions for h in mine)
    other = client(served.other)                                       # another address: served
    other.predict(api_name="/new_conversation")
    assert other.session_hash in store._sessions and store._sessions[other.session_hash].client == "127.0.0.2"
    close_all(served, (*first, late, other))


def test_one_client_cannot_fill_the_model_queue_but_another_is_served(served):
    from chatbot.limits import QUEUE_FULL
    store = served.corgi.store
    a, b = client(served.url), client(served.other)
    a.predict(api_name="/new_conversation")
    blocked = store._sessions[a.session_hash]
    blocked.lock.acquire()              # a's first turn holds the model queue until released
    try:
        running = a.submit(*ASK, api_name="/ask")
        assert wait_for(lambda: any(served.demo._queue.active_jobs))
        waiting = a.submit(*ASK, api_name="/ask")
        assert wait_for(lambda: len(served.demo._queue.event_queue_per_concurrency_id["model"].queue) == 1)
        with pytest.raises(Exception, match="429"):                 # a third one: over the limit
            a.predict(*ASK, api_name="/ask")
        fn = next(i for i, f in served.demo.fns.items() if f.api_name == "ask")     # what it was told
        told = httpx.post(f"{served.url}/gradio_api/queue/join",
                          json={"data": [None, *ASK], "fn_index": fn, "session_hash": a.session_hash})
        assert told.status_code == 429 and told.json()["detail"] == QUEUE_FULL.format(n=2)
        # The chat's echo of that question asks the same: nothing shown as waiting, nothing
        # counted (a later Stop must not bring it back as a cancelled queued question).
        echoed = blocked.echoed
        here = SimpleNamespace(client=SimpleNamespace(host="127.0.0.1"))
        assert served.corgi.echo([], {"text": "Is it red?", "files": []}, blocked, here)[0] == []
        assert blocked.echoed == echoed
        elsewhere = SimpleNamespace(client=SimpleNamespace(host="127.0.0.2"))
        assert len(served.corgi.echo([], {"text": "Is it red?", "files": []}, None, elsewhere)[0]) == 2
        queued = b.submit(*ASK, api_name="/ask")                    # another client still gets in
        assert wait_for(lambda: len(served.demo._queue.event_queue_per_concurrency_id["model"].queue) == 2)
    finally:
        blocked.lock.release()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda job: job.result(timeout=30), (running, waiting, queued)))
    assert all("no image yet" in str(r[0]) for r in results)
    close_all(served, (a, b))


def test_uploads_per_session_stop_at_the_cap_and_the_extra_file_is_deleted(served, tmp_path, monkeypatch):
    from PIL import Image

    from chatbot.app import CorgiApp
    from corgi.config import from_dict
    from corgi.images import ImageError
    files = tmp_path / "files"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(files))
    corgi = CorgiApp(served.corgi.engine, from_dict({"ui": {"session_upload_mb": 1}}))
    session = corgi.store.get("s", "10.0.0.1")

    def upload(name, side):
        path = files / name / "photo.png"
        path.parent.mkdir(parents=True)
        Image.frombytes("RGB", (side, side), os.urandom(3 * side * side)).save(path)   # incompressible
        return path
    first = upload("a", 450)                                                # ~0.6 MB
    corgi._read_image(session, str(first), "a.png")
    assert 300_000 < session.upload_bytes == first.stat().st_size
    second = upload("b", 450)                                               # would pass 1 MB
    with pytest.raises(ImageError, match="1 MB one conversation may upload"):
        corgi._read_image(session, str(second), "b.png")
    assert not second.exists() and first.exists()
    assert session.upload_bytes == first.stat().st_size
    other = corgi.store.get("t", "10.0.0.1")                                # its own allowance
    corgi._read_image(other, str(upload("c", 450)), "c.png")


def test_the_per_client_settings_refuse_negative_values_with_one_line():
    from corgi.config import ConfigError, from_dict
    defaults = from_dict({}).ui
    assert (defaults.max_sessions_per_client, defaults.max_queued_turns_per_client, defaults.session_upload_mb) == \
        (16, 8, 256.0)
    assert from_dict({"ui": {"max_sessions_per_client": 0}}).ui.max_sessions_per_client == 0     # off
    for key in ("max_sessions_per_client", "max_queued_turns_per_client", "session_upload_mb"):
        with pytest.raises(ConfigError, match=f"ui.{key} must be 0 \\(no limit\\) or positive"):
            from_dict({"ui": {key: -1}})
