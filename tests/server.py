"""Launching the web UI for the server tests: `python -m chatbot` in its own process, as a user
runs it, on a free 127.0.0.1 port.

    server = serve(folder, config_text, model="tiny-qwen3-vl", env={...}, args=(...))
    server.url, server.log, server.alive(), server.client(), server.stop()

`serve` returns once the server answers HTTP: Gradio prints "Running on local URL" before it
does, so the URL is polled (401 counts: a login is required). `stop` sends SIGTERM (the
launcher's clean exit: its private file folder is removed) and kills only a server that does
not stop. The fixtures in conftest.py (`launch`, `ui_server`) build on this and reuse one
server per configuration for the whole run.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"

# The UI tests' configuration: small budgets keep a turn under a second or two on a CPU (the
# grammar bounds the rest); an upload cap small enough to test.
UI_CONFIG = """\
model: {id: tiny-qwen2.5-vl}
image: {min_pixels: 3136, max_pixels: 50176}
pipeline: {max_steps: 3, max_regions: 3, reasoning_max_new_tokens: 96, evidence_max_new_tokens: 8,
           synthesis_max_new_tokens: 64, max_thinking_chars: 40}
ui: {max_upload_mb: 8, idle_timeout_s: 600}
"""

# Never inherited from the test process: a login, or a shared file folder, is what a test asks for.
SCRUBBED_ENV = ("CORGI_USERNAME", "CORGI_PASSWORD", "GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE",
                "GRADIO_ALLOWED_PATHS", "GRADIO_SHARE", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT")
START_TIMEOUT_S = 180.0      # generous: a 2-core machine, maybe a checkpoint to build first
STOP_TIMEOUT_S = 15.0


def texts(chat) -> list[str]:
    """The text parts of a chat as gradio_client returns it."""
    return [part.get("text", "") for m in chat for part in m["content"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(config_text: str, model: str | None = None) -> str:
    """The YAML config, with model.id set to `model` when given; normalised, so that equal
    configurations give equal text (the key under which a server is reused)."""
    data = yaml.safe_load(config_text) or {}
    if model is not None:
        data["model"] = {**(data.get("model") or {}), "id": model}
    return yaml.safe_dump(data, sort_keys=True)


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, model: str):
        self.url, self.proc, self.log, self.model = url, proc, log, model

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, **kwargs):
        """A gradio_client Client: one Client is one browser session."""
        from gradio_client import Client
        return Client(self.url, **{"verbose": False, **kwargs})

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()           # SIGTERM: the launcher stops like Ctrl+C
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __repr__(self) -> str:
        return f"Server({self.model} at {self.url})"


def serve(folder: Path, config_text: str = UI_CONFIG, *, model: str | None = None, env: dict | None = None,
          args: tuple = (), timeout: float = START_TIMEOUT_S) -> Server:
    """Run `python -m chatbot --config <config_text> [args]` on a free 127.0.0.1 port, with the
    test environment plus `env`; return once it answers HTTP. Files: folder/app.yaml, folder/server.log."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = config_for(config_text, model)
    config = folder / "app.yaml"
    config.write_text(text)
    full_env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    full_env.setdefault("CORGI_CACHE", str(REPO / ".cache" / "corgi"))
    for key in SCRUBBED_ENV:
        full_env.pop(key, None)
    full_env.update(env or {})
    log = folder / "server.log"
    for _ in range(3):      # a free port can be taken by someone else before the server binds it
        port = free_port()
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "chatbot", "--config", str(config), "--port", str(port),
                                     *args], cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}", proc, log, (yaml.safe_load(text).get("model") or {}).get("id"))
        outcome = wait_until_ready(server, timeout)
        if outcome == "ready":
            return server
        if outcome != "exited" or "cannot serve on" not in server.log_text():
            break
    why = f"exit code {proc.returncode}" if outcome == "exited" else f"no answer within {timeout:g} s"
    raise AssertionError(f"the server did not start ({why}):\n{server.log_text()[-6000:]}")


def wait_until_ready(server: Server, timeout: float) -> str:
    """Poll the URL until it answers ("ready"), the process exits ("exited") or the deadline
    passes ("timeout"; the server is stopped then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            return "exited"
        try:
            with urllib.request.urlopen(server.url + "/", timeout=5):
                return "ready"
        except urllib.error.HTTPError:          # 401: a login is required; it answers
            return "ready"
        except OSError:
            time.sleep(0.25)
    server.stop()
    return "timeout"


class InProcessServer:
    """The same app served from this test process (Gradio's own server in a thread) on a model
    the process already loaded: the HTTP path, the queue and gradio_client as with `serve`,
    without starting Python, torch and the model again. For checks that are about a family,
    not about the launcher (those use `serve`)."""

    def __init__(self, engine, config):
        from chatbot.app import CSS, build_app
        self.model = config.model.id
        self.demo = build_app(engine, config)
        self.demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                         quiet=True, allowed_paths=[], enable_monitoring=False, share=False, css=CSS)
        self.url = self.demo.local_url.rstrip("/")

    def alive(self) -> bool:
        return True

    def client(self, **kwargs):
        from gradio_client import Client
        return Client(self.url, verbose=False, **kwargs)

    def log_text(self) -> str:
        return ""

    def stop(self) -> None:
        self.demo.close()
