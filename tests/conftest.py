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

# ---- how run_tests.sh's workers share the files (-n 2 --dist loadfile) -----------------------------

# Files that must run on one worker: they share a session-scoped fixture that starts a process
# (a server, a subprocess), which each worker would otherwise start on its own.
SAME_WORKER = {
    "test_ui_browser.py": "test_ui_client.py",      # the `ui_server` (a launched server)
    "test_int8_decode.py": "test_step_kernels.py",  # `triton_interpreted` (one interpreter process)
}
# Rough seconds per file on the 2-core CI machine (clean cache, --durations). Only the order
# depends on them: the longest files go first, so the two workers finish at about the same time
# instead of one running a long file alone at the end. A file not listed counts 0.3 s a test.
FILE_SECONDS = {
    "test_ui_client.py": 95, "test_ui_browser.py": 60, "test_hostile_inputs.py": 70, "test_cache_equality.py": 85,
    "test_grammar.py": 80, "test_load.py": 70, "test_faults.py": 70, "test_cli.py": 55, "test_tiny.py": 55,
    "test_twin_tokenizer.py": 40, "test_benchmarks_smoke.py": 35, "test_hybrid.py": 32, "test_fewer_steps.py": 30,
    "test_remote.py": 30, "test_safe_defaults.py": 30, "test_int8_decode.py": 25, "test_structured.py": 36,
    "test_multi_image.py": 27, "test_static_decode.py": 23, "test_vision_attention.py": 20, "test_plain_answer.py": 20, "test_mtp.py": 15,
    "test_step_kernels.py": 12,
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with SAME_WORKER's files joined into one unit and the longest units first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    def file_of(nodeid: str) -> str:
        return Path(nodeid.split("::", 1)[0]).name

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid):
            scope = super()._split_scope(nodeid)
            partner = SAME_WORKER.get(file_of(nodeid))
            return str(Path(scope).with_name(partner)) if partner else scope

        def _assign_work_unit(self, node):
            def seconds(scope):
                tests = self.workqueue[scope]
                files = {file_of(nodeid) for nodeid in tests}
                return sum(FILE_SECONDS.get(f, 0.3 * sum(file_of(n) == f for n in tests)) for f in files)
            self.workqueue.move_to_end(max(self.workqueue, key=seconds), last=False)
            super()._assign_work_unit(node)

    return Scheduling(config, log)


# Budgets small enough for speed, large enough that every phase produces real structure.
FAST = {
    "image.max_pixels": 128 * 28 * 28,
    "pipeline.reasoning_max_new_tokens": 96,
    "pipeline.synthesis_max_new_tokens": 64,
    "pipeline.evidence_max_new_tokens": 8,
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


# ---- Triton kernels on the CPU ---------------------------------------------------------------

# Scripts for Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so
# they run in a subprocess), registered by the test modules at import: {name: script}. Each prints
# "ok" when its checks hold.
TRITON_CHECKS: dict[str, str] = {}

_TRITON_RUNNER = """
import contextlib, io, json, sys, traceback
results = {}
for name, script in json.load(sys.stdin).items():
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(script, name, "exec"), {"__name__": "__main__"})
        results[name] = [out.getvalue(), ""]
    except BaseException:
        results[name] = [out.getvalue(), traceback.format_exc()]
sys.stdout.write(json.dumps(results))
"""


@pytest.fixture(scope="session")
def triton_interpreted():
    """{name: (stdout, traceback)} of every TRITON_CHECKS script, all run in one interpreter process
    (each process start costs the torch and triton imports, ~3 s of a core). Each script seeds
    its own RNG, so running them in one process changes none of them."""
    import json
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_RUNNER], cwd=ROOT, env=env, input=json.dumps(TRITON_CHECKS),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: tuple(result) for name, result in json.loads(proc.stdout).items()}


def check_interpreted(results: dict, name: str) -> None:
    out, error = results[name]
    assert not error and out.strip() == "ok", (out[-1000:], error[-3000:])

