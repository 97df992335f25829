"""The CoRGI Chat web UI: the Blocks layout and its event handlers.

Every handler returns (or streams) the same outputs, built by CorgiApp.outputs from the tab's
UserSession; panels that did not change are sent as gr.skip(). All events that run the model
share one queue (concurrency_id="model", limit 1), so users wait their turn and see their place
in the queue on the chat. Rendering lives in render.py; this file only wires events to it.

Endpoints (gradio_client, one Client per session):
    /set_image(uploads)             uploads = [handle_file(path), ...] (several: camera views):
                                    before the first question they start the conversation,
                                    after it they join it (the next question is about them)
    /ask(message, max_steps, max_regions, reasoning_tokens, evidence_tokens, synthesis_tokens, plain)
                                    message = {"text": str, "files": [images that join first]}
    /regenerate(max_steps, ..., synthesis_tokens, plain)   the last question again
    /stop()                         after job.cancel() of the running /ask
    /new_conversation()
    /pick_step(S number)            highlight a step's box and crop, show its caption
    /stats()                        read-only memory figures (see CorgiApp.stats)
each returning (chat messages, boxes image, region crops, timings table, prompts and raw text,
parsed turns JSON, trace file, conversation images, step list, picked step, timeline, report
file, Stop, Regenerate); /ask adds the emptied textbox.

Streamed outputs keep their shapes (lists only grow within one run; the timings table keeps a
stopped turn's column), so Gradio's own diff of consecutive updates is exact. Pictures go to
the browser as files written once (display_files.py), never as PIL images re-encoded per update.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from corgi.config import Config, PipelineConfig
from corgi.engine.tiny import default_cache_dir, is_tiny_name
from corgi.engine.engine import Engine
from corgi.images import ImageError, image_digest, load_image
from corgi.pipeline import ChatSession, InputError, as_backend, clean_question
from corgi.remote import RemoteError
from corgi.types import OutOfMemory, TextDelta

from . import limits, render
from .display_files import save_jpeg
from .render import BOXES, CHAT, DEBUG, GALLERY, TIMINGS
from .report import report_html
from .sessions import ShownImage, SessionStore, UserSession, forget_gradio_session

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MB = 1024 * 1024
THROTTLE_S = 0.05          # at most ~20 chat updates a second while tokens stream,
UI_SHARE = 0.2             # and Gradio's work on them at most ~20% of the turn's time
STOPPED_QUEUED = "Stopped before the model started on this question: ask it again when you are ready."
HELD_QUESTION = ("{what} was not sent: this tab asks one question at a time. It is still in the "
                 "question box: press Enter to send it now.")
STOP_WAIT_S = 15.0         # how long Stop / New conversation wait for a cancelled turn to unwind
IMAGES, BUTTONS = "images", "buttons"
ALL = frozenset({CHAT, BOXES, GALLERY, TIMINGS, DEBUG, IMAGES, BUTTONS})
THUMB_LONG_SIDE = 320      # the conversation's images in the left panel
EXAMPLE_QUESTIONS = ["What does the sign say?", "What colour is the car?", "What is the total on the receipt?",
                     "How many shapes are there, and which is largest?"]
# Raw model output streams into code blocks; wrap it so a long line stays readable. Presenter
# mode (a switch) enlarges the text for a meeting-room screen.
CSS = """#chat pre, #chat pre code { white-space: pre-wrap; overflow-wrap: anywhere; }
body.corgi-presenter #chat, body.corgi-presenter #picked, body.corgi-presenter #question textarea { font-size: 1.3rem; }
body.corgi-presenter #chat table { font-size: 1.2rem; }
body.corgi-presenter .tl { font-size: 15px; }
#buttons button { min-width: 0; }"""
PRESENTER_JS = "(on) => { document.body.classList.toggle('corgi-presenter', on); return []; }"

# (PipelineConfig field, slider label, lowest, highest) of the settings accordion.
SETTINGS = [
    ("max_steps", "Max reasoning steps", 1, 20),
    ("max_regions", "Max regions to read", 1, 20),
    ("reasoning_max_new_tokens", "Token budget: reasoning", 16, 4096),
    ("evidence_max_new_tokens", "Token budget: evidence (per region)", 1, 512),
    ("synthesis_max_new_tokens", "Token budget: answer", 16, 4096),
]


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


def pipeline_settings(base: PipelineConfig, values: tuple, plain: Any = None) -> PipelineConfig:
    """The accordion's values on a copy of the configured PipelineConfig (None: keep the default);
    `plain`: also answer plainly, for comparison (None: as configured)."""
    changes: dict[str, Any] = {}
    if plain is not None:
        if not isinstance(plain, bool):
            raise InputError(f"the plain-answer switch must be true or false, not {plain!r}")
        changes["plain_answer"] = plain
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
        return (path, upload.get("orig_name") or os.path.basename(path)) if isinstance(path, str) and path else None
    if isinstance(upload, (str, os.PathLike)):
        return str(upload), os.path.basename(str(upload))
    return None


def upload_paths(uploads: Any) -> list[tuple[str, str]]:
    """Every (path, name) of one upload or a list of them (the upload button takes several)."""
    items = uploads if isinstance(uploads, (list, tuple)) else [uploads]
    return [found for found in map(upload_path, items) if found is not None]


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
        # engine: the local Engine, or a backend (corgi.local / corgi.remote): the UI asks it for
        # text only, through ChatSession.
        self.backend = as_backend(engine)
        self.engine, self.config = engine, config
        self.store = SessionStore(config.ui.max_sessions, config.ui.max_sessions_per_client)
        self.demo: gr.Blocks | None = None
        # Never a bound method of self in the Blocks config: see idle_expiry.
        self.expire = idle_expiry(self.store)
        # Local: Gradio's queue already runs one model event at a time; this lock covers the moment
        # after a Stop when the queue has moved on but the cancelled turn is still unwinding.
        # A server backend runs several turns at once (the server batches): no lock.
        self.concurrency = self.backend.concurrency()
        self.model_lock = threading.Lock() if self.concurrency == 1 else contextlib.nullcontext()
        # Traces, reports and the pictures sent to the browser, one folder per session; all
        # removed at exit.
        self._files = tempfile.TemporaryDirectory(prefix="corgi-chat-")
        with open(os.path.join(self._files.name, ".owner-pid"), "w") as out:     # see sweep_stale_folders
            out.write(str(os.getpid()))
        self.model_info = self.backend.model_info()
        self.twin = is_twin(self.model_info["id"], config.model.id)

    # ---- layout --------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        pipe, ui = self.config.pipeline, self.config.ui
        with gr.Blocks(title="CoRGI Chat", delete_cache=(1800, 3600)) as demo:
            # Everything handed to a component here ends up in the page config, which Gradio
            # deep-copies per page load: plain values and model-free callbacks only.
            state = gr.State(None, time_to_live=ui.idle_timeout_s, delete_callback=self.expire)
            with gr.Row(equal_height=False):
                gr.Markdown(f"## CoRGI Chat\nGrounded visual reasoning: the model writes steps, marks the "
                            f"regions they depend on (S1, S2 ...), reads those regions, then answers. "
                            f"Model: {render.model_line(self.model_info)}.")
                presenter = gr.Checkbox(label="Presenter mode (larger text)", value=False, scale=0,
                                        min_width=200, elem_id="presenter")
            if self.twin:
                gr.Markdown(render.NOISE_WARNING, elem_id="noise-warning")
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=240):
                    upload_btn = gr.UploadButton("Upload image(s)", file_types=["image"], file_count="multiple",
                                                 variant="primary", elem_id="upload")
                    images_gallery = gr.Gallery(label="Conversation images", columns=3, height=170,
                                                allow_preview=False, object_fit="contain", elem_id="images")
                    examples = [str(p) for p in sorted(ASSETS.glob("*.png"))]
                    example_images = gr.Dataset(components=["image"], samples=[[p] for p in examples],
                                                label="Example images", type="index", samples_per_page=6,
                                                elem_id="example-images")
                    with gr.Accordion("Settings", open=False):
                        sliders = [gr.Slider(low, max(high, getattr(pipe, name)), step=1,
                                             value=getattr(pipe, name), label=label)
                                   for name, label, low, high in SETTINGS]
                        plain = gr.Checkbox(label="Also answer plainly (no grounding), to compare",
                                            value=pipe.plain_answer, elem_id="plain-answer")
                with gr.Column(scale=5, min_width=420):
                    chatbot = gr.Chatbot(label="Conversation", height="max(300px, calc(100vh - 420px))",
                                         elem_id="chat",
                                         placeholder="Upload an image (or pick an example), then ask about it.")
                    textbox = gr.MultimodalTextbox(placeholder="Ask about the image (the clip attaches an image "
                                                               "that joins the conversation)",
                                                   file_types=["image"], file_count="multiple", sources=["upload"],
                                                   show_label=False, elem_id="question")
                    with gr.Row(elem_id="buttons"):
                        stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                        regen_btn = gr.Button("Regenerate", interactive=False, elem_id="regenerate")
                        new_btn = gr.Button("New conversation", elem_id="new-conversation")
                    example_questions = gr.Dataset(components=["textbox"], samples=[[q] for q in EXAMPLE_QUESTIONS],
                                                   label="Example questions", type="values",
                                                   elem_id="example-questions")
                with gr.Column(scale=4, min_width=320):
                    # No floating label on the image: it would cover boxes in the top-left corner.
                    gr.Markdown("**Steps on the image**: S1, S2 ... as the model marked them (red: look at "
                                "an object, blue: read text, green K1 ...: the answer's key evidence). "
                                "Click a box or pick a step.")
                    boxes_img = gr.Image(show_label=False, type="filepath", interactive=False, height=300,
                                         elem_id="boxes")
                    step_pick = gr.Radio(choices=[], label="Steps", interactive=True, elem_id="step-pick")
                    picked = gr.Markdown(render.selected_markdown(None, []), elem_id="picked")
                    # fit_columns=False: one region would otherwise fill the panel and hide its caption.
                    gallery = gr.Gallery(label="Regions read (crop and caption)", columns=3, height=230,
                                         fit_columns=False, object_fit="contain", elem_id="regions")
                    timeline = gr.HTML(render.timeline_html(None, []), label="Timeline", elem_id="timeline")
                    with gr.Row():
                        trace_btn = gr.DownloadButton("Download trace (JSON)", value=None, interactive=False,
                                                      size="sm", elem_id="trace")
                        report_btn = gr.DownloadButton("Download report (HTML)", value=None, interactive=False,
                                                       size="sm", elem_id="report")
            with gr.Accordion("Debug: timings table, prompts, raw output and parsed result per turn", open=False):
                timings = gr.Dataframe(label="Timings (s) and cache, per turn", interactive=False,
                                       elem_id="timings", max_height=560)
                debug_code = gr.Code(label="Prompts and raw model output", language=None, lines=16,
                                     max_lines=40, interactive=False)
                debug_json = gr.JSON(label="Parsed turns (TurnResult JSON plus prompts)")

            outputs = [state, chatbot, boxes_img, gallery, timings, debug_code, debug_json, trace_btn,
                       images_gallery, step_pick, picked, timeline, report_btn, stop_btn, regen_btn]
            model = dict(concurrency_id="model", concurrency_limit=self.concurrency, show_progress="full",
                         show_progress_on=[chatbot])
            # preprocess=False: the handler gets the raw upload and checks it itself, so a bad
            # file is answered in the chat instead of failing inside Gradio's image decoding.
            upload_btn.upload(self.set_image, [state, upload_btn], outputs, preprocess=False,
                              api_name="set_image", **model)
            example_images.click(self.pick_example, [state, example_images], outputs,
                                 api_visibility="private", **model)
            example_questions.click(lambda sample: {"text": sample[0], "files": []}, [example_questions],
                                    [textbox], queue=False, show_progress="hidden", api_visibility="private")
            # Two listeners on submit: an instant echo (no queue) so the question shows at once,
            # then the turn itself in the model queue. The turn clears the textbox when it starts:
            # cleared any earlier, the turn could read the empty box instead of the question.
            textbox.submit(self.echo, [chatbot, textbox, state], [chatbot, stop_btn], queue=False,
                           show_progress="hidden", api_visibility="private")
            ask_event = textbox.submit(self.ask, [state, textbox, *sliders, plain], [*outputs, textbox],
                                       api_name="ask", **model)
            regen_event = regen_btn.click(self.regenerate, [state, *sliders, plain], outputs,
                                          api_name="regenerate", **model)
            # Stop first cancels the running turn (that closes its generator, which stops the
            # model), *then* shows the result: the browser runs a listener's cancels only after
            # its function returns, and self.stop waits for the cancelled turn to unwind.
            turns = [ask_event, regen_event]
            stop_btn.click(None, None, None, cancels=turns).then(
                self.stop, [state], outputs, api_name="stop", concurrency_limit=None)
            new_btn.click(None, None, None, cancels=turns).then(
                self.new_conversation, [state], outputs, api_name="new_conversation", concurrency_limit=None)
            # Picking a step reads the session only: no model, no queue, works while a turn runs.
            step_pick.input(self.pick_step, [state, step_pick], outputs, api_name="pick_step",
                            concurrency_limit=None, show_progress="hidden")
            boxes_img.select(self.select_box, [state], outputs, api_visibility="private",
                             concurrency_limit=None, show_progress="hidden")
            presenter.change(None, [presenter], None, js=PRESENTER_JS)
            demo.unload(self.unload)
            # Read-only memory figures (no inputs, no session): the load test reads them.
            gr.api(self.stats, api_name="stats", queue=False)
        self.demo = demo
        return demo

    # ---- outputs ---------------------------------------------------------------------
    def outputs(self, session: UserSession, panels=ALL) -> tuple:
        """The update for `panels`. The pictures are files this app writes; when the disk is
        full they are left out of this update (one warning per turn), nothing else fails."""
        try:
            return self._outputs(session, panels)
        except OSError as exc:
            pictures = {BOXES, GALLERY, IMAGES}
            for panel in pictures:
                session.sent.pop(panel, None)       # not shown: send them again when there is room
            turn = len(session.turns)
            if getattr(session, "disk_warned", None) != turn:
                session.disk_warned = turn
                log.warning("pictures for the browser could not be written (%s)", exc.strerror or type(exc).__name__)
                gr.Warning(limits.DISK_FULL)
            return self._outputs(session, frozenset(panels) - pictures)

    def _outputs(self, session: UserSession, panels=ALL) -> tuple:
        s, skip = session, gr.skip()
        results = s.results
        evidence = s.live.evidence_list() if s.live is not None else (results[-1].evidence if results else [])
        steps = s.latest_steps()
        step = next((x for x in steps if x.index == s.selected), None)
        boxes = BOXES in panels
        shown = [t.result for t in s.turns] + ([s.live.result] if s.live and s.live.result else [])
        return (
            s,
            s.messages() if CHAT in panels else skip,
            self._boxes(s) if boxes else skip,
            self._gallery(s, evidence) if GALLERY in panels or boxes else skip,
            render.timings_table(s.warmup, shown, s.live) if TIMINGS in panels else skip,
            render.debug_text(results) if DEBUG in panels else skip,
            render.debug_json(results) if DEBUG in panels else skip,
            gr.DownloadButton(value=s.trace_path, interactive=s.trace_path is not None) if DEBUG in panels else skip,
            self._images(s) if IMAGES in panels else skip,
            self._step_choices(s, steps) if boxes else skip,
            render.selected_markdown(step, evidence, len(s.images) > 1) if boxes or GALLERY in panels else skip,
            render.timeline_html(s.warmup, results, s.live) if TIMINGS in panels else skip,
            gr.DownloadButton(value=s.report_path, interactive=s.report_path is not None) if DEBUG in panels else skip,
            gr.Button(interactive=s.live is not None),                       # Stop: only while a turn runs
            gr.Button(interactive=s.live is None and bool(s.turns)),         # Regenerate: a turn to redo
        )

    def _folder(self, s: UserSession) -> Path:
        folder = Path(self._files.name) / hashlib.sha256(s.key.encode()).hexdigest()[:16]
        folder.mkdir(exist_ok=True)
        return folder

    def _unchanged(self, s: UserSession, panel: str, key: Any) -> bool:
        """Whether `panel` would show what this tab was last sent; records `key` otherwise."""
        if s.sent.get(panel, object()) == key:
            return True
        s.sent[panel] = key
        return False

    def _boxes(self, s: UserSession) -> Any:
        """The boxes picture (the images of the turn side by side, each with its steps' boxes
        and the answer's key evidence), a display-size JPEG; gr.skip() when unchanged."""
        shown = [i for i in s.shown_images() if i < len(s.images)]
        steps = s.latest_steps()
        keys = s.live.key_evidence if s.live is not None else (s.results[-1].key_evidence if s.results else [])
        key = (tuple(s.images[i].digest for i in shown), render.steps_signature(steps),
               tuple((k.bbox.to_list(), k.bbox.image) for k in keys if k.bbox), s.selected)
        if self._unchanged(s, BOXES, key):
            return gr.skip()
        if not shown:
            s.tiles = []
            return None
        picture, s.tiles = render.boxes_view([(i, s.images[i].image) for i in shown], steps, keys, s.selected)
        return save_jpeg(picture, self._folder(s), "boxes", quality=80)

    def _gallery(self, s: UserSession, evidence) -> Any:
        key = (tuple((e.step_index, tuple(e.bbox.to_list()), e.bbox.image, e.text) for e in evidence), s.selected)
        if self._unchanged(s, GALLERY, key):
            return gr.skip()
        folder, items = self._folder(s), []
        for crop, caption in render.gallery_items(s.image_list(), evidence, self.config.pipeline.crop_padding,
                                                  s.selected):
            items.append((save_jpeg(crop, folder, "crop"), caption))
        return items

    def _images(self, s: UserSession) -> Any:
        key = (tuple(x.digest for x in s.images), tuple(s.current))
        if self._unchanged(s, IMAGES, key):
            return gr.skip()
        folder = self._folder(s)
        return [(save_jpeg(render.thumbnail(x.image, THUMB_LONG_SIDE, framed=n in s.current), folder, "thumb"),
                 f"{n + 1}: {x.name}" + (" (current)" if n in s.current else ""))
                for n, x in enumerate(s.images)]

    def _step_choices(self, s: UserSession, steps) -> Any:
        choices = [(f"S{x.index} {x.kind.value}: {x.statement[:48]}", x.index) for x in steps]
        key = (tuple(choices), s.selected)
        if self._unchanged(s, "steps", key):
            return gr.skip()
        return gr.Radio(choices=choices, value=s.selected if any(c[1] == s.selected for c in choices) else None)

    def session(self, state: Any, request: gr.Request | None) -> UserSession:
        if isinstance(state, UserSession) and not state.closed and not state.refused:
            return state
        key = getattr(request, "session_hash", None) or uuid.uuid4().hex
        return self.store.get(key, limits.client_key(request))

    # ---- handlers ------------------------------------------------------------------------
    def set_image(self, state, upload, request: gr.Request) -> Iterator[tuple]:
        """Uploaded images: before the first question they start the conversation (several:
        camera views of one scene, one vision batch), warmed up (encoded, head prefilled) so
        the first question decodes at once; after it they join the conversation."""
        session = self.session(state, request)
        found = upload_paths(upload)
        if not found:
            with session.lock:
                session.history.append(render.notice("No image came with this upload: please choose a PNG, "
                                                     "JPEG or WebP file."))
            yield self.outputs(session, {CHAT})
            return
        yield from self._add_images(session, found)

    def pick_example(self, state, index, request: gr.Request) -> Iterator[tuple]:
        session = self.session(state, request)
        examples = sorted(ASSETS.glob("*.png"))
        if not isinstance(index, int) or not 0 <= index < len(examples):
            yield self.outputs(session, {CHAT})
            return
        yield from self._add_images(session, [(str(examples[index]), examples[index].name)])

    def echo(self, history, message, state=None, request: gr.Request = None):
        """Show the question (or the attached image) at once, while the turn waits for the model;
        Stop is live from here (it cancels a turn still waiting in the queue)."""
        message = message if isinstance(message, dict) else {}
        text = (message.get("text") or "").strip() if isinstance(message.get("text"), str) else ""
        history = list(history or [])
        if isinstance(state, UserSession) and (state.asking or state.echoed > state.started):
            # This tab's question is still queued or running: Gradio does not send another ask
            # of the same listener meanwhile (trigger_mode "once"). Not echoed, not counted; the
            # question stays in the box and the turn says so when it ends (HELD_QUESTION).
            if text or message.get("files"):
                state.held_question = f"“{render.escape_md(text)}”" if text else "The attached image"
            return history, gr.skip()
        if self._queue_full(request):
            # The ask behind this echo is refused at queue join (limits.Guard; another tab of
            # this client holds the queue): nothing echoed or counted, so the chat shows no
            # "waiting" question and a later Stop brings none back.
            return history, gr.skip()
        try:
            clean_question(text, self.config.pipeline.max_question_chars) if text else None
            askable = bool(text)
        except InputError:
            askable = False      # refused by the turn: not echoed first
        if isinstance(state, UserSession):     # every submit is one echo and one ask
            state.echoed += 1
            state.echoed_question = text if askable else ""
        if askable:
            history += [render.question_message(text),
                        render.status_message("Waiting for the model", "", done=False)]
        elif message.get("files"):
            history += [render.status_message("Loading the image", "", done=False)]
        return history, gr.Button(interactive=True)

    def ask(self, state, message, max_steps, max_regions, reasoning_tokens, evidence_tokens,
            synthesis_tokens, plain=None, request: gr.Request = None) -> Iterator[tuple]:
        """One turn: the question through the four phases, streamed into the chat and panels.
        Outputs: the common ones plus the textbox, emptied by the first update."""
        values = (max_steps, max_regions, reasoning_tokens, evidence_tokens, synthesis_tokens)
        session = self.session(state, request)
        session.started += 1
        # An echo that found the queue full a moment before a slot freed counted nothing.
        session.echoed = max(session.echoed, session.started)
        session.asking = True
        # The box is emptied when the turn starts, unless it holds a question typed meanwhile.
        cleared = gr.skip() if session.held_question else gr.MultimodalTextbox(value=None)
        updates = self._ask(session, message, values, plain)
        session.running = updates
        try:
            for update in updates:
                yield (*update, cleared)
                cleared = gr.skip()
            if self._tell_held(session):
                yield (*self.outputs(session, {CHAT}), gr.skip())
        finally:
            session.asking = False
            updates.close()     # on Stop, at once: this is what stops the model

    @staticmethod
    def _tell_held(session: UserSession) -> bool:
        """The chat note for a question typed while this tab's turn ran (HELD_QUESTION)."""
        with session.lock:
            held, session.held_question = session.held_question, ""
            if held:
                session.history.append(render.notice(HELD_QUESTION.format(what=held)))
            return bool(held)

    def _ask(self, session: UserSession, message, values, plain) -> Iterator[tuple]:
        if isinstance(message, str):
            message = {"text": message, "files": []}
        message = message if isinstance(message, dict) else {}
        text = message.get("text") if isinstance(message.get("text"), str) else ""
        text = text.strip()
        files = upload_paths(message.get("files") or [])
        if text:
            try:        # refused before anything (image, question) enters the chat or the model
                clean_question(text, self.config.pipeline.max_question_chars)
            except InputError as exc:
                with session.lock:
                    session.history.append(render.notice(f"This question cannot be asked: {exc}."))
                yield self.outputs(session)
                return
        if files:
            loaded = yield from self._add_images(session, files)
            if not loaded or not text:
                return
        with session.lock:
            problem, settings = None, None
            if not text:
                problem = "Please type a question about the image."
            elif session.refused:
                problem = session.refused
            elif session.image is None:
                problem = ("There is no image yet (or this session was idle too long): upload an image "
                           "or pick an example, then ask about it.")
            else:
                try:
                    settings = pipeline_settings(self.config.pipeline, values, plain)
                except InputError as exc:
                    problem = f"These settings cannot be used: {exc}."
            if problem:
                if text:
                    session.history.append(render.question_message(text))
                session.history.append(render.notice(problem))
                yield self.outputs(session)
                return
            yield from self._turn(session, text, settings)

    def _queue_full(self, request) -> int:
        """The client's held model events when that is its ui.max_queued_turns_per_client (0: room)."""
        if self.demo is None or request is None:
            return 0
        return limits.queue_full(self.demo, limits.client_key(request), self.config.ui.max_queued_turns_per_client)

    def regenerate(self, state, max_steps, max_regions, reasoning_tokens, evidence_tokens,
                   synthesis_tokens, plain=None, request: gr.Request = None) -> Iterator[tuple]:
        """Ask the last question again, after forgetting its answer (and its tokens)."""
        values = (max_steps, max_regions, reasoning_tokens, evidence_tokens, synthesis_tokens)
        session = self.session(state, request)
        updates = self._regenerate(session, values, plain)
        session.running = updates
        try:
            yield from updates
        finally:
            updates.close()

    def _regenerate(self, session: UserSession, values, plain) -> Iterator[tuple]:
        with session.lock:
            try:
                settings = pipeline_settings(self.config.pipeline, values, plain)
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
        got = self._unwind(session)
        try:
            if got and session.echoed > session.started:    # cancelled before its turn began
                session.started = session.echoed
                if session.echoed_question:
                    session.history += [render.question_message(session.echoed_question),
                                        render.notice(STOPPED_QUEUED)]
            if got and session.held_question:
                session.history.append(render.notice(HELD_QUESTION.format(what=session.held_question)))
                session.held_question = ""
            return self.outputs(session)
        finally:
            if got:
                session.lock.release()

    @staticmethod
    def _unwind(session: UserSession) -> bool:
        """Take the session's lock once its cancelled turn has ended (False: it would not end).
        Gradio closes a cancelled turn's generator only if its first step had returned (the
        iterator is stored after that step): cancelled during that step, the generator is left
        suspended at its first update, holding the session. Stop closes it itself then."""
        deadline = time.monotonic() + STOP_WAIT_S
        while not session.lock.acquire(timeout=0.05):
            running = session.running
            if running is not None and inspect.getgeneratorstate(running) == inspect.GEN_SUSPENDED:
                try:
                    running.close()    # runs the turn's own Stop path (GeneratorExit) here
                except ValueError:
                    pass               # resumed meanwhile ("already executing"): it ends by itself
            if time.monotonic() > deadline:
                return False
        return True

    def new_conversation(self, state, request: gr.Request) -> tuple:
        """Forget the turns and free the KV cache; the current images stay for the next question."""
        session = self.session(state, request)
        if not self._unwind(session):
            return self.outputs(session)    # a turn that would not unwind: leave it be
        try:
            session.started = max(session.started, session.echoed)   # a cancelled queued question
            session.held_question = ""
            with self.model_lock:
                session.new_conversation()
            if session.images:
                names = ", ".join(f"**{render.escape_md(x.name)}**" for x in session.images)
                session.history.append(render.notice(
                    f"New conversation. The image{'s' * (len(session.images) > 1)} {names} "
                    f"{'are' if len(session.images) > 1 else 'is'} still loaded: ask about "
                    f"{'them' if len(session.images) > 1 else 'it'}, or upload another one."))
            return self.outputs(session)
        finally:
            session.lock.release()

    def pick_step(self, state, index, request: gr.Request) -> tuple:
        """Highlight step `index` (its S number): its box on the image, its crop; show what it
        says and what its region showed. Another pick of the same step clears it."""
        session = self.session(state, request)
        known = {x.index for x in session.latest_steps()}
        session.selected = index if isinstance(index, int) and index in known else None
        return self.outputs(session, {BOXES, GALLERY})

    def select_box(self, state, evt: gr.SelectData, request: gr.Request) -> tuple:
        """A click on the boxes picture picks the smallest step box under it."""
        session = self.session(state, request)
        point = evt.index if isinstance(evt.index, (list, tuple)) and len(evt.index) == 2 else None
        found = render.step_at(session.tiles, session.latest_steps(), *point) if point else None
        return self.pick_step(session, found, request)

    def unload(self, request: gr.Request) -> None:
        """The tab was closed or reloaded: free its session now rather than at the idle time-out."""
        if request is not None and request.session_hash and self.store.close(request.session_hash):
            log.info("a tab was closed: its session is freed")
        if request is not None and request.session_hash and self.demo is not None:
            forget_gradio_session(self.demo, request.session_hash)     # Gradio keeps it otherwise

    def stats(self) -> dict:
        """Cache memory in bytes against its configured budget, and the live session count."""
        with self.model_lock:     # a consistent snapshot, between two model steps
            # kv_bytes includes the hybrid models' linear-state snapshots (also shown alone);
            # the budget covers kv_bytes + static_bytes (the compiled decoder's buffers).
            # A server backend keeps its caches on the server: none here.
            return {**self.backend.memory(), "sessions": len(self.store), "image_bytes": self.store.image_bytes()}

    # ---- the work ------------------------------------------------------------------------
    def _read_image(self, session: UserSession, path: str, name: str):
        """Check and decode one upload (ImageError with a message for the chat): only a file
        this server holds, at most min(ui.max_upload_mb, image.max_file_mb), reduced at load to
        image.max_kept_pixels, and no more than ui.session_upload_mb of uploads a session. A refused
        upload is deleted."""
        cfg = self.config.image
        try:
            limits.check_upload(session, path, name, ASSETS, cap_bytes=int(self.config.ui.session_upload_mb * MB))
            image = load_image(path, cfg.max_input_pixels, max_kept_pixels=cfg.max_kept_pixels,
                               max_file_mb=min(self.config.ui.max_upload_mb, cfg.max_file_mb))
            limits.count_upload(session, path)
            return image
        except ImageError:
            limits.discard_upload(path, limits.upload_folder())    # refused: not kept on the disk
            raise

    def _add_images(self, session: UserSession, found: list[tuple[str, str]]) -> Iterator[tuple]:
        """Check and load image files. Before the conversation's first question they start it
        (a fresh ChatSession on them, warmed up); after it they join it. A bad file changes
        nothing (the conversation and its images stay). Returns (as a generator's return value)
        whether the images can be asked about."""
        loaded = []
        for path, name in found:
            try:
                image = self._read_image(session, path, name)
            except ImageError as exc:
                with session.lock:
                    hint = " Please upload a PNG, JPEG, WebP or GIF image." if "format" in str(exc) else ""
                    kept = " The conversation is unchanged." if session.images else ""
                    session.history.append(render.notice(f"This file cannot be used: {exc}{hint}{kept}"))
                yield self.outputs(session)
                return False
            loaded.append(ShownImage(name, image, image_digest(image)))
        with session.lock:
            same = [x.digest for x in loaded] == [session.images[i].digest for i in session.current]
            if same and session.chat is not None:
                yield self.outputs(session, {CHAT})    # the same pictures again: keep the conversation
                return True
            if session.chat is not None and session.turns:
                return (yield from self._join(session, loaded))
            session.set_images(loaded)
            names = ", ".join(x.name for x in loaded)
            title = f"Encoding the image{'s' * (len(loaded) > 1)} {names}"
            session.history.append(render.status_message(render.escape_md(title), "", done=False))
            yield self.outputs(session)
            t0 = time.perf_counter()
            try:
                with self.model_lock:
                    session.chat = ChatSession(self.backend, [x.image for x in loaded])
                    stats = session.chat.warm_up()
            except InputError as exc:     # its message already says "this image cannot be used: ..."
                session.set_images([])
                session.history.append(render.notice(f"{str(exc)[:1].upper()}{str(exc)[1:]}."))
                yield self.outputs(session)
                return False
            except Exception as exc:
                log.exception("warm-up failed")
                session.chat = None     # the next question starts a new one
                session.history[-1] = render.status_message(render.escape_md(title), "", done=True)
                session.history.append(render.notice(f"The model failed on this image: "
                                                     f"{type(exc).__name__}: {exc}"))
                yield self.outputs(session)
                return True
            seconds = time.perf_counter() - t0
            session.warmup = (stats, seconds)
            sizes = ", ".join(f"{x.image.width}x{x.image.height}" for x in loaded)
            # A plain message, not a collapsed one: "ready, ask away" is meant to be read.
            what = "images" if len(loaded) > 1 else "image"
            session.history[-1] = render.notice(
                f"The {what} **{render.escape_md(names)}** ({sizes} pixels) "
                f"{'are' if len(loaded) > 1 else 'is'} encoded and ready ({render.seconds_text(seconds)}). "
                "Ask a question about " + ("them (one vision batch)." if len(loaded) > 1 else "it."))
            yield self.outputs(session)
            return True

    def _join(self, session: UserSession, loaded: list[ShownImage]) -> Iterator[tuple]:
        """Images that join a conversation with turns: earlier turns keep theirs, the next question
        is about these. Nothing is encoded now; the next turn encodes them and reads only them."""
        try:
            with self.model_lock:
                session.chat.add_images([x.image for x in loaded])
        except InputError as exc:
            session.history.append(render.notice(f"{str(exc)[:1].upper()}{str(exc)[1:]}. The conversation is unchanged."))
            yield self.outputs(session, {CHAT})
            return False
        session.images.extend(loaded)
        chat = session.chat
        session.current = list(range(len(chat.conv.images), len(chat.images)))   # every pending image
        numbers = ", ".join(f"image {i + 1} (**{render.escape_md(session.images[i].name)}**)" for i in session.current)
        session.history.append(render.notice(
            f"{numbers} joined the conversation: the next question is about "
            f"{'them' if len(session.current) > 1 else 'it'}; earlier turns keep their image."))
        yield self.outputs(session, {CHAT, IMAGES, BOXES, GALLERY})
        return True

    def _turn(self, session: UserSession, question: str, settings: PipelineConfig) -> Iterator[tuple]:
        """Stream one turn. The caller holds session.lock."""
        if session.chat is None:     # after New conversation or a failed warm-up
            try:
                with self.model_lock:
                    session.chat = ChatSession(self.backend, session.image_list())
            except Exception as exc:
                log.exception("could not start a conversation")
                session.history.append(render.notice(f"The model failed on this image: "
                                                     f"{type(exc).__name__}: {exc}"))
                yield self.outputs(session, {CHAT})
                return
        view = render.TurnView(question, len(session.turns) + 1, settings.max_regions,
                               note=render.NOISE_NOTE if self.twin else None, plain=settings.plain_answer,
                               image_numbers=len(session.images) > 1)
        session.selected = None
        session.begin_turn(view)
        events = session.chat.ask(question, settings)     # a generator: nothing runs before next()
        changed: set[str] = set()
        last, gap = 0.0, THROTTLE_S
        try:
            # Inside the try: a Stop that lands on this first update must end the turn too.
            yield self.outputs(session, {CHAT, BOXES, GALLERY, TIMINGS, IMAGES})   # the pending phase, at once
            while True:
                with self.model_lock:
                    event = next(events, None)
                if event is None:
                    break
                changed |= view.apply(event)
                now = time.monotonic()
                # Every event but a text delta ends or starts something: always show those.
                if not isinstance(event, TextDelta) or now - last >= gap:
                    yield self.outputs(session, changed | {TIMINGS})
                    # Gradio post-processes an update before it asks for the next event, so the
                    # yield took what the update cost: every output, even gr.skip(), is rebuilt
                    # with its page config (~1 ms each in Gradio 6.31, ~40 ms an update on a slow
                    # CPU). The model shares the process (and the GIL): space the text updates so
                    # that this stays a fifth of the time.
                    gap = max(THROTTLE_S, (time.monotonic() - now) / UI_SHARE)
                    changed, last = set(), now
        except GeneratorExit:   # Stop: Gradio closes this generator
            view.end("Stopped. The conversation goes on from before this question.")
            # The update it was cancelled in may never have reached the browser: what `sent`
            # recorded for it is not on the page, so the next update sends every panel again.
            session.sent.clear()
            raise
        except InputError as exc:
            view.end(f"This question cannot be asked: {exc}.")
        except OutOfMemory:         # the engine has handed the failed turn's blocks back already
            log.exception("out of memory in a turn")
            view.end("The model ran out of memory on this turn. The conversation goes on from before "
                     "this question: try again, lower the token budgets or regions, or start a New conversation.")
        except RemoteError as exc:
            log.warning("turn failed: %s", exc)
            view.end(f"The model server failed on this turn: {exc}. The conversation goes on from before "
                     "this question: ask again when the server is back.")
        except Exception as exc:
            log.exception("turn failed")
            view.end(f"The model failed on this turn: {type(exc).__name__}: {exc}")
        finally:
            with self.model_lock:
                events.close()      # stops the engine loop; ChatSession.ask cuts the turn's tokens
            session.end_turn()
            if view.result is not None:
                self._write_trace(session, settings)
            if session.closed:      # the tab went away while this turn ran
                session.set_images([])
        yield self.outputs(session)

    def _write_trace(self, session: UserSession, settings: PipelineConfig) -> None:
        """The CLI's --json object for this session's turns (plus image names and settings), and
        the HTML report, for the Download buttons."""
        try:
            folder = self._folder(session)
            names = [x.name for x in session.images]
            values = asdict(settings)
            path = folder / "corgi-trace.json"
            path.write_text(json.dumps(render.trace(self.model_info, session.results, names, values),
                                       ensure_ascii=False, indent=1), encoding="utf-8")
            session.trace_path = str(path)
            report = folder / "corgi-report.html"
            report.write_text(report_html({**self.model_info, "twin": self.twin}, values,
                                          [(x.name, x.image) for x in session.images], session.results,
                                          session.report_sections),
                              encoding="utf-8")
            session.report_path = str(report)
        except OSError as exc:      # a full disk: the turn stands, only its downloads are missing
            log.warning("the trace could not be written (%s)", exc.strerror or type(exc).__name__)
            session.trace_path = session.report_path = None


def build_app(engine: Engine, config: Config) -> gr.Blocks:
    return CorgiApp(engine, config).build()
