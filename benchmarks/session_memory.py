"""Does the app keep memory per finished session? (issue 13 item 10: RSS crept ~2 MB a session
over 70 API sessions of a served app.)

    .venv/bin/python -m benchmarks.session_memory --sessions 40

In this process, on the tiny twin: CorgiApp's own handlers, session after session: upload, one
turn, tab closed (demo.unload's handler). RSS after gc.collect() + malloc_trim(0) (so freed
blocks go back to the OS) every 10 sessions, against the RSS after 5 warm-up sessions. This
isolates the app (sessions, ChatSession, KV cache, traces, pictures) from Gradio's HTTP layer.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=40)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_engine
    from chatbot.app import CorgiApp
    libc = ctypes.CDLL("libc.so.6")
    engine = make_engine("tiny-qwen2.5-vl")
    app = CorgiApp(engine, engine.config)
    upload = [{"path": str(REPO / "assets" / "street-scene.png"), "orig_name": "street-scene.png"}]

    def session(k: int) -> None:
        request = SimpleNamespace(session_hash=f"session-{k}")
        list(app.set_image(None, upload, request))
        list(app.ask(None, {"text": "What colour is the car?", "files": []}, None, None, None, None, None, None,
                     request))
        app.unload(request)

    for k in range(5):
        session(k)
    gc.collect()
    libc.malloc_trim(0)
    base = rss_mib()
    print(f"after 5 warm-up sessions: {base:.1f} MiB")
    for k in range(5, 5 + args.sessions):
        session(k)
        if (k - 4) % 10 == 0:
            gc.collect()
            libc.malloc_trim(0)
            print(f"after {k - 4:3d} more sessions: {rss_mib() - base:+.1f} MiB, live sessions {len(app.store)}",
                  flush=True)


if __name__ == "__main__":
    main()
