"""Shared fixtures: the real tiny models (built offline, cached), with small token budgets
so the whole suite stays fast on a 2-core CPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("CORGI_CACHE", str(ROOT / ".cache" / "corgi"))

TINY_MODELS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")     # K/V per layer
HYBRID_MODELS = ("tiny-qwen3.5",)                                      # Gated DeltaNet + attention
MOE_MODELS = ("tiny-qwen3-vl-moe", "tiny-qwen3.5-moe")                 # expert MLPs (eager decode)
ALL_TWINS = TINY_MODELS + HYBRID_MODELS + MOE_MODELS

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one intra-op thread each, or their matmuls fight for the cores;
    # the same for the CLI and server processes the tests start (they inherit the environment).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)

# Budgets small enough for speed, large enough that every phase produces real structure.
FAST = {
    "image.max_pixels": 128 * 28 * 28,
    "pipeline.reasoning_max_new_tokens": 140,
    "pipeline.synthesis_max_new_tokens": 90,
    "pipeline.evidence_max_new_tokens": 10,
    "pipeline.max_thinking_chars": 60,
    "pipeline.max_steps": 3,
    "pipeline.max_regions": 3,
}


def fast_config(model: str, **overrides):
    from corgi.config import load_config
    values = dict(FAST, **{"model.id": model})
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, values)


_loaded = {}


def loaded_model(model: str):
    """One LoadedModel per tiny family for the whole run (engines on top are cheap)."""
    if model not in _loaded:
        from corgi.engine.loading import load_model
        cfg = fast_config(model)
        _loaded[model] = load_model(cfg.model, cfg.image)
    return _loaded[model]


def make_engine(model: str, **overrides):
    from corgi.engine.engine import Engine
    return Engine(loaded_model(model), fast_config(model, **overrides))


@pytest.fixture(scope="session")
def street_image():
    from corgi.images import load_image
    return load_image(ROOT / "assets" / "street-scene.png", 10**8)


@pytest.fixture(scope="session")
def receipt_image():
    from corgi.images import load_image
    return load_image(ROOT / "assets" / "receipt.png", 10**8)


def run_turn(session, question, settings=None):
    """Drain one turn; return (TurnResult, events)."""
    from corgi.types import TurnFinished
    events = list(session.ask(question, settings))
    assert isinstance(events[-1], TurnFinished)
    return events[-1].result, events


# ---- launched servers (python -m chatbot; see tests/server.py) ------------------------------------

@pytest.fixture(scope="session")
def launch(tmp_path_factory):
    """launch(config_text=UI_CONFIG, *, model=None, env=None, args=(), shared=True) -> Server.

    A running `python -m chatbot` with that config (model.id replaced by `model` when given),
    extra environment and arguments. shared=True: one server per (config, model, env, args) for
    the whole run, reused by every test that asks for the same (a server some test stopped is
    started anew). shared=False: a server of the caller's own, to stop (or kill) as it likes.
    Every server still running is stopped at the end of the run."""
    from server import UI_CONFIG, config_for, serve
    servers: dict[tuple, object] = {}
    started: list = []

    def start(config_text: str = UI_CONFIG, *, model: str | None = None, env: dict | None = None,
              args: tuple = (), shared: bool = True):
        key = (config_for(config_text, model), tuple(sorted((env or {}).items())), tuple(args))
        if shared and key in servers and servers[key].alive():
            return servers[key]
        name = (model or "server").replace("/", "_")
        server = serve(tmp_path_factory.mktemp(name), config_text, model=model, env=env, args=tuple(args))
        started.append(server)
        if shared:
            servers[key] = server
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def ui_server(launch):
    """The UI tests' server: tests/server.py's UI_CONFIG on tiny-qwen2.5-vl, shared by the
    gradio_client tests, the browser test and the per-family tests."""
    return launch()
