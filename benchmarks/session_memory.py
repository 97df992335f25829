"""Does the server keep memory per finished session? (issue 13: RSS crept ~2 MB a session over
70 API sessions of a served app.)

    .venv/bin/python -m benchmarks.session_memory --sessions 40            # the app alone
    .venv/bin/python -m benchmarks.session_memory --server --sessions 60   # the whole server

The app alone: in this process, on the tiny twin, CorgiApp's own handlers, session after
session: upload, one turn, tab closed (demo.unload's handler). This isolates the app (sessions,
ChatSession, KV cache, traces, pictures) from Gradio's HTTP layer.

--server: the launcher's server (chatbot.__main__.launch: the same Blocks, launch settings,
Guard middleware and fair queue) on a free 127.0.0.1 port in this process, and gradio_client
sessions against it from a child process (so the clients' own memory is not counted): each
one uploads, asks one turn and closes (its heartbeat ends: Gradio runs demo.unload). After
every batch: RSS after gc.collect() + malloc_trim(0), the per-session records Gradio and the
app hold (`records`), and the tracemalloc allocations that grew since the warm-up, grouped by
traceback, largest first.

Both report RSS against the RSS after the warm-up sessions.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "assets" / "street-scene.png"
QUESTION = "What colour is the car?"


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settle() -> float:
    """RSS in MiB once garbage is collected and freed blocks are handed back to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mib()


def records(demo) -> dict[str, int]:
    """How many per-session (or per-event) records Gradio and the app hold right now. Each
    should stay bounded (or return to zero) however many sessions have come and gone."""
    from chatbot.sessions import UserSession
    app = demo.server_app
    holder, queue = app.state_holder, demo._queue
    return {
        "gradio sessions (state_holder)": len(holder.session_data),
        "gr.State values held": sum(len(s.state_data) for s in holder.session_data.values()),
        "UserSession objects alive": sum(type(o) is UserSession for o in gc.get_objects()),
        "app sessions (SessionStore)": len(demo.corgi.store),
        "queue message queues": len(queue.pending_messages_per_session),
        "queue event ids by session": len(queue.pending_event_ids_session),
        "queue events by id": len(queue.event_ids_to_events),
        "event analytics": len(queue.event_analytics),
        "iterators": len(app.iterators),
        "diff streams": len(demo.pending_diff_streams),
        # Python's own heap: if these stay flat while RSS grows, the growth is native (torch,
        # Pillow, the allocator's fragmentation), not Python objects anyone holds.
        "python blocks": sys.getallocatedblocks(),
        "gc objects": len(gc.get_objects()),
    }


# ---- the app alone -----------------------------------------------------------------------------

def app_alone(sessions: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_engine
    from chatbot.app import CorgiApp
    engine = make_engine("tiny-qwen2.5-vl")
    app = CorgiApp(engine, engine.config)
    upload = [{"path": str(IMAGE), "orig_name": IMAGE.name}]

    def session(k: int) -> None:
        request = SimpleNamespace(session_hash=f"session-{k}")
        list(app.set_image(None, upload, request))
        list(app.ask(None, {"text": QUESTION, "files": []}, None, None, None, None, None, None, request))
        app.unload(request)

    for k in range(5):
        session(k)
    base = settle()
    print(f"after 5 warm-up sessions: {base:.1f} MiB")
    for k in range(5, 5 + sessions):
        session(k)
        if (k - 4) % 10 == 0:
            print(f"after {k - 4:3d} more sessions: {settle() - base:+.1f} MiB, live sessions {len(app.store)}",
                  flush=True)


# ---- the whole server ------------------------------------------------------------------------------

def drive(url: str, count: int) -> None:
    """(The child process.) `count` sessions, one after the other: upload, one turn, close."""
    from gradio_client import Client, handle_file
    for _ in range(count):
        client = Client(url, verbose=False)
        client.predict([handle_file(str(IMAGE))], api_name="/set_image")
        chat = client.predict({"text": QUESTION, "files": []}, api_name="/ask")[0]     # the chat (the gr.State is not sent)
        assert chat, "no answer"
        client.close()


def whole_server(sessions: int, batch: int, warmup: int, top: int, trace: bool, arenas: bool) -> None:
    import time

    from chatbot.__main__ import limit_malloc_arenas, private_gradio_folder
    if arenas:
        limit_malloc_arenas()                # as the launcher does
    files = private_gradio_folder()          # before gradio is imported, as the launcher does
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_engine
    from server import free_port

    from chatbot.__main__ import launch
    from chatbot.app import CorgiApp
    engine = make_engine("tiny-qwen2.5-vl", ui__port=free_port())
    corgi = CorgiApp(engine, engine.config)
    demo = corgi.build()
    demo.corgi = corgi
    launch(demo, engine.config, files, quiet=True)
    url = f"http://127.0.0.1:{engine.config.ui.port}"

    def run(count: int) -> None:
        subprocess.run([sys.executable, "-m", "benchmarks.session_memory", "--drive", url, "--sessions", str(count)],
                       cwd=REPO, check=True)
        # Gradio runs the unload handler in a background task once the heartbeat has ended.
        deadline = time.monotonic() + 10
        while len(corgi.store) and time.monotonic() < deadline:
            time.sleep(0.1)

    run(warmup)
    base = settle()
    # Started after the warm-up: what it holds at the end was allocated since and is still alive.
    # It slows the turns down several times over, hence optional.
    if trace:
        tracemalloc.start(8)
        snapshot = tracemalloc.take_snapshot()
    print(f"after {warmup} warm-up sessions: {base:.1f} MiB; {records(demo)}", flush=True)
    done = 0
    while done < sessions:
        run(min(batch, sessions - done))
        done += min(batch, sessions - done)
        print(f"after {done:3d} more sessions: RSS {settle() - base:+.1f} MiB; {records(demo)}", flush=True)
    # What Gradio's records of the closed sessions cost: drop them all, measure again.
    from chatbot.sessions import forget_gradio_session
    for key in list(demo.server_app.state_holder.session_data):
        forget_gradio_session(demo, key)
    print(f"without Gradio's records of the closed sessions: RSS {settle() - base:+.1f} MiB; {records(demo)}")
    if not trace:
        demo.close()
        return
    later = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    grown = [s for s in later.compare_to(snapshot, "traceback") if s.size_diff > 0][:top]
    total = sum(s.size_diff for s in later.compare_to(snapshot, "filename"))
    print(f"\ntracemalloc, all Python allocations: {total / 2**20:+.2f} MiB over {done} sessions; "
          f"largest growth by traceback:")
    for stat in grown:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback if "site-packages" in f.filename
                  or str(REPO) in f.filename][-5:]
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+6d} blocks  {' < '.join(reversed(frames))}")
    demo.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--server", action="store_true", help="measure the whole server (HTTP, Gradio, app)")
    parser.add_argument("--batch", type=int, default=20, help="--server: sessions between two measurements")
    parser.add_argument("--warmup", type=int, default=10, help="--server: sessions before the baseline")
    parser.add_argument("--trace", action="store_true", help="--server: tracemalloc growth by traceback (slow)")
    parser.add_argument("--default-arenas", action="store_true",
                        help="--server: glibc's default malloc arenas, not the launcher's cap")
    parser.add_argument("--top", type=int, default=12, help="--server: tracebacks to show")
    parser.add_argument("--drive", metavar="URL", help=argparse.SUPPRESS)      # the client process
    args = parser.parse_args(argv)
    if args.drive:
        drive(args.drive, args.sessions)
    elif args.server:
        whole_server(args.sessions, args.batch, args.warmup, args.top, args.trace, not args.default_arenas)
    else:
        app_alone(args.sessions)


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
