"""Limits that keep one client from hurting the others, and the server from hurting itself.

Installed by the launcher (chatbot/__main__.py) on the Gradio app, without patching Gradio:

  * `Guard`, an ASGI middleware handed to Gradio's FastAPI app (`launch(app_kwargs=...)`):
      - failed logins are limited per client address: a few are free, then each one locks that
        address out for twice as long as the last (1 s, 2 s, 4 s ... at most LOCKOUT_MAX_S);
        while locked out, /login answers 429 without checking the password;
      - with a login, the routes Gradio leaves open that act on a session (`/gradio_api/heartbeat/`:
        closing one frees that session; `/gradio_api/cancel`; `/gradio_api/reset`) need it too;
      - every API call's inputs are checked before Gradio processes them: a file must be one this
        server holds (an upload, an example, an output: inside its private file folder; never a
        server path or a URL, which Gradio would otherwise copy or fetch), a slider must be a
        number in its range. Such a call gets one HTTP 400 with the reason, not a traceback;
      - uploads stop at a quota over the whole file folder (ui.upload_quota_mb) and when the
        disk is nearly full: HTTP 413 / 507 with a sentence, never a half-written file;
      - one client (`client_key`: its address) may have at most ui.max_queued_turns_per_client
        model events waiting or running: past it, /queue/join answers 429 with a sentence.
  * `check_upload`: what a session may open, and at most ui.session_upload_mb of uploads a
    session (Gradio's upload route knows no session, so the bytes are counted when a file is
    attached to one; a file past the cap is deleted).
  * `share_model_queue`: the one model queue serves sessions in turn (round robin) instead of
    first come first served, so one session that queues six turns delays another session's
    turn by at most one of them.
  * `discard_upload`: delete an upload the app refused, or no longer needs.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any, Callable

log = logging.getLogger(__name__)

FREE_FAILURES = 5            # failed logins per address before the lock-outs start
LOCKOUT_MAX_S = 300.0
MAX_API_BODY = 1024 * 1024   # an API call's JSON (files travel separately, through /upload)
DISK_RESERVE = 64 * 1024 * 1024   # uploads stop while less than this would stay free
API_PREFIX = "/gradio_api"


# ---- files ----------------------------------------------------------------------------------

def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` (links resolved) is `folder` or inside it."""
    try:
        real, root = os.path.realpath(path), os.path.realpath(folder)
    except (OSError, ValueError):
        return False
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def discard_upload(path: str | None, folder: str | None) -> bool:
    """Delete `path` if it is a file inside the upload folder `folder` (never anything else)."""
    if not path or not folder or not inside(path, folder) or not os.path.isfile(path):
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    parent = os.path.dirname(os.path.realpath(path))
    if os.path.realpath(parent) != os.path.realpath(folder):
        try:
            os.rmdir(parent)        # Gradio keeps each upload in a folder of its own
        except OSError:
            pass
    return True


def upload_folder() -> str:
    """Gradio's upload and cache folder (the launcher makes it private to the process)."""
    return os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")


from .sessions import CLIENT_FULL, SERVER_FULL  # noqa: F401 (the messages live with the store)

QUEUE_FULL = ("You already have {n} questions waiting for the model, the most one client may queue: "
              "wait for one of them to be answered, then ask again.")
SESSION_UPLOADS = ("This conversation has uploaded {used:.0f} MB of files, and {name!r} ({size:.1f} MB) would "
                   "take it past the {cap:g} MB one conversation may upload: start a New conversation in a "
                   "new tab to upload more.")


def client_key(request) -> str | None:
    """Who a request comes from, for the per-client limits: its address (an IPv4-mapped IPv6
    address as plain IPv4). Not the login name: the launcher's login is one name and password
    that everyone shares. Not X-Forwarded-For: any client can write that header. So behind a
    reverse proxy, or on loopback, every client is one client (see docs/reliability.md)."""
    host = getattr(getattr(request, "client", None), "host", None)
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return str(getattr(address, "ipv4_mapped", None) or address)


DISK_FULL = ("The server's disk is full, so this answer cannot be shown in full. The conversation "
             "goes on: try again in a while.")
def check_upload(session, path: str, name: str, *also: os.PathLike, cap_bytes: int = 0) -> None:
    """ImageError unless this session may load `path`: a session the store refused may not
    (SERVER_FULL / CLIENT_FULL), only files this server holds (its upload folder, or `also`) are
    opened, never a path an API caller names elsewhere on the disk, and an upload must not take
    the session past `cap_bytes` of uploads (0: no cap; see count_upload)."""
    from corgi.images import ImageError
    if getattr(session, "refused", ""):
        raise ImageError(session.refused if isinstance(session.refused, str) else SERVER_FULL)
    if not any(inside(path, folder) for folder in (upload_folder(), *also)):
        raise ImageError(f"The file {name[:80]!r} was not uploaded to this server.")
    if cap_bytes and inside(path, upload_folder()):
        size = _size(path)
        if session.upload_bytes + size > cap_bytes:
            raise ImageError(SESSION_UPLOADS.format(used=session.upload_bytes / 2**20, name=name[:80],
                                                    size=size / 2**20, cap=cap_bytes / 2**20))


def count_upload(session, path: str) -> None:
    """An upload the session keeps: its bytes count against ui.session_upload_mb (examples do not)."""
    if inside(path, upload_folder()):
        session.upload_bytes += _size(path)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# ---- failed logins --------------------------------------------------------------------------

class LoginLimiter:
    """Failed logins per client address; after FREE_FAILURES, locked out for 1, 2, 4 ... s."""

    def __init__(self, free: int = FREE_FAILURES, cap_s: float = LOCKOUT_MAX_S,
                 clock: Callable[[], float] = time.monotonic):
        self.free, self.cap_s, self.clock = free, cap_s, clock
        self._failures: dict[str, int] = defaultdict(int)
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds this address must wait before its next attempt (0: it may try now)."""
        with self._lock:
            return max(0.0, self._until.get(client, 0.0) - self.clock())

    def failed(self, client: str) -> None:
        with self._lock:
            self._failures[client] += 1
            over = self._failures[client] - self.free
            if over > 0:
                self._until[client] = self.clock() + min(self.cap_s, 2.0 ** (over - 1))
            if len(self._failures) > 10_000:        # bounded memory under an address sweep
                oldest = next(iter(self._failures))
                self._failures.pop(oldest)
                self._until.pop(oldest, None)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)
            self._until.pop(client, None)


# ---- the middleware --------------------------------------------------------------------------

class Guard:
    """ASGI middleware: see the module docstring. `files`: the private file folder."""

    def __init__(self, app, *, files: str, quota_bytes: int, limiter: LoginLimiter | None = None,
                 max_queued_per_client: int = 0, concurrency_id: str = "model"):
        self.app, self.files, self.quota_bytes = app, files, quota_bytes
        self.limiter = limiter or LoginLimiter()
        self.max_queued, self.concurrency_id = max_queued_per_client, concurrency_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        gradio_app = scope.get("app")
        login_on = getattr(gradio_app, "auth", None) is not None
        if method == "POST" and path.rstrip("/") == "/login" and login_on:
            return await self._login(scope, receive, send)
        if login_on and (path.startswith(f"{API_PREFIX}/heartbeat/")
                         or path.rstrip("/") in (f"{API_PREFIX}/cancel", f"{API_PREFIX}/reset")):
            if _user(scope, gradio_app) is None:
                return await _reply(send, 401, "Not authenticated: log in first.")
        if method == "POST" and path.rstrip("/") == f"{API_PREFIX}/upload":
            problem = self._upload_problem(scope)
            if problem:
                return await _reply(send, *problem)
        if method == "POST" and _is_call(path) and gradio_app is not None and \
                not (login_on and _user(scope, gradio_app) is None):       # else Gradio answers 401
            return await self._call(scope, receive, send, gradio_app, path)
        return await self.app(scope, receive, send)

    # -- /login
    async def _login(self, scope, receive, send):
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.limiter.wait_s(client)
        if wait > 0:
            return await _reply(send, 429, f"Too many failed logins: try again in {math.ceil(wait)} s.",
                                headers=[(b"retry-after", str(math.ceil(wait)).encode())])
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        await self.app(scope, receive, watch)
        if status.get("code") == 200:
            self.limiter.succeeded(client)
        elif status.get("code") in (400, 401):
            self.limiter.failed(client)
            if self.limiter.wait_s(client) > 0:
                log.warning("failed logins from %s: locked out for %.0f s", client, self.limiter.wait_s(client))

    # -- /gradio_api/upload
    def _upload_problem(self, scope) -> tuple[int, str] | None:
        length = _content_length(scope)
        try:
            free = shutil.disk_usage(self.files).free
        except OSError:
            free = None
        if free is not None and free - (length or 0) < DISK_RESERVE:
            log.warning("upload refused: the disk of %s is nearly full", self.files)
            return 507, "The server's disk is full: the file cannot be stored now. Try again later."
        if length is not None and folder_bytes(self.files) + length > self.quota_bytes:
            log.warning("upload refused: the file folder is at its quota (ui.upload_quota_mb)")
            return 413, "The server holds as many uploaded files as it may: try again later."
        return None

    # -- API calls: /gradio_api/queue/join, /call/..., /run/..., /api/...
    async def _call(self, scope, receive, send, gradio_app, path):
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay(b"", message), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_API_BODY:
                return await _reply(send, 413, "This API call is too large.")
        problem = None
        try:
            data = json.loads(body or b"null")
            problem = check_call(gradio_app, path, data, self.files)
        except (ValueError, UnicodeDecodeError):
            data = None     # not JSON: Gradio answers that itself
        if problem:
            log.info("API call refused: %s", problem)
            return await _reply(send, 400, problem)
        if self.max_queued and path.rstrip("/") == f"{API_PREFIX}/queue/join":
            fn = _fn_of(gradio_app, path, data)
            if fn is not None and fn.concurrency_id == self.concurrency_id:
                from starlette.requests import Request
                held = queue_full(gradio_app.get_blocks(), client_key(Request(scope)), self.max_queued,
                                  self.concurrency_id)
                if held:
                    log.info("a client is at ui.max_queued_turns_per_client (%d): a turn is refused", held)
                    return await _reply(send, 429, QUEUE_FULL.format(n=held))
        return await self.app(scope, _replay(body), send)


def queue_full(blocks, client: str | None, max_queued: int, concurrency_id: str = "model") -> int:
    """How many events `client` holds in the `concurrency_id` group when that is its limit (0:
    room left, or no limit). The queue-join refusal and the chat's echo of a question ask this
    same question, so a question that will be refused is not shown as waiting."""
    held = queued_events(blocks, client, concurrency_id) if max_queued and client is not None else 0
    return held if held >= max_queued else 0


def queued_events(blocks, client: str | None, concurrency_id: str) -> int:
    """Events of `client` in the `concurrency_id` group, waiting or running."""
    queue = getattr(blocks, "_queue", None)
    if queue is None or client is None:
        return 0
    group = queue.event_queue_per_concurrency_id.get(concurrency_id)
    events = list(group.queue) if group is not None else []
    events += [e for job in queue.active_jobs if job for e in job if e.concurrency_id == concurrency_id]
    return sum(1 for e in events if not getattr(e, "closed", False) and client_key(e.request) == client)


def _fn_of(gradio_app, path: str, body: Any):
    """The event an API call runs (None: not one we know)."""
    if not isinstance(body, dict):
        return None
    fns = gradio_app.get_blocks().fns
    if isinstance(body.get("fn_index"), int):
        return fns.get(body["fn_index"])
    name = path.rstrip("/").split("/")[-1]
    return next((f for f in fns.values() if f.api_name == name), None)


def _is_call(path: str) -> bool:
    path = path.rstrip("/")
    return path == f"{API_PREFIX}/queue/join" or any(
        path.startswith(f"{API_PREFIX}/{kind}/") for kind in ("call", "run", "api"))


def check_call(gradio_app, path: str, body: Any, files: str) -> str | None:
    """What is wrong with the inputs of one API call (None: nothing we check)."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    fn = _fn_of(gradio_app, path, body)
    if fn is None:
        return None
    import gradio as gr
    from gradio_client import utils as client_utils
    for component, value in zip(fn.inputs, body["data"]):
        label = getattr(component, "label", None) or type(component).__name__
        if isinstance(component, gr.Slider):
            number_ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number_ok or not component.minimum <= value <= component.maximum:
                return (f"{label} must be a number from {component.minimum:g} to {component.maximum:g}, "
                        f"not {_short(value)}")
            continue
        if value is None or not getattr(component, "data_model", None):
            continue
        for file in _files_in(value):
            where = file.get("path") if isinstance(file, dict) else file
            if not isinstance(where, str) or client_utils.is_http_url_like(where) or not inside(where, files):
                return f"{label}: {_short(where)} is not a file uploaded to this server; upload it first"
            types = getattr(component, "file_types", None)
            if types and not client_utils.is_valid_file(where, types):
                return f"{label}: only images can be uploaded or attached ({os.path.basename(where)[:80]!r} is not one)"
        try:
            component.data_model.model_validate(value)
        except Exception:           # pydantic's ValidationError and its kin
            return f"{label} is not valid input for /{fn.api_name}: {_short(value)}"
    return None


def _files_in(value: Any):
    """The file references (dicts with a path or url) in an input value."""
    if isinstance(value, dict):
        if "path" in value or "url" in value:
            if value.get("path") is None and value.get("url") is not None:
                yield {"path": value["url"]}
            else:
                yield value
            return
        for item in value.values():
            yield from _files_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _files_in(item)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _user(scope, gradio_app) -> str | None:
    from starlette.requests import Request
    cookies = Request(scope).cookies
    cookie_id = getattr(gradio_app, "cookie_id", "")
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return getattr(gradio_app, "tokens", {}).get(token) if token else None


def _content_length(scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, first: dict | None = None):
    sent = False

    async def receive():
        nonlocal sent
        if first is not None:
            return first
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}
    return receive


async def _reply(send, status: int, detail: str, headers: list | None = None) -> None:
    payload = json.dumps({"detail": detail, "error": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


# ---- the model queue --------------------------------------------------------------------------

class FairQueue(list):
    """Gradio's waiting list of one concurrency group, kept in round-robin order of sessions: a
    new event goes after every event of the sessions that have no more events waiting than it
    does, i.e. session A's 6 waiting turns and B's 1 are served A, B, A, A, A, A, A."""

    def append(self, event) -> None:
        key = getattr(event, "session_hash", None)
        mine = sum(1 for e in self if getattr(e, "session_hash", None) == key)
        seen: dict[Any, int] = defaultdict(int)
        for index, other in enumerate(self):
            other_key = getattr(other, "session_hash", None)
            if seen[other_key] > mine:       # the first event of a later round: go before it
                self.insert(index, event)
                return
            seen[other_key] += 1
        super().append(event)


def share_model_queue(demo, concurrency_id: str = "model") -> bool:
    """Make the waiting list of `concurrency_id` a FairQueue (before anything is queued)."""
    queue = getattr(demo, "_queue", None)
    fn = next((f for f in demo.fns.values() if f.concurrency_id == concurrency_id), None)
    if queue is None or fn is None:
        return False
    queue.create_event_queue_for_fn(fn)
    events = queue.event_queue_per_concurrency_id[concurrency_id]
    if not isinstance(events.queue, FairQueue):
        events.queue = FairQueue(events.queue)
    return True
