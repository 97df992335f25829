"""What the web UI adds to a turn: the same turns through a launched server (gradio_client, the
streaming /ask) and through ChatSession in this process, side by side in one run.

    .venv/bin/python -m benchmarks.ui_turn_overhead                  # tiny-qwen2.5-vl, 2 x 3 turns
    .venv/bin/python -m benchmarks.ui_turn_overhead --model tiny-qwen3.5 --repeats 3

Both arms run the UI tests' configuration (tests/server.py: UI_CONFIG) on the same image and
questions with greedy decoding, so they decode the same tokens; one intra-op thread each (the
server is started with OMP_NUM_THREADS=1), one arm at a time. Per turn: the wall time of /ask
(the client's view), the server's own phase total (its trace) and the in-process turn.
served / in-process is what serving costs the model: Gradio's work on the streamed updates runs
in the model's process.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from . import common

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "assets" / "street-scene.png"
QUESTIONS = ["What colour is the car?", "What does the sign say?", "Is there a person?"]
DEBUG_JSON = 5      # the /ask output holding the turns (chatbot/app.py)


def served_turns(url: str) -> list[tuple[float, float]]:
    """(wall s of /ask, the server's phase total s) per question, one conversation."""
    from gradio_client import Client, handle_file
    client = Client(url, verbose=False)
    try:
        client.predict([handle_file(str(IMAGE))], api_name="/set_image")
        rows = []
        for n, question in enumerate(QUESTIONS, 1):
            start = time.perf_counter()
            out = client.predict({"text": question, "files": []}, api_name="/ask")
            wall = time.perf_counter() - start
            rows.append((wall, out[DEBUG_JSON][f"turn {n}"]["timings"]["total"]))
        return rows
    finally:
        client.close()


def in_process_turns(engine, image) -> list[float]:
    from corgi.pipeline import ChatSession
    from corgi.types import TurnFinished
    session = ChatSession(engine, image)
    rows = []
    for question in QUESTIONS:
        start = time.perf_counter()
        events = list(session.ask(question))
        assert isinstance(events[-1], TurnFinished)
        rows.append(time.perf_counter() - start)
    session.close()
    return rows


def main() -> None:
    args = common.ui_args(__doc__, "ui_turn_overhead", "repeats", 2)
    os.environ["OMP_NUM_THREADS"] = "1"          # inherited by the server
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "tests"))
    from server import UI_CONFIG, config_for, serve     # the tests' launcher: a real `python -m chatbot`
    from corgi.config import load_config
    from corgi.engine.engine import Engine
    from corgi.engine.loading import load_model
    from corgi.images import load_image

    folder = Path(tempfile.mkdtemp(prefix="corgi-ui-overhead-"))
    (folder / "app.yaml").write_text(config_for(UI_CONFIG, args.model))
    config = load_config(str(folder / "app.yaml"))
    engine = Engine(load_model(config.model, config.image), config)
    image = load_image(IMAGE, 10**8)
    server = serve(folder / "server", UI_CONFIG, model=args.model)
    rows = []
    try:
        served_turns(server.url)                      # warm-up: first-use costs of both arms
        in_process_turns(engine, image)
        for r in range(args.repeats):
            served = served_turns(server.url)
            local = in_process_turns(engine, image)
            for n, ((wall, total), alone) in enumerate(zip(served, local), 1):
                rows.append({"repeat": r, "turn": n, "served_wall_s": round(wall, 3), "served_phases_s": round(total, 3),
                             "in_process_s": round(alone, 3), "served_over_in_process": round(wall / alone, 2)})
                print(rows[-1], flush=True)
    finally:
        server.stop()
    summary = {k: common.median([row[k] for row in rows]) for k in rows[0] if k not in ("repeat", "turn")}
    print(common.table(rows, list(rows[0])))
    print("median:", summary)
    common.write_json(args.out, {"model": args.model, "config": "tests/server.py UI_CONFIG", "rows": rows,
                                 "median": summary, "environment": common.environment()})


if __name__ == "__main__":
    main()
