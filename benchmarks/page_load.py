"""What a page load costs, for a tiny and a heavier checkpoint, measured side by side.

Gradio deep-copies the page config on every `GET /` and `GET /config` (gradio/routes.py). A
config that reaches the model (a State's delete_callback bound to an object holding the engine)
copies every weight tensor per page load; with the config reaching nothing of the model, a page
load costs the same for any model size. Two readings:

  * served: `python -m chatbot --model M` for each model, both running; `GET /config` and `GET /`
    interleaved between the servers (repeat r asks server A then B, r+1 asks B then A), median
    and min of the repeats; the ratio heavier / tiny; each server's resident memory before and
    after all the page loads.
  * copy: in this process, the app built on each model, `gradio.utils.safe_deepcopy` of its
    config (what the routes call), interleaved likewise; once with the app's wiring and once
    with the old one (delete_callback bound to the app: the bug this guards against), so the
    before and after are in one run.

    .venv/bin/python -m benchmarks.page_load                       # tiny-qwen2.5-vl vs small-qwen2.5-vl
    .venv/bin/python -m benchmarks.page_load --repeats 30 --models tiny-qwen3-vl small-qwen3-vl
    .venv/bin/python -m benchmarks.page_load --smoke               # 2 repeats, no old-wiring arm
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import common

PATHS = ("/config", "/")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `python -m chatbot` on a free port, ready once it answers HTTP."""

    def __init__(self, model: str, folder: Path, timeout: float = 300.0):
        self.model, self.port = model, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
        for key in ("CORGI_USERNAME", "CORGI_PASSWORD", "GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE"):
            env.pop(key, None)
        self.log = folder / f"{model}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "chatbot", "--model", model, "--port", str(self.port)],
                                         cwd=common.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{model}: the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=30):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"{model}: no answer within {timeout:g} s")
                time.sleep(0.25)

    def get(self, path: str) -> float:
        t0 = time.perf_counter()
        with urllib.request.urlopen(self.url + path, timeout=600) as response:
            response.read()
            assert response.status == 200, (path, response.status)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def interleaved(arms: dict, measure, repeats: int) -> dict[str, list[float]]:
    """measure(arm) for every arm, `repeats` times, the order alternating between repeats."""
    names = list(arms)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(measure(arms[name]))
    return out


def served_rows(models: list[str], repeats: int) -> tuple[list[dict], dict]:
    folder = Path(tempfile.mkdtemp(prefix="page-load-"))
    servers: dict[str, Served] = {}
    try:
        for model in models:
            servers[model] = Served(model, folder)
        for server in servers.values():          # the first page load of each: not part of the readings
            for path in PATHS:
                server.get(path)
        before = {m: rss_mib(s.proc.pid) for m, s in servers.items()}
        rows = []
        for path in PATHS:
            readings = interleaved(servers, lambda s: s.get(path), repeats)
            rows += [{"reading": f"served GET {path}", "model": m, "median_s": common.median(v), "min_s": min(v),
                      "repeats": len(v)} for m, v in readings.items()]
        after = {m: rss_mib(s.proc.pid) for m, s in servers.items()}
        memory = {m: {"rss_before_mib": round(before[m], 1), "rss_after_mib": round(after[m], 1),
                      "page_loads": 2 * repeats} for m in models}
        return rows, memory
    finally:
        for server in servers.values():
            server.stop()


def copy_rows(models: list[str], repeats: int, old_wiring: bool) -> list[dict]:
    import gradio as gr
    from gradio import utils

    from chatbot.app import CorgiApp
    from corgi.config import load_config
    from corgi.engine.engine import Engine

    arms = {}
    for model in models:
        config = load_config(None, {"model.id": model})
        app = CorgiApp(Engine.load(config), config)
        demo = app.build()
        arms[(model, "app")] = demo.get_config_file()
        if old_wiring:
            # The wiring this benchmark guards against: a bound method of the app as the State's
            # delete_callback (CorgiApp.outputs stands in for the old CorgiApp.expire).
            old = app.build()
            for block in old.blocks.values():
                if isinstance(block, gr.State):
                    block.delete_callback = app.outputs
            arms[(model, "old: bound method")] = old.get_config_file()
    readings = interleaved(arms, lambda config: common.timed(lambda: utils.safe_deepcopy(config))[0], repeats)
    return [{"reading": "copy of the page config", "model": m, "wiring": w, "median_s": common.median(v),
             "min_s": min(v), "repeats": len(v)} for (m, w), v in readings.items()]


def parameters(model: str) -> int:
    from corgi.config import load_config
    from corgi.engine.loading import load_model
    config = load_config(None, {"model.id": model})
    return sum(p.numel() for p in load_model(config.model, config.image).model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.page_load", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs=2, default=["tiny-qwen2.5-vl", "small-qwen2.5-vl"],
                        help="the light and the heavier checkpoint (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--copy-repeats", type=int, default=5, help="repeats of the in-process copy reading")
    parser.add_argument("--smoke", action="store_true", help="2 repeats, no old-wiring arm")
    parser.add_argument("--out", default=str(common.OUT_DIR / "page_load.json"))
    args = parser.parse_args(argv)
    repeats, copy_repeats = (2, 1) if args.smoke else (args.repeats, args.copy_repeats)
    light, heavy = args.models
    sizes = {m: parameters(m) for m in args.models}

    rows, memory = served_rows(args.models, repeats)
    rows += copy_rows(args.models, copy_repeats, old_wiring=not args.smoke)
    ratios = {}
    for reading in dict.fromkeys(r["reading"] for r in rows):
        for wiring in dict.fromkeys(r.get("wiring") for r in rows if r["reading"] == reading):
            by = {r["model"]: r for r in rows if r["reading"] == reading and r.get("wiring") == wiring}
            label = f"{reading}{f' ({wiring})' if wiring else ''}: {heavy} / {light}"
            ratios[label] = by[heavy]["median_s"] / by[light]["median_s"]
    for r in rows:
        r["median_ms"], r["min_ms"] = 1000 * r.pop("median_s"), 1000 * r.pop("min_s")
        r["parameters"] = sizes[r["model"]]

    print(f"## Page load: {light} ({sizes[light] / 1e6:.1f}M parameters) vs {heavy} ({sizes[heavy] / 1e6:.1f}M)\n")
    print(common.table(rows, ["reading", "model", "wiring", "parameters", "median_ms", "min_ms", "repeats"]))
    print("\nRatios (median, heavier / tiny):\n")
    print(common.table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"]))
    print("\nServer memory around the page loads (MiB resident):\n")
    print(common.table([{"model": m, **v} for m, v in memory.items()],
                       ["model", "rss_before_mib", "rss_after_mib", "page_loads"]))
    path = common.write_json(args.out, {
        "benchmark": "page_load", "environment": common.environment(),
        "settings": {"models": args.models, "repeats": repeats, "copy_repeats": copy_repeats, "smoke": args.smoke},
        "parameters": sizes, "rows": rows, "ratios": ratios, "memory": memory})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
