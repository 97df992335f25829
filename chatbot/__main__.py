"""python -m chatbot [--config FILE] [--model ID_OR_PATH] [--host H] [--port N]

Loads the model once (logging each step, since a real checkpoint takes a while), then serves
the UI, by default on http://127.0.0.1:7860. Bad configuration or model: one line, exit 2.

Safe defaults (docs/reliability.md): only 127.0.0.1 unless --host / ui.host say otherwise; a
login when CORGI_USERNAME and CORGI_PASSWORD are set, failed logins slowed down; uploads capped by
ui.max_upload_mb each and ui.upload_quota_mb together; only files this process produced are
served (Gradio's upload/cache folder is a private temporary folder of this process; allowed_paths
is that folder, so GRADIO_ALLOWED_PATHS cannot widen it); no monitoring dashboard. The limits
between clients (chatbot/limits.py) are installed here.
"""
from __future__ import annotations

import argparse
import atexit
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from corgi.engine.tiny import TINY_NAMES

log = logging.getLogger("chatbot")
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chatbot", description="CoRGI Chat web UI")
    parser.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    parser.add_argument("--model", help=f"model id: a hub id, a local folder, or a random-weight twin "
                                        f"({', '.join(TINY_NAMES)})")
    parser.add_argument("--backend", choices=("local", "openai"),
                        help="local: load the model here; openai: use an OpenAI-compatible server (model.backend)")
    parser.add_argument("--base-url", help="with --backend openai: the server's API root (model.base_url)")
    parser.add_argument("--host", help="address to serve on (default: ui.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to serve on (default: ui.port, 7860)")
    return parser


def login_from_env(environ=os.environ) -> tuple[str, str] | None:
    """(username, password) from CORGI_USERNAME / CORGI_PASSWORD, None when neither is set.
    Raises ValueError when only one of them is set (a half-configured login must not mean none)."""
    user, password = environ.get("CORGI_USERNAME", ""), environ.get("CORGI_PASSWORD", "")
    if not user and not password:
        return None
    if not user or not password:
        raise ValueError("set both CORGI_USERNAME and CORGI_PASSWORD for a login, or neither")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


STALE_PREFIXES = ("corgi-chat-files-", "corgi-chat-")   # the launcher's and the app's folders
OWNER_FILE = ".owner-pid"
STALE_AGE_S = 24 * 3600     # a folder of ours with no owner file (killed before writing it)


def mark_owner(folder: str) -> None:
    """Record this process as the folder's owner, so a later start can tell it is stale."""
    with open(os.path.join(folder, OWNER_FILE), "w") as out:
        out.write(str(os.getpid()))


def sweep_stale_folders(parent: str | None = None) -> list[str]:
    """Remove this user's CoRGI temp folders whose owner process is gone (SIGKILL, a crash,
    power loss: no exit clean-up ran), and owner-less ones older than a day. Returns them."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(STALE_PREFIXES) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(os.path.join(path, OWNER_FILE)) as f:
                pid = int(f.read().strip() or 0)
            stale = pid <= 0 or not _alive(pid)
        except FileNotFoundError:
            stale = time.time() - os.stat(path).st_mtime > STALE_AGE_S
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True       # someone else's process: not ours to judge
    return True


def private_gradio_folder() -> str:
    """Gradio serves files from its upload/cache folder (/tmp/gradio, shared by every Gradio app
    of this user, by default). Give this process its own, removed at exit, unless the operator
    chose one. Must run before gradio is imported: some of its modules read it at import."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        folder = tempfile.mkdtemp(prefix="corgi-chat-files-")     # mode 0700
        mark_owner(folder)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = folder
    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", os.path.join(os.environ["GRADIO_TEMP_DIR"], "examples"))
    return os.environ["GRADIO_TEMP_DIR"]


def launch(demo, config, files: str, auth: tuple[str, str] | None = None, *, quiet: bool = False) -> None:
    """Serve `demo` (not blocking) on ui.host:ui.port with this launcher's settings and the limits
    between clients installed. Also used by benchmarks/session_memory.py, so that what it
    measures is this server. OSError when the address cannot be served."""
    from starlette.middleware import Middleware

    from .app import CSS
    from .limits import Guard, share_model_queue
    ui = config.ui
    guard = Middleware(Guard, files=files, quota_bytes=int(ui.upload_quota_mb * 1024 * 1024),
                       max_queued_per_client=ui.max_queued_turns_per_client)
    demo.launch(server_name=ui.host, server_port=ui.port, prevent_thread_lock=True, quiet=quiet,
                auth=auth, auth_message="CoRGI Chat: please log in." if auth else None,
                # The handler answers uploads over ui.max_upload_mb in the chat; Gradio's own
                # limit only keeps absurd files off the disk.
                max_file_size=int(ui.max_upload_mb * 2 * 1024 * 1024),
                # Not empty: an empty list makes Gradio read GRADIO_ALLOWED_PATHS instead.
                allowed_paths=[files], enable_monitoring=False, share=False,
                app_kwargs={"middleware": [guard]},
                state_session_capacity=max(ui.max_sessions * 4, 100), footer_links=["api"], css=CSS)
    share_model_queue(demo)


M_ARENA_MAX = -8      # glibc's mallopt parameter (malloc.h)
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas, unless the operator set MALLOC_ARENA_MAX. glibc gives threads
    that allocate at once arenas of their own (up to 8 per core), and the server's threads (HTTP
    worker threads, torch's) each fill one and keep its high-water mark: measured on this
    server, RSS grew +15 MiB over 40 finished sessions with the default arenas, +1.9 MiB with
    2, while Python's own heap stayed flat (benchmarks/RESULTS.md). One model turn runs at a
    time, so a few arenas cost no contention that matters. False where this is not glibc."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_malloc_arenas()      # before the threads start: see there
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)    # one line per internal HTTP call otherwise
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no phoning home from offline hosts
    # Gradio's queue keeps a record of each of the last 10 000 events for its monitoring
    # dashboard, which is off here: 1000 bound that memory tighter and still show recent use.
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")

    from corgi.config import ConfigError, load_config
    overrides = {"model.id": args.model, "model.backend": args.backend, "model.base_url": args.base_url,
                 "ui.host": args.host, "ui.port": args.port}
    try:
        config = load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    try:
        auth = login_from_env()
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT

    from corgi.__main__ import load_backend
    from corgi.engine.loading import ModelLoadError
    from corgi.remote import RemoteError
    m = config.model
    if m.backend == "local":
        log.info("loading model %s (device %s, dtype %s); a real checkpoint can take a minute ...",
                 m.id, m.device, m.dtype)
    else:
        log.info("using model %s on the %s server %s", m.id, m.backend, m.base_url)
    t0 = time.perf_counter()
    try:
        engine = load_backend(config)
    except (ModelLoadError, RemoteError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    info = engine.model_info()
    log.info("model ready in %.1f s: %s (%s) on %s as %s (%s backend)", time.perf_counter() - t0, info["id"],
             info["family"], info["device"], info["dtype"], info.get("backend", "local"))

    log.info("building the UI ...")
    for path in sweep_stale_folders():
        log.info("removed a stale folder of a process that is gone: %s", path)
    files = private_gradio_folder()
    from .app import build_app
    demo = build_app(engine, config)
    ui = config.ui
    if not is_loopback(ui.host) and auth is None:
        log.warning("serving on %s without a login: anyone who can reach it can use the model "
                    "(set CORGI_USERNAME and CORGI_PASSWORD to require one)", ui.host)
    if os.environ.get("GRADIO_ALLOWED_PATHS"):
        # Gradio serves those paths whenever allowed_paths is empty; it is never empty here.
        log.warning("GRADIO_ALLOWED_PATHS is set and ignored: CoRGI Chat serves only its own files")
    log.info("login %s; served files only from %s", "required" if auth else "off", files)
    try:
        launch(demo, config, files, auth)
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", ui.host, ui.port, exc)
        return EXIT_BAD_INPUT
    log.info("CoRGI Chat is ready: http://%s:%d (Ctrl+C stops it)", ui.host, ui.port)
    # SIGTERM (service managers, `kill`) and SIGHUP (the terminal went away) stop like Ctrl+C,
    # so the exit clean-up runs: the private file folder (uploads, traces) is removed instead of
    # left on the disk.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        while demo.is_running:      # demo.block_thread(), minus its slow close
            time.sleep(0.1)
    except KeyboardInterrupt:
        log.info("stopping ...")
    finally:
        demo.close()    # ends open connections (browser heartbeats) first, so it exits at once
    log.info("stopped")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
