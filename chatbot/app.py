"""The CoRGI Chat web UI: the Blocks layout and its event handlers.

Every handler returns (or streams) the same outputs, built by CorgiApp.outputs from the tab's
UserSession; panels that did not change are sent as gr.skip(). All events that run the model
share one queue (concurrency_id="model", limit 1), so users wait their turn and see their place
in the queue on the chat. Rendering lives in render.py; this file only wires events to it.

Endpoints (gradio_client, one Client per session):
    /set_image(upload)                                  upload = handle_file(path)
    /ask(message, max_steps, max_regions, reasoning_tokens, evidence_tokens, synthesis_tokens)
                                                        message = {"text": str, "files": [image]}
    /regenerate(max_steps, ..., synthesis_tokens)       the last question again
    /stop()                                             after job.cancel() of the running /ask
    /new_conversation()
    /stats()                                            read-only memory figures (see CorgiApp.stats)
each returning (chat messages, boxes image, region crops, timings table, prompts and raw text,
parsed turns JSON, trace file); /ask adds the emptied textbox.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
import torch
from gradio import processing_utils

from corgi.config import Config, PipelineConfig
from corgi.engine.tiny import default_cache_dir, is_tiny_name
from corgi.engine.engine import Engine
from corgi.images import ImageError, image_digest, load_image
from corgi.pipeline import ChatSession, InputError
from corgi.types import TextDelta

from . import limits, render
from .render import BOXES, CHAT, DEBUG, GALLERY, TIMINGS
from .sessions import SessionStore, UserSession

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MB = 1024 * 1024
THROTTLE_S = 0.05          # at most ~20 chat updates a second while tokens stream
STOP_WAIT_S = 15.0         # how long Stop / New conversation wait for a cancelled turn to unwind
ALL = frozenset({CHAT, BOXES, GALLERY, TIMINGS, DEBUG})
# Raw model output streams into code blocks; wrap it so a long line stays readable.
CSS = "#chat pre, #chat pre code { white-space: pre-wrap; overflow-wrap: anywhere; }"

# (PipelineConfig field, slider label, lowest, highest) of the settings accordion.
SETTINGS = [
    ("max_steps", "Max reasoning steps", 1, 20),
    ("max_regions", "Max regions to read", 1, 20),
    ("reasoning_max_new_tokens", "Token budget: reasoning", 16, 4096),
    ("evidence_max_new_tokens", "Token budget: evidence (per region)", 1, 512),
    ("synthesis_max_new_tokens", "Token budget: answer", 16, 4096),
]


def stream_diff(old: Any, new: Any) -> list:
    """gradio.utils.diff (the edits that turn one streamed output into the next), with list
    deletions that stay right when nested lists shrink too.

    Gradio 6.31 shifts the index of *every* delete edit under a list, nested ones included, so
    a table whose rows each lose a cell (the timings of a turn that failed lose its column)
    arrives corrupted in the browser and makes gradio_client raise IndexError. Here nested
    edits keep their indices and a list's own tail is deleted from the end."""
    edits: list = []

    def walk(a: Any, b: Any, path: list) -> None:
        if a == b:
            return
        if type(a) is not type(b):
            edits.append(["replace", path, b])
        elif isinstance(a, str) and b.startswith(a):
            edits.append(["append", path, b[len(a):]])
        elif isinstance(a, list):
            common = min(len(a), len(b))
            for i in range(common):
                walk(a[i], b[i], path + [i])
            edits.extend(["delete", path + [i], None] for i in reversed(range(common, len(a))))
            edits.extend(["add", path + [i], b[i]] for i in range(common, len(b)))
        elif isinstance(a, dict):
            for key in a:
                if key in b:
                    walk(a[key], b[key], path + [key])
                else:
                    edits.append(["delete", path + [key], None])
            edits.extend(["add", path + [key], b[key]] for key in b if key not in a)
        else:
            edits.append(["replace", path, b])

    walk(old, new, [])
    return edits


gr.utils.diff = stream_diff      # Blocks.handle_streaming_diffs looks it up at each update


def save_pil_to_cache(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """gradio.processing_utils.save_pil_to_cache, minus its rewrite in place.

    Gradio 6.31 names the file by a hash of its bytes, then `write_bytes` it again on every
    postprocess: each streamed update that carries the boxes image or the region crops truncates
    and rewrites the very file a browser may be downloading, which then gets a cut-off image (and
    the server logs "Too little data for declared Content-Length"). The content is in the name,
    so an existing file is already right: touch it (delete_cache ages files by ctime) and keep it;
    a new one is written under a temporary name and renamed into place."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    path = (folder / f"{name}.{format}").resolve()
    if path.exists():
        with contextlib.suppress(OSError):
            os.utime(path)
        return str(path)
    staging = None
    try:
        folder.mkdir(exist_ok=True, parents=True)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(staging, path)
    except BaseException as exc:
        if staging:
            with contextlib.suppress(OSError):
                os.unlink(staging)
        if isinstance(exc, OSError):    # a full disk: one clear message for this update, no traceback
            log.warning("an image for the browser could not be written (%s)", exc.strerror or type(exc).__name__)
            raise gr.Error(limits.DISK_FULL, print_exception=False) from None
        raise
    return str(path)


# Gradio's image, gallery and annotated-image components look it up on the module at each call.
processing_utils.save_pil_to_cache = save_pil_to_cache


def is_twin(*names: str) -> bool:
    """Whether the loaded model is an embedded random-weight twin: a "tiny-"/"small-" name, or a
    folder in the twin cache (where tiny.py builds them)."""
    cache = str(default_cache_dir().expanduser().resolve())
    for name in names:
        if not isinstance(name, str):
            continue
        if is_tiny_name(name) or name.startswith(("tiny-", "small-")):
            return True
        with contextlib.suppress(OSError, ValueError):
            if os.path.isdir(name) and str(Path(name).resolve()).startswith(cache + os.sep):
                return True
    return False


def pipeline_settings(base: PipelineConfig, values: tuple) -> PipelineConfig:
    """The accordion's values on a copy of the configured PipelineConfig (None: keep the default)."""
    changes = {}
    for (name, label, low, high), value in zip(SETTINGS, values):
        if value is None:
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{label.lower()} must be a whole number, not {value!r}") from None
        if not low <= number <= high:
            raise InputError(f"{label.lower()} must be between {low} and {high}, not {number}")
        changes[name] = number
    return replace(base, **changes)


def upload_path(upload: Any) -> tuple[str, str] | None:
    """(path, file name) of an upload as Gradio hands it over unprocessed (a FileData dict) or a path."""
    if not upload:
        return None
    if isinstance(upload, dict):
        path = upload.get("path")
        return (path, upload.get("orig_name") or os.path.basename(path)) if path else None
    return str(upload), os.path.basename(str(upload))


def idle_expiry(store: SessionStore) -> Callable[[Any], None]:
    """gr.State's delete_callback: free a session that was idle for ui.idle_timeout_s.

    Gradio keeps this callback in the page config (Block.get_config lists every constructor
    argument) and deep-copies that config on every `GET /` and `GET /config` (gradio/routes.py:
    `get_page_config`, `utils.safe_deepcopy(source_config)`). A bound method would be copied with
    its owner, and CorgiApp reaches the engine and every weight tensor; its locks then make the
    copy fail, and safe_deepcopy retries level by level, copying the model again each time:
    seconds and hundreds of MiB per page load on a real checkpoint. A plain function is
    copied as itself (`copy` treats functions as atomic), and this one reaches the store only
    through a weak reference, so nothing reachable from the page config leads to the model."""
    store_ref = weakref.ref(store)

    def expire(session: Any) -> None:
        if isinstance(session, UserSession):
            log.info("freeing an idle session")
            live = store_ref()
            if live is not None:
                live.close(session.key)
            session.close()

    return expire


class CorgiApp:
    def __init__(self, engine: Engine, config: Config):
        self.engine, self.config = engine, config
        self.store = SessionStore(config.ui.max_sessions)
        # Never a bound method of self in the Blocks config: see idle_expiry.
        self.expire = idle_expiry(self.store)
        # Gradio's queue already runs one model event at a time; this lock covers the moment
        # after a Stop when the queue has moved on but the cancelled turn is still unwinding.
        self.model_lock = threading.Lock()
        self._traces = tempfile.TemporaryDirectory(prefix="corgi-chat-")   # removed at exit
        lm = engine.lm
        self.twin = is_twin(lm.model_id, config.model.id)
        self.model_info = {"id": lm.model_id, "family": lm.family.name,
                           "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)}

    # ---- layout --------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        pipe, ui = self.config.pipeline, self.config.ui
        with gr.Blocks(title="CoRGI Chat", delete_cache=(1800, 3600)) as demo:
            # Everything handed to a component here ends up in the page config, which Gradio
            # deep-copies per page load: plain values and model-free callbacks only.
            state = gr.State(None, time_to_live=ui.idle_timeout_s, delete_callback=self.expire)
            gr.Markdown(f"## CoRGI Chat\nGrounded visual reasoning: the model writes steps, marks the "
                        f"regions they depend on (S1, S2 ...), reads those regions, then answers. "
                        f"Model: `{self.model_info['id']}` on {self.model_info['device']}.")
            if self.twin:
                gr.Markdown(render.NOISE_WARNING, elem_id="noise-warning")
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=240):
                    image_in = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                        height=220, elem_id="image-input")
                    examples = sorted(ASSETS.glob("*.png"))
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=[image_in], label="Example images")
                    with gr.Accordion("Settings", open=False):
                        sliders = [gr.Slider(low, max(high, getattr(pipe, name)), step=1,
                                             value=getattr(pipe, name), label=label)
                                   for name, label, low, high in SETTINGS]
                with gr.Column(scale=5, min_width=420):
                    chatbot = gr.Chatbot(label="Conversation", height="max(300px, calc(100vh - 400px))", elem_id="chat",
                                         placeholder="Upload an image (or pick an example), then ask about it.")
                    textbox = gr.MultimodalTextbox(placeholder="Ask about the image (the clip attaches a new image)",
                                                   file_types=["image"], sources=["upload"], show_label=False,
                                                   elem_id="question")
                    with gr.Row():
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                        regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                        new_btn = gr.Button("New conversation", elem_id="new-conversation")
                with gr.Column(scale=4, min_width=320):
                    # No floating label on the image: it would cover boxes in the top-left corner.
                    gr.Markdown("**Steps on the image**: S1, S2 ... as the model marked them; "
                                "red: look at an object, blue: read text.")
                    boxes_img = gr.Image(show_label=False, type="pil", format="jpeg", interactive=False,
                                         height=300, elem_id="boxes")
                    # fit_columns=False: one region would otherwise fill the panel and hide its caption.
                    gallery = gr.Gallery(label="Regions read (crop and caption)", columns=3, height=230,
                                         fit_columns=False, object_fit="contain", format="jpeg", elem_id="regions")
                    timings = gr.Dataframe(label="Timings (s) and cache, per turn", interactive=False,
                                           elem_id="timings", max_height=560)
                    trace_btn = gr.DownloadButton("Download trace (JSON)", value=None, interactive=False,
                                                  size="sm", elem_id="trace")
            with gr.Accordion("Debug: prompts, raw output and parsed result per turn", open=False):
                debug_code = gr.Code(label="Prompts and raw model output", language=None, lines=16,
                                     max_lines=40, interactive=False)
                debug_json = gr.JSON(label="Parsed turns (TurnResult JSON plus prompts)")

            outputs = [state, chatbot, boxes_img, gallery, timings, debug_code, debug_json, trace_btn]
            model = dict(concurrency_id="model", concurrency_limit=1, show_progress="full",
                         show_progress_on=[chatbot])
            # preprocess=False: the handler gets the raw upload and checks it itself, so a bad
            # file is answered in the chat instead of failing inside Gradio's image decoding.
            image_in.change(self.set_image, [state, image_in], outputs, preprocess=False,
                            api_name="set_image", **model)
            # Two listeners on submit: an instant echo (no queue) so the question shows at once,
            # then the turn itself in the model queue. The turn clears the textbox when it starts:
            # cleared any earlier, the turn could read the empty box instead of the question.
            textbox.submit(self.echo, [chatbot, textbox], [chatbot], queue=False, show_progress="hidden",
                           api_visibility="private")
            ask_event = textbox.submit(self.ask, [state, textbox, *sliders], [*outputs, textbox],
                                       api_name="ask", **model)
            regen_event = regen_btn.click(self.regenerate, [state, *sliders], outputs,
                                          api_name="regenerate", **model)
            # Stop first cancels the running turn (that closes its generator, which stops the
            # model), *then* shows the result: the browser runs a listener's cancels only after
            # its function returns, and self.stop waits for the cancelled turn to unwind.
            turns = [ask_event, regen_event]
            stop_btn.click(None, None, None, cancels=turns).then(
                self.stop, [state], outputs, api_name="stop", concurrency_limit=None)
            new_btn.click(None, None, None, cancels=turns).then(
                self.new_conversation, [state], outputs, api_name="new_conversation", concurrency_limit=None)
            demo.unload(self.unload)
            # Read-only memory figures (no inputs, no session): the load test reads them.
            gr.api(self.stats, api_name="stats", queue=False)
        return demo

    # ---- outputs ---------------------------------------------------------------------
    def outputs(self, session: UserSession, panels=ALL) -> tuple:
        s, skip = session, gr.skip()
        results = s.results
        if s.live is not None:
            evidence = s.live.evidence_list()
        else:
            evidence = results[-1].evidence if results else []
        return (
            s,
            s.messages() if CHAT in panels else skip,
            self._boxes(s) if BOXES in panels else skip,
            (render.gallery_items(s.image, evidence, self.config.pipeline.crop_padding) if s.image else [])
            if GALLERY in panels else skip,
            render.timings_table(s.warmup, results, s.live) if TIMINGS in panels else skip,
            render.debug_text(results) if DEBUG in panels else skip,
            render.debug_json(results) if DEBUG in panels else skip,
            gr.DownloadButton(value=s.trace_path, interactive=s.trace_path is not None) if DEBUG in panels else skip,
        )

    def _boxes(self, s: UserSession) -> Any:
        """The boxes image, drawn at display size; gr.skip() when what it shows has not changed
        since this session last sent it (the same image is never re-sent)."""
        if s.image is None:
            key = None
        else:
            key = (s.image_digest, render.steps_signature(s.latest_steps()))
        if key == getattr(s, "boxes_key", object()):
            return gr.skip()
        s.boxes_key = key
        return render.draw_boxes(s.image, s.latest_steps()) if s.image is not None else None

    def session(self, state: Any, request: gr.Request | None) -> UserSession:
        if isinstance(state, UserSession) and not state.closed and not state.refused:
            return state
        key = getattr(request, "session_hash", None) or uuid.uuid4().hex
        return self.store.get(key)

    # ---- handlers ------------------------------------------------------------------------
    def set_image(self, state, upload, request: gr.Request) -> Iterator[tuple]:
        """Load the uploaded image, start a ChatSession on it and warm it up (encode the image,
        prefill the conversation head) so the first question starts decoding at once."""
        session = self.session(state, request)
        found = upload_path(upload)
        if found is None:   # the image was removed
            with session.lock:
                session.set_image(None)
            yield self.outputs(session)
            return
        yield from self._load_image(session, *found)

    def echo(self, history, message):
        """Show the question (or the attached image) at once, while the turn waits for the model."""
        message = message or {}
        text = (message.get("text") or "").strip()
        history = list(history or [])
        if text:
            history += [{"role": "user", "content": text},
                        render.status_message("Waiting for the model", "", done=False)]
        elif message.get("files"):
            history += [render.status_message("Loading the image", "", done=False)]
        return history

    def ask(self, state, message, max_steps, max_regions, reasoning_tokens, evidence_tokens,
            synthesis_tokens, request: gr.Request) -> Iterator[tuple]:
        """One turn: the question through the four phases, streamed into the chat and panels.
        Outputs: the common ones plus the textbox, emptied by the first update."""
        values = (max_steps, max_regions, reasoning_tokens, evidence_tokens, synthesis_tokens)
        cleared = gr.MultimodalTextbox(value=None)
        updates = self._ask(state, message, values, request)
        try:
            for update in updates:
                yield (*update, cleared)
                cleared = gr.skip()
        finally:
            updates.close()     # on Stop, at once: this is what stops the model

    def _ask(self, state, message, values, request) -> Iterator[tuple]:
        session = self.session(state, request)
        if isinstance(message, str):
            message = {"text": message, "files": []}
        message = message or {}
        text = (message.get("text") or "").strip()
        files = message.get("files") or []
        if files:
            loaded = yield from self._load_image(session, *upload_path(files[-1]))
            if not loaded or not text:
                return
        with session.lock:
            problem, settings = None, None
            if not text:
                problem = "Please type a question about the image."
            elif session.image is None:
                problem = ("There is no image yet (or this session was idle too long): upload an image "
                           "or pick an example, then ask about it.")
            else:
                try:
                    settings = pipeline_settings(self.config.pipeline, values)
                except InputError as exc:
                    problem = f"These settings cannot be used: {exc}."
            if problem:
                if text:
                    session.history.append({"role": "user", "content": text})
                session.history.append(render.notice(problem))
                yield self.outputs(session, {CHAT})
                return
            yield from self._turn(session, text, settings)

    def regenerate(self, state, max_steps, max_regions, reasoning_tokens, evidence_tokens,
                   synthesis_tokens, request: gr.Request) -> Iterator[tuple]:
        """Ask the last question again, after forgetting its answer (and its tokens)."""
        values = (max_steps, max_regions, reasoning_tokens, evidence_tokens, synthesis_tokens)
        session = self.session(state, request)
        with session.lock:
            try:
                settings = pipeline_settings(self.config.pipeline, values)
            except InputError as exc:
                session.history.append(render.notice(f"These settings cannot be used: {exc}."))
                yield self.outputs(session, {CHAT})
                return
            with self.model_lock:
                turn = session.drop_last_turn()
            if turn is None or session.image is None:
                session.history.append(render.notice("Nothing to regenerate yet: ask a question first."))
                yield self.outputs(session)
                return
            yield from self._turn(session, turn.question, settings)

    def stop(self, state, request: gr.Request) -> tuple:
        """Show the conversation once the cancelled turn has unwound (Gradio cancels it via
        `cancels=`: closing its generator stops the model and cuts the conversation back)."""
        session = self.session(state, request)
        got = session.lock.acquire(timeout=STOP_WAIT_S)
        try:
            return self.outputs(session)
        finally:
            if got:
                session.lock.release()

    def new_conversation(self, state, request: gr.Request) -> tuple:
        """Forget the turns and free the KV cache; the image stays for the next question."""
        session = self.session(state, request)
        if not session.lock.acquire(timeout=STOP_WAIT_S):
            return self.outputs(session)    # a turn that would not unwind: leave it be
        try:
            with self.model_lock:
                session.new_conversation()
            if session.image is not None:
                session.history.append(render.notice(
                    f"New conversation. The image **{session.image_name}** is still loaded: ask about it, "
                    "or attach another one."))
            return self.outputs(session)
        finally:
            session.lock.release()

    def unload(self, request: gr.Request) -> None:
        """The tab was closed or reloaded: free its session now rather than at the idle time-out."""
        if request is not None and request.session_hash and self.store.close(request.session_hash):
            log.info("a tab was closed: its session is freed")

    def stats(self) -> dict:
        """Cache memory in bytes against its configured budget, and the live session count."""
        engine = self.engine
        with self.model_lock:     # a consistent snapshot, between two model steps
            # kv_bytes includes the hybrid models' linear-state snapshots (also shown alone);
            # the budget covers kv_bytes + static_bytes (the compiled decoder's buffers).
            return {"kv_bytes": engine.kv_bytes_total(), "kv_budget_bytes": engine.kv_budget,
                    "snapshot_bytes": engine.snapshot_bytes_total(), "static_bytes": engine.static_bytes(),
                    "vision_bytes": engine.vision.cached_bytes, "vision_budget_bytes": engine.vision.cache_bytes,
                    "sessions": len(self.store), "image_bytes": self.store.image_bytes()}

    # ---- the work ------------------------------------------------------------------------
    def _load_image(self, session: UserSession, path: str, name: str) -> Iterator[tuple]:
        """Check and load an image file, start a fresh ChatSession on it, warm it up.
        Returns (as a generator's return value) whether the image can be asked about."""
        cfg = self.config.image
        try:
            limits.check_upload(session, path, name, ASSETS)
            image = load_image(path, cfg.max_input_pixels, max_kept_pixels=cfg.max_kept_pixels,
                               max_file_mb=min(self.config.ui.max_upload_mb, cfg.max_file_mb))
        except ImageError as exc:
            limits.discard_upload(path, limits.upload_folder())    # refused: not kept on the disk
            with session.lock:
                session.set_image(None)
                hint = " Please upload a PNG, JPEG, WebP or GIF image." if "format" in str(exc) else ""
                session.history.append(render.notice(f"This file cannot be used: {exc}{hint}"))
            yield self.outputs(session)
            return False
        digest = image_digest(image)
        with session.lock:
            if session.image is not None and digest == session.image_digest and session.chat is not None:
                yield self.outputs(session, {CHAT})    # the same picture again: keep the conversation
                return True
            session.set_image(image, name, digest)
            title = f"Encoding the image {name}"
            session.history.append(render.status_message(title, "", done=False))
            yield self.outputs(session)
            t0 = time.perf_counter()
            try:
                with self.model_lock:
                    session.chat = ChatSession(self.engine, image)
                    stats = session.chat.warm_up()
            except InputError as exc:     # its message already says "this image cannot be used: ..."
                session.set_image(None)
                session.history.append(render.notice(f"{str(exc)[:1].upper()}{str(exc)[1:]}."))
                yield self.outputs(session)
                return False
            except Exception as exc:
                log.exception("warm-up failed")
                session.chat = None     # the next question starts a new one
                session.history[-1] = render.status_message(title, "", done=True)
                session.history.append(render.notice(f"The model failed on this image: "
                                                     f"{type(exc).__name__}: {exc}"))
                yield self.outputs(session)
                return True
            seconds = time.perf_counter() - t0
            session.warmup = (stats, seconds)
            # A plain message, not a collapsed one: "ready, ask away" is meant to be read.
            session.history[-1] = render.notice(
                f"Image **{name}** ({image.width}x{image.height} pixels) is encoded and ready "
                f"({seconds:.2f} s). Ask a question about it.")
            yield self.outputs(session)
            return True

    def _turn(self, session: UserSession, question: str, settings: PipelineConfig) -> Iterator[tuple]:
        """Stream one turn. The caller holds session.lock."""
        if session.chat is None:     # after New conversation or a failed warm-up
            try:
                with self.model_lock:
                    session.chat = ChatSession(self.engine, session.image)
            except Exception as exc:
                log.exception("could not start a conversation")
                session.history.append(render.notice(f"The model failed on this image: "
                                                     f"{type(exc).__name__}: {exc}"))
                yield self.outputs(session, {CHAT})
                return
        view = render.TurnView(question, len(session.results) + 1, settings.max_regions,
                               note=render.NOISE_NOTE if self.twin else None)
        session.begin_turn(view)
        yield self.outputs(session, {CHAT, BOXES, GALLERY, TIMINGS})   # the pending phase, at once
        events = session.chat.ask(question, settings)
        changed: set[str] = set()
        last = 0.0
        try:
            while True:
                with self.model_lock:
                    event = next(events, None)
                if event is None:
                    break
                changed |= view.apply(event)
                now = time.monotonic()
                # Every event but a text delta ends or starts something: always show those.
                if not isinstance(event, TextDelta) or now - last >= THROTTLE_S:
                    yield self.outputs(session, changed | {TIMINGS})
                    changed, last = set(), now
        except GeneratorExit:   # Stop: Gradio closes this generator
            view.end("Stopped. The conversation goes on from before this question.")
            raise
        except InputError as exc:
            view.end(f"This question cannot be asked: {exc}.")
        except torch.OutOfMemoryError:
            log.exception("out of memory in a turn")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()    # hand the failed turn's blocks back before the next one
            view.end("The model ran out of memory on this turn. The conversation goes on from before "
                     "this question: try again, lower the token budgets or regions, or start a New conversation.")
        except Exception as exc:
            log.exception("turn failed")
            view.end(f"The model failed on this turn: {type(exc).__name__}: {exc}")
        finally:
            with self.model_lock:
                events.close()      # stops the engine loop; ChatSession.ask cuts the turn's tokens
            session.end_turn()
            if view.result is not None:
                self._write_trace(session)
            if session.closed:      # the tab went away while this turn ran
                session.set_image(None)
        yield self.outputs(session)

    def _write_trace(self, session: UserSession) -> None:
        """The CLI's --json object for this session's turns, for the Download trace button."""
        folder = Path(self._traces.name) / hashlib.sha256(session.key.encode()).hexdigest()[:16]
        path = folder / "corgi-trace.json"
        try:
            folder.mkdir(exist_ok=True)
            path.write_text(json.dumps(render.trace(self.model_info, session.results), ensure_ascii=False,
                                       indent=1), encoding="utf-8")
        except OSError as exc:      # a full disk: the turn stands, only its download is missing
            log.warning("the trace could not be written (%s)", exc.strerror or type(exc).__name__)
            with contextlib.suppress(OSError):
                path.unlink()
            session.trace_path = None
            return
        session.trace_path = str(path)


def build_app(engine: Engine, config: Config) -> gr.Blocks:
    return CorgiApp(engine, config).build()
