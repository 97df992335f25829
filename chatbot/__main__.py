"""python -m chatbot [--config FILE] [--model ID_OR_PATH] [--host H] [--port N]

Loads the model once (logging each step, since a real checkpoint takes a while), then serves
the UI, by default on http://127.0.0.1:7860. Bad configuration or model: one line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("chatbot")
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chatbot", description="CoRGI Chat web UI")
    parser.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    parser.add_argument("--model", help="model id: tiny-qwen2.5-vl, tiny-qwen3-vl, a hub id or a local folder")
    parser.add_argument("--host", help="address to serve on (default: ui.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to serve on (default: ui.port, 7860)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)    # one line per internal HTTP call otherwise
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no phoning home from offline hosts

    from corgi.config import ConfigError, load_config
    overrides = {"model.id": args.model, "ui.host": args.host, "ui.port": args.port}
    try:
        config = load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT

    from corgi.engine.engine import Engine
    from corgi.engine.loading import ModelLoadError
    m = config.model
    log.info("loading model %s (device %s, dtype %s); a real checkpoint can take a minute ...",
             m.id, m.device, m.dtype)
    t0 = time.perf_counter()
    try:
        engine = Engine.load(config)
    except ModelLoadError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    lm = engine.lm
    log.info("model loaded in %.1f s: %s (%s) on %s as %s", time.perf_counter() - t0, lm.model_id,
             lm.family.name, lm.device, str(lm.dtype).removeprefix("torch."))

    log.info("building the UI ...")
    from .app import CSS, build_app
    demo = build_app(engine, config)
    ui = config.ui
    try:
        demo.launch(server_name=ui.host, server_port=ui.port, prevent_thread_lock=True,
                    # The handler answers uploads over ui.max_upload_mb in the chat; Gradio's own
                    # limit only keeps absurd files off the disk.
                    max_file_size=int(ui.max_upload_mb * 2 * 1024 * 1024),
                    state_session_capacity=max(ui.max_sessions * 4, 100), footer_links=["api"], css=CSS)
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", ui.host, ui.port, exc)
        return EXIT_BAD_INPUT
    log.info("CoRGI Chat is ready: http://%s:%d (Ctrl+C stops it)", ui.host, ui.port)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
