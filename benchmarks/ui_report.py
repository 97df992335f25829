"""What rewriting the HTML report after every turn costs the UI, with each turn's section kept
(chatbot/report.py `sections`, what the UI does) and rendered from scratch, side by side.

    .venv/bin/python -m benchmarks.ui_report                   # tiny-qwen2.5-vl, 12 turns, a 2048x1536 photo

The UI writes the report in the turn's last step, before its final update reaches the browser,
so this is time the user waits for the Download buttons and the end of the turn. The turns
are real twin turns (ChatSession, the UI tests' settings) on a photo-like picture (the street
scene scaled up, with noise, so its JPEGs cost what a photo's do); the model runs before the
timing, the report alone is timed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import common

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What colour is the car?", "What does the sign say?", "Is there a person?", "Is it day?"]


def photo(size=(2048, 1536)):
    import numpy as np
    from PIL import Image
    base = np.asarray(Image.open(REPO / "assets" / "street-scene.png").convert("RGB").resize(size), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-24, 25, base.shape, dtype=np.int16)
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))


def main() -> None:
    args = common.ui_args(__doc__, "ui_report", "turns", 12)
    sys.path.insert(0, str(REPO / "tests"))
    from server import UI_CONFIG, config_for      # the UI tests' settings
    from chatbot.report import report_html
    from corgi.config import load_config
    from corgi.engine.engine import Engine
    from corgi.engine.loading import load_model
    from corgi.pipeline import ChatSession
    from corgi.types import TurnFinished

    folder = Path(common.OUT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ui_report.yaml").write_text(config_for(UI_CONFIG, args.model))
    config = load_config(str(folder / "ui_report.yaml"))
    engine = Engine(load_model(config.model, config.image), config)
    image = photo()
    session = ChatSession(engine, image)
    model = {"id": args.model, "twin": True}
    settings = {"crop_padding": config.pipeline.crop_padding}
    results, sections, rows = [], {}, []
    for n in range(1, args.turns + 1):
        events = list(session.ask(QUESTIONS[(n - 1) % len(QUESTIONS)]))
        assert isinstance(events[-1], TurnFinished)
        results.append(events[-1].result)
        start = time.perf_counter()
        kept = report_html(model, settings, [("photo.png", image)], results, sections)
        kept_s = time.perf_counter() - start
        start = time.perf_counter()
        fresh = report_html(model, settings, [("photo.png", image)], results)
        fresh_s = time.perf_counter() - start
        assert kept == fresh
        rows.append({"turn": n, "kept_sections_s": round(kept_s, 3), "from_scratch_s": round(fresh_s, 3),
                     "from_scratch_over_kept": round(fresh_s / kept_s, 2), "report_mb": round(len(kept) / 2**20, 2)})
        print(rows[-1], flush=True)
    session.close()
    print(common.table(rows, list(rows[0])))
    common.write_json(args.out, {"model": args.model, "image": list(image.size), "rows": rows,
                                 "environment": common.environment()})


if __name__ == "__main__":
    main()
