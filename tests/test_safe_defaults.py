"""Safe defaults (hardening, part 4).

  * The app listens on 127.0.0.1 unless told otherwise (config default, launch arguments, and the
    socket a launched server really listens on).
  * A login when CORGI_USERNAME and CORGI_PASSWORD are set: without it, or with a wrong password,
    nothing is served, not the page, not the API, not the files.
  * Uploads are capped (Gradio refuses what is far over ui.max_upload_mb; the handler explains
    the rest, see test_ui_client.py).
  * Only files the app produced are served: its own upload/output folder (private to the
    process), never the repository, the config, the model weights or the rest of the disk.
  * No trust_remote_code unless the config says so: a checkpoint that ships code is refused
    and its code never runs.
  * Nothing is deserialised with pickle: no pickle-based loader in the code, and a checkpoint
    whose weights are a pickle (pytorch_model.bin) is refused without unpickling it.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from server import REPO

USER, PASSWORD = "corgi-tester", "s3cret-Pa55"
CONFIG = """\
model: {id: tiny-qwen2.5-vl}
image: {min_pixels: 3136, max_pixels: 50176}
pipeline: {max_steps: 3, max_regions: 3, reasoning_max_new_tokens: 48, evidence_max_new_tokens: 4,
           synthesis_max_new_tokens: 48, max_thinking_chars: 20}
ui: {max_upload_mb: 0.1}
"""


# ---- defaults in the code and configs ----------------------------------------------------------

def test_config_defaults_are_safe():
    from corgi.config import Config, load_config
    for config in (Config(), load_config(None)):
        assert config.ui.host == "127.0.0.1"
        assert config.model.trust_remote_code is False
        assert 0 < config.ui.max_upload_mb <= 100
    import yaml
    for path in (REPO / "configs").glob("*.yaml"):           # no shipped config weakens them
        data = yaml.safe_load(path.read_text()) or {}
        assert (data.get("ui") or {}).get("host", "127.0.0.1") == "127.0.0.1", path.name
        assert (data.get("model") or {}).get("trust_remote_code", False) is False, path.name


def test_login_comes_from_the_environment():
    from chatbot.__main__ import is_loopback, login_from_env
    assert login_from_env({}) is None
    assert login_from_env({"CORGI_USERNAME": "a", "CORGI_PASSWORD": "b"}) == ("a", "b")
    for half in ({"CORGI_USERNAME": "a"}, {"CORGI_PASSWORD": "b"}, {"CORGI_USERNAME": "a", "CORGI_PASSWORD": ""}):
        with pytest.raises(ValueError, match="both"):
            login_from_env(half)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_half_a_login_refuses_to_start(monkeypatch, caplog):
    import logging

    import chatbot.__main__ as launcher
    monkeypatch.setenv("CORGI_USERNAME", USER)
    monkeypatch.delenv("CORGI_PASSWORD", raising=False)
    caplog.set_level(logging.INFO)
    assert launcher.main([]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["set both CORGI_USERNAME and CORGI_PASSWORD for a login, or neither"]


def test_launch_arguments(monkeypatch, tmp_path, caplog):
    """What `python -m chatbot` hands to Gradio: host, login, upload cap, served paths, no
    monitoring, no share link, its own file folder; and --host when told otherwise."""
    import logging
    import gradio as gr
    import gradio_client  # noqa: F401  (imported before the launcher points GRADIO_TEMP_DIR elsewhere)

    import chatbot.__main__ as launcher
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    handlers = {}
    monkeypatch.setattr(launcher.signal, "signal", lambda signum, handler: handlers.__setitem__(signum, handler))
    for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE"):    # restored afterwards, even if unset now
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("CORGI_USERNAME", USER)
    monkeypatch.setenv("CORGI_PASSWORD", PASSWORD)
    # Gradio serves GRADIO_ALLOWED_PATHS whenever allowed_paths is empty: it must not widen anything.
    monkeypatch.setenv("GRADIO_ALLOWED_PATHS", "/etc,/")
    caplog.set_level(logging.INFO)
    config = tmp_path / "app.yaml"
    config.write_text(CONFIG)
    assert launcher.main(["--config", str(config)]) == 0
    (kwargs,) = calls
    assert kwargs["server_name"] == "127.0.0.1"
    assert kwargs["auth"] == (USER, PASSWORD)
    assert kwargs["max_file_size"] == int(0.1 * 2 * 1024 * 1024)
    folder = os.environ["GRADIO_TEMP_DIR"]
    assert kwargs["allowed_paths"] == [folder] and kwargs.get("blocked_paths") is None
    assert any("GRADIO_ALLOWED_PATHS is set and ignored" in r.getMessage() for r in caplog.records)
    served = [r.getMessage() for r in caplog.records if "served files only from" in r.getMessage()]
    assert served and served[-1].endswith(folder)
    from chatbot.limits import Guard
    (guard,) = kwargs["app_kwargs"]["middleware"]
    assert guard.cls is Guard and guard.kwargs["files"] == folder
    assert kwargs["enable_monitoring"] is False and kwargs["share"] is False
    for name in ("SIGTERM", "SIGHUP"):                  # both stop it like Ctrl+C
        with pytest.raises(KeyboardInterrupt):
            handlers[getattr(launcher.signal, name)](getattr(launcher.signal, name), None)
    assert Path(folder).name.startswith("corgi-chat-files-") and (os.stat(folder).st_mode & 0o077) == 0

    # Told otherwise: it serves where it is told, and warns when that is open without a login.
    monkeypatch.delenv("GRADIO_ALLOWED_PATHS")
    monkeypatch.delenv("CORGI_USERNAME")
    monkeypatch.delenv("CORGI_PASSWORD")
    caplog.set_level(logging.INFO)
    assert launcher.main(["--config", str(config), "--host", "0.0.0.0"]) == 0
    assert calls[-1]["server_name"] == "0.0.0.0" and calls[-1]["auth"] is None
    assert any(r.levelno == logging.WARNING and "without a login" in r.getMessage() for r in caplog.records)
    shutil.rmtree(folder, ignore_errors=True)


# ---- a launched server with a login -------------------------------------------------------------

@pytest.fixture(scope="module")
def server(launch):
    # Its own server: the last test stops it.
    server = launch(CONFIG, env={"CORGI_USERNAME": USER, "CORGI_PASSWORD": PASSWORD}, shared=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def session(server):
    """A logged-in client that has asked one question; file paths as the server sees them."""
    from gradio_client import handle_file
    client = server.client(auth=(USER, PASSWORD), download_files=False)
    client.predict([handle_file(str(REPO / "assets" / "shapes.png"))], api_name="/set_image")
    out = client.predict({"text": "How many shapes are there?", "files": []}, api_name="/ask")
    yield client, out
    client.close()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets in LISTEN state on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if int(local_port, 16) == port and state == "0A":
                found.add(address)
    return found


def test_listens_on_loopback_only(server):
    port = int(server.url.rsplit(":", 1)[1])
    addresses = listening_addresses(port)
    assert addresses, "the server's listening socket was not found"
    assert addresses <= {"0100007F", "00000000000000000000000001000000"}, addresses   # 127.0.0.1, ::1


def test_without_the_login_nothing_is_served(server, session):
    from gradio_client import Client
    client, out = session
    trace = out[6]["value"]["path"]
    page = httpx.get(server.url + "/").text                # the login page: no app in it
    assert '"auth_required":true' in page and '"components":[]' in page
    assert "Grounded visual reasoning" not in page
    for path in ("/config", "/gradio_api/info", f"/gradio_api/file={trace}", "/gradio_api/queue/status"):
        response = httpx.get(server.url + path)
        assert response.status_code in (401, 403), (path, response.status_code)
    response = httpx.post(server.url + "/gradio_api/upload", files={"files": ("a.png", b"x")})
    assert response.status_code == 401
    with pytest.raises(Exception, match="(?i)login|credentials"):
        Client(server.url, verbose=False)
    with pytest.raises(Exception, match="(?i)login"):
        Client(server.url, auth=(USER, "wrong"), verbose=False)
    response = httpx.post(server.url + "/login", data={"username": USER, "password": "wrong"})
    assert response.status_code in (400, 401)


def test_logged_in_user_gets_the_app_and_only_its_files(server, session):
    client, out = session
    assert list(out[5]) == ["turn 1"]
    cookies = client.cookies
    # What the app produced is served (the trace), from the process's private file folder.
    trace = out[6]["value"]["path"]
    assert Path(trace).parent.parent.name.startswith("corgi-chat-files-"), trace
    response = httpx.get(f"{server.url}/gradio_api/file={trace}", cookies=cookies)
    assert response.status_code == 200
    assert [t["question"] for t in json.loads(response.content)["turns"]] == ["How many shapes are there?"]
    # Nothing else: the repository, the config, the model's weights, the system, Gradio's
    # shared folder, and no path tricks.
    from corgi.engine.tiny import ensure_tiny_checkpoint
    weights = ensure_tiny_checkpoint("tiny-qwen2.5-vl") / "model.safetensors"
    private = Path(trace).parent.parent
    for path in (REPO / "README.md", REPO / "chatbot" / "app.py", server.log.parent / "app.yaml", weights,
                 Path("/etc/passwd"), Path("/proc/self/environ"), private.parent / "gradio",
                 f"{private}/../../etc/passwd", f"{private}/%2e%2e/%2e%2e/etc/passwd", "https://example.com/"):
        response = httpx.get(f"{server.url}/gradio_api/file={path}", cookies=cookies)
        assert response.status_code in (403, 404), (path, response.status_code)
    assert PASSWORD not in server.log_text()                  # the login is never logged
    # No monitoring dashboard (Gradio enables /monitoring by default).
    for path in ("/monitoring", "/gradio_api/monitoring/summary", "/monitoring/summary"):
        assert httpx.get(server.url + path, cookies=cookies).status_code in (403, 404), path


def test_uploads_far_over_the_limit_are_refused(server, session):
    client, _ = session
    big = os.urandom(int(0.25 * 1024 * 1024))           # over twice ui.max_upload_mb (0.1 MB)
    response = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("big.png", big)},
                          cookies=client.cookies)
    assert response.status_code == 413, response.text[:200]
    small = os.urandom(4096)
    response = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("small.png", small)},
                          cookies=client.cookies)
    assert response.status_code == 200
    assert server.alive()


def test_session_routes_need_the_login_and_api_inputs_are_checked(server, session):
    """Routes Gradio leaves open that act on a session (closing a heartbeat frees that session;
    cancel) need the login; an API call naming a file the server does not hold, or a null
    slider, is refused with one 400 and no traceback in the log."""
    client, _ = session
    victim = client.session_hash
    response = httpx.get(f"{server.url}/gradio_api/heartbeat/{victim}", timeout=10)
    assert response.status_code == 401
    response = httpx.post(f"{server.url}/gradio_api/cancel",
                          json={"session_hash": victim, "fn_index": 0, "event_id": "x"})
    assert response.status_code == 401
    config = httpx.get(f"{server.url}/config", cookies=client.cookies).json()
    fn = {d.get("api_name"): i for i, d in enumerate(config["dependencies"])}
    for api, data, reason in [
            ("set_image", [None, [{"path": str(REPO / "assets" / "shapes.png"), "meta": {"_type": "gradio.FileData"}}]],
             "is not a file uploaded to this server"),
            ("set_image", [None, "/etc/passwd"], "is not valid input"),
            ("ask", [None, {"text": "q", "files": []}, None, 3, 48, 4, 48], "must be a number from 1 to 20, not None")]:
        response = httpx.post(f"{server.url}/gradio_api/queue/join", cookies=client.cookies,
                              json={"data": data, "fn_index": fn[api], "session_hash": victim})
        assert response.status_code == 400 and reason in response.json()["detail"], (api, response.text)
    out = client.predict(api_name="/stop")                     # nothing to stop: shows the session
    assert list(out[5]) == ["turn 1"]                          # the victim's conversation is intact
    assert "Traceback" not in server.log_text()


def test_failed_logins_are_slowed_down(server, session):
    """A few failed logins are free; then the address is locked out (HTTP 429, Retry-After),
    the right password included, for twice as long each time."""
    codes = []
    for _ in range(12):
        codes.append(httpx.post(server.url + "/login", data={"username": USER, "password": "wrong"}).status_code)
        if codes[-1] == 429:
            break
    assert codes[-1] == 429 and set(codes[:-1]) <= {400}, codes
    locked = httpx.post(server.url + "/login", data={"username": USER, "password": PASSWORD})
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1
    assert "Too many failed logins" in locked.json()["detail"]
    assert PASSWORD not in server.log_text()


def test_stopping_the_server_removes_its_files(server, session):
    """SIGTERM (what service managers send) stops the app like Ctrl+C: the private folder with
    every upload and trace is removed, not left on the disk. (Runs last of the server tests.)"""
    _, out = session
    private = Path(out[6]["value"]["path"]).parent.parent
    assert private.is_dir()
    server.stop()                                              # SIGTERM
    assert server.proc.returncode == 0, server.log_text()[-2000:]
    assert not private.exists()


# ---- what the model loader trusts ----------------------------------------------------------------

def checkpoint_copy(tmp_path: Path) -> Path:
    from corgi.engine.tiny import ensure_tiny_checkpoint
    folder = tmp_path / "checkpoint"
    shutil.copytree(ensure_tiny_checkpoint("tiny-qwen2.5-vl"), folder)
    return folder


def cli_error(capsys, *args) -> str:
    from corgi.__main__ import main
    capsys.readouterr()
    code = main(["run", "--image", str(REPO / "assets" / "shapes.png"), "--question", "q", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def test_remote_code_is_not_trusted(tmp_path, capsys):
    folder = checkpoint_copy(tmp_path)
    marker = tmp_path / "remote-code-ran"
    (folder / "evil_config.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                           "from transformers import PretrainedConfig\n"
                                           "class EvilConfig(PretrainedConfig):\n    model_type = 'corgi_evil'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="corgi_evil", auto_map={"AutoConfig": "evil_config.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    line = cli_error(capsys, "--model", str(folder))
    assert "cannot load model" in line and "contains custom code which must be executed" in line
    assert not marker.exists(), "the checkpoint's code ran"


def test_pickled_weights_are_refused_unread(tmp_path, capsys):
    import torch
    folder = checkpoint_copy(tmp_path)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    (folder / "model.safetensors").unlink()
    torch.save({"payload": Payload()}, folder / "pytorch_model.bin")
    line = cli_error(capsys, "--model", str(folder))
    assert "cannot load model" in line and "model.safetensors" in line
    assert not marker.exists()


def test_no_pickle_based_loader_in_the_code():
    """No import of pickle-like modules and no torch.load / numpy.load in the app's code."""
    banned_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    banned_calls = {("torch", "load"), ("np", "load"), ("numpy", "load"), ("pd", "read_pickle"),
                    ("pandas", "read_pickle")}
    offences = []
    for path in [*(REPO / "corgi").rglob("*.py"), *(REPO / "chatbot").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                offences += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                offences.append(f"{path.name}: from {node.module} import")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and (node.value.id, node.attr) in banned_calls:
                offences.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_start_up_sweeps_the_folders_of_processes_that_are_gone(tmp_path):
    """A SIGKILLed or crashed server leaves its folders (uploads, traces) behind; the next start
    removes those whose owner is gone and owner-less ones older than a day, nothing else."""
    import subprocess
    import sys
    import time

    import chatbot.__main__ as launcher
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folders = {}
    for name, owner, age in [("corgi-chat-files-dead", gone.pid, 0), ("corgi-chat-live", os.getpid(), 0),
                             ("corgi-chat-files-old", None, 2 * 86400), ("corgi-chat-new", None, 0),
                             ("someone-elses", gone.pid, 0)]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "upload.png").write_bytes(b"x")
        if owner is not None:
            (folder / launcher.OWNER_FILE).write_text(str(owner))
        if age:
            os.utime(folder, (time.time() - age, time.time() - age))
        folders[name] = folder
    removed = launcher.sweep_stale_folders(str(tmp_path))
    assert sorted(Path(p).name for p in removed) == ["corgi-chat-files-dead", "corgi-chat-files-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corgi-chat-live", "corgi-chat-new", "someone-elses"]
