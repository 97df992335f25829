"""Many users at once, through gradio_client against a launched app (hardening, part 2).

Three sessions, each on its own image, ask two questions each, all at the same time. Proves:
  * no cross-talk: every session's turns (the raw model output of every phase, the parsed
    steps, evidence and answer) equal those of the same session run alone on the same server;
  * the queue serves everyone: every turn of every session finishes;
  * cache memory stays within the configured budgets while they run (sampled through the
    read-only /stats endpoint), although the sessions together need more than the KV budget:
    conversations are evicted and rebuilt, and the answers still do not change;
  * memory returns when the sessions end: New conversation frees a session's KV, and closing a
    client (a closed tab: Gradio's heartbeat ends, demo.unload runs) frees the rest.

The server is launched by conftest.py's `launch` fixture (tests/server.py), like every server test's.
"""
from __future__ import annotations

import threading
import time

import pytest

from server import ASSETS, REPO, texts

HOSTILE = REPO / "tests" / "hostile"

# Small token budgets (a turn takes a fraction of a second on a CPU) and caches too small for
# three conversations: each one's KV cache holds ~0.5 MB after its two turns (~1.5 MB in all),
# and one of them ~1.1 MB after a third turn (the budget must still hold that one alone).
LOAD_CONFIG = """\
model: {id: tiny-qwen2.5-vl}
image: {min_pixels: 3136, max_pixels: 50176}
pipeline: {max_steps: 2, max_regions: 2, reasoning_max_new_tokens: 64, evidence_max_new_tokens: 6,
           synthesis_max_new_tokens: 48, max_thinking_chars: 30}
cache: {kv_cache_mb: 1.25, vision_cache_mb: 0.1}
ui: {max_upload_mb: 0.1, idle_timeout_s: 600}
"""

# Outputs of the turn endpoints (see chatbot/app.py).
CHAT, DEBUG_JSON = 0, 5


def turn_record(debug_json: dict, n: int) -> dict:
    """What must not depend on who else is using the server: the question, the model's raw
    output of every phase, the parsed answer and steps."""
    turn = debug_json[f"turn {n}"]
    return {k: turn[k] for k in ("question", "raw", "answer", "explanation", "steps", "evidence")}


# Each session: its own image and two questions.
SESSIONS = [
    ("street-scene.png", ["What colour is the car?", "What does the sign say?"]),
    ("receipt.png", ["What is the total?", "Which shop is it?"]),
    ("hostile/cmyk.jpg", ["What is on the right?", "Is there text?"]),
]


def image_path(name: str) -> str:
    if name.startswith("hostile/"):
        return str(HOSTILE / "images" / name.removeprefix("hostile/"))
    return str(ASSETS / name)


@pytest.fixture(scope="module")
def server(launch):
    # A short heartbeat, so a closed client counts as a closed tab within a second. Its own
    # server: the memory figures must be this test's alone.
    server = launch(LOAD_CONFIG, env={"GRADIO_HEARTBEAT_INTERVAL": "0.5"}, shared=False)
    yield server
    server.stop()


def client_for(server):
    return server.client()     # one Client = one browser session


def run_session(client, image: str, questions: list[str]) -> list[dict]:
    from gradio_client import handle_file
    out = client.predict([handle_file(image_path(image))], api_name="/set_image")
    assert any("encoded and ready" in t for t in texts(out[CHAT])), texts(out[CHAT])
    records = []
    for n, question in enumerate(questions, 1):
        out = client.predict({"text": question, "files": []}, api_name="/ask")
        assert list(out[DEBUG_JSON]) == [f"turn {i}" for i in range(1, n + 1)], texts(out[CHAT])[-3:]
        records.append(turn_record(out[DEBUG_JSON], n))
    return records


def stats(client) -> dict:
    return client.predict(api_name="/stats")


def wait_for(condition, what: str, timeout: float = 60.0):
    """Poll until condition() is truthy (a generous deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def test_concurrent_sessions_equal_their_solo_runs_within_the_memory_budget(server):
    monitor = client_for(server)
    budget = stats(monitor)
    assert budget["kv_budget_bytes"] == int(1.25 * 1024 * 1024) and budget["vision_budget_bytes"] == int(0.1 * 1024 * 1024)

    # Solo: each session alone on the server, then New conversation frees its KV cache.
    solo, solo_kv = {}, {}
    for image, questions in SESSIONS:
        client = client_for(server)
        solo[image] = run_session(client, image, questions)
        solo_kv[image] = stats(monitor)["kv_bytes"]     # this conversation is the only one
        fresh = client.predict(api_name="/new_conversation")
        assert not fresh[DEBUG_JSON]
        client.close()
    assert stats(monitor)["kv_bytes"] == 0, "New conversation frees the session's KV cache"
    # The sessions really differ (so equal results below are not equal by accident).
    assert len({str(records) for records in solo.values()}) == len(SESSIONS)
    # Together they need more KV than the budget allows: someone will be evicted.
    assert sum(solo_kv.values()) > budget["kv_budget_bytes"], solo_kv

    # Together: all sessions start at once; a sampler reads the memory figures meanwhile.
    clients = [client_for(server) for _ in SESSIONS]
    results, errors, samples = {}, [], []
    start, done = threading.Barrier(len(SESSIONS)), threading.Event()

    def user(client, image, questions):
        try:
            start.wait()
            results[image] = run_session(client, image, questions)
        except BaseException as exc:       # reported below, with the session it came from
            errors.append((image, repr(exc)))

    def sampler():
        while not done.is_set():
            samples.append(stats(monitor))
            time.sleep(0.25)      # often enough to see every turn; more would load the 2-core machine

    threads = [threading.Thread(target=user, args=(c, image, questions))
               for c, (image, questions) in zip(clients, SESSIONS)]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    done.set()
    watcher.join(timeout=60)
    assert not errors, errors
    assert server.alive()

    # Everyone was served, and every session got exactly its solo answers, turn for turn.
    assert set(results) == set(solo)
    for image, _ in SESSIONS:
        assert results[image] == solo[image], f"session on {image} differs from its solo run"

    # Within budget at every sample (and at the end, with every conversation still open).
    assert len(samples) >= 5
    assert max(s["kv_bytes"] for s in samples) <= budget["kv_budget_bytes"]
    assert max(s["vision_bytes"] for s in samples) <= budget["vision_budget_bytes"]
    assert max(s["sessions"] for s in samples) >= len(SESSIONS)
    assert max(s["kv_bytes"] for s in samples) > 0

    # Memory returns: one session starts a New conversation, the others close their tab.
    # (A follow-up first, so its KV cache is surely resident, not evicted for the others.)
    out = clients[0].predict({"text": "Anything else?", "files": []}, api_name="/ask")
    assert list(out[DEBUG_JSON]) == ["turn 1", "turn 2", "turn 3"]
    before = stats(monitor)["kv_bytes"]
    assert 0 < before <= budget["kv_budget_bytes"]
    fresh = clients[0].predict(api_name="/new_conversation")
    assert not fresh[DEBUG_JSON]
    assert stats(monitor)["kv_bytes"] < before
    for client in clients[1:]:
        client.close()
    after = wait_for(lambda: (lambda s: s if s["kv_bytes"] == 0 and s["sessions"] <= 1 else None)(stats(monitor)),
                     "the closed sessions to free their KV cache")
    assert after["vision_bytes"] <= budget["vision_budget_bytes"]   # shared by content, bounded
    clients[0].close()
    monitor.close()
    assert server.alive()
