"""Per-browser-session state: the image, its ChatSession (and so its KV cache), what the chat shows.

A UserSession lives in a gr.State (whose time_to_live frees idle ones) and in a SessionStore
keyed by Gradio's session hash, because demo.unload (tab closed) hands over only the request,
not the State. Whichever comes first frees the memory; closing twice is harmless.

The store's limit (ui.max_sessions) never costs anyone a conversation: to make room it lets go
of the least recently used session that has no conversation (no turn asked, none running). When
every session holds one, a new session is refused (`UserSession.refused`: the UI says the server
is full) until one ends (New conversation, tab closed, idle time-out). So a client that opens
many cheap sessions only pushes out other cheap sessions, its own first; what it costs to push
out conversations is a model turn per session, in the shared queue.

Per client (its address, see limits.client_key) the same rule holds at ui.max_sessions_per_client:
a client at its share pushes out its own least recently used session without a conversation,
and when all of its sessions hold one, its new session is refused (CLIENT_FULL), while other
clients are still served. So one client cannot hold every slot of the store.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from PIL import Image

from corgi.types import CacheStats, Step, TurnResult

from .render import TurnView

if TYPE_CHECKING:     # only a type here: keeps this module (and its tests) free of torch
    from corgi.pipeline import ChatSession

log = logging.getLogger(__name__)


@dataclass
class ShownImage:
    name: str
    image: Image.Image
    digest: str


@dataclass
class ShownTurn:
    question: str
    start: int                      # index of its first message in UserSession.history
    result: TurnResult | None       # None when it was stopped or failed


SERVER_FULL = ("The server holds as many conversations as it can right now, and none of them can be "
               "let go: please try again in a few minutes.")
CLIENT_FULL = ("You already have {n} conversations open on this server, the most one client may hold: "
               "close one (New conversation, or close its tab), then try again.")


class UserSession:
    def __init__(self, key: str, client: str | None = None):
        self.key = key
        self.client = client      # limits.client_key of its first request (None: not counted)
        self.upload_bytes = 0     # bytes of the uploads it kept (ui.session_upload_mb)
        # Held for a whole model operation of this tab (a turn, a warm-up). Gradio frees the
        # queue slot of a cancelled turn before it closes the turn's generator, so the next
        # turn could otherwise start while the old one is still cutting the conversation back.
        self.lock = threading.Lock()
        self.running: Iterator | None = None   # the updates of its last turn (Stop may close them)
        # Questions the browser echoed and turns that started: more echoed than started when a
        # Stop cancelled a question still waiting in the queue (its turn never ran, so only Stop
        # can tell the user it was not asked).
        self.echoed, self.started = 0, 0
        self.echoed_question = ""
        # A question submitted while this tab's own question was still queued or running: the
        # browser does not send it (Gradio runs one event of a listener at a time), so it stays
        # in the textbox, and the chat says so once that turn ends or is stopped.
        self.asking = False
        self.held_question = ""
        self.closed = False
        # The conversation's images, in order (Box.image indexes them), and the ones the next
        # question is about; ChatSession holds the same images in the same order.
        self.images: list[ShownImage] = []
        self.current: list[int] = []
        self.selected: int | None = None     # the step (S number) picked on the image or in the list
        self.sent: dict[str, object] = {}    # per panel, what this tab was last sent (not re-sent)
        self.tiles: list = []                # where each image lies in the boxes picture (render.Tile)
        self.chat: ChatSession | None = None
        self.warmup: tuple[CacheStats, float] | None = None   # the upload's stats and seconds
        self.history: list[dict[str, Any]] = []              # messages of ended turns and notices
        self.turns: list[ShownTurn] = []
        self.live: TurnView | None = None                    # the turn being streamed
        self.trace_path: str | None = None                   # its folder is this session's alone
        self.report_path: str | None = None                  # the HTML report, in the same folder
        self.report_sections: dict = {}                      # report_html's turns and thumbnails so far
        # Why the store did not keep it (SERVER_FULL or CLIENT_FULL): the UI shows that; "" if kept.
        self.refused = ""

    @property
    def has_conversation(self) -> bool:
        """Whether closing it would lose work: a turn asked, or one under way."""
        return bool(self.turns) or self.live is not None or self.lock.locked()

    # ---- what the panels show -------------------------------------------------------
    @property
    def image(self) -> Image.Image | None:
        """The (first) image the next question is about."""
        return self.images[self.current[0]].image if self.current else None

    @property
    def image_name(self) -> str:
        return ", ".join(self.images[i].name for i in self.current)

    def image_list(self) -> list[Image.Image]:
        return [shown.image for shown in self.images]

    def messages(self) -> list[dict[str, Any]]:
        return self.history + (self.live.messages() if self.live else [])

    @property
    def results(self) -> list[TurnResult]:
        """Finished turns, the streaming one included once its TurnFinished arrived."""
        done = [t.result for t in self.turns if t.result is not None]
        if self.live is not None and self.live.result is not None:
            done.append(self.live.result)
        return done

    def shown_images(self) -> list[int]:
        """The images the boxes panel shows: those of the streaming or last turn, else the current ones."""
        if self.live is None and self.results:
            return list(self.results[-1].images)
        return list(self.current)

    def latest_steps(self) -> list[Step]:
        """The boxes to draw: the streaming turn's (none until parsed), else the last turn's."""
        if self.live is not None:
            return self.live.steps
        results = self.results
        return results[-1].steps if results else []

    # ---- changes ----------------------------------------------------------------------
    def begin_turn(self, view: TurnView) -> None:
        self.live = view

    def end_turn(self) -> None:
        """Move the live turn into the history (finished, stopped or failed alike)."""
        view, self.live = self.live, None
        if view is None:
            return
        self.turns.append(ShownTurn(view.question, len(self.history), view.result))
        self.history.extend(view.messages())

    def drop_last_turn(self) -> ShownTurn | None:
        """Regenerate: forget the last turn's messages and, if it finished, its tokens."""
        if not self.turns:
            return None
        turn = self.turns.pop()
        del self.history[turn.start:]
        if turn.result is not None and self.chat is not None:
            self.chat.undo_last_turn()
        return turn

    def new_conversation(self) -> None:
        """Forget every turn and free the KV cache; the current images stay (re-encoding them is
        a vision-cache hit) and are the new conversation's images."""
        if self.chat is not None:
            self.chat.close()
        self.chat, self.warmup, self.live, self.selected = None, None, None, None
        self.history, self.turns = [], []
        self.images = [self.images[i] for i in self.current]
        self.current = list(range(len(self.images)))
        self.drop_trace()

    def drop_trace(self) -> None:
        if self.trace_path:
            shutil.rmtree(os.path.dirname(self.trace_path), ignore_errors=True)
        self.trace_path = self.report_path = None
        self.report_sections = {}

    def set_images(self, images: list[ShownImage]) -> None:
        """A fresh conversation on `images` (none: no image at all)."""
        self.current = []
        self.new_conversation()
        self.images, self.current = list(images), list(range(len(images)))

    def join_images(self, images: list[ShownImage]) -> list[int]:
        """Images that join the conversation: the next question is about them."""
        self.images.extend(images)
        self.current = list(range(len(self.images) - len(images), len(self.images)))
        return self.current

    def close(self) -> None:
        """Free the model memory. Safe from any thread: if a turn is running, it finishes
        the job when it ends (see `closed`)."""
        self.closed = True
        if self.lock.acquire(blocking=False):
            try:
                self.set_images([])
            finally:
                self.lock.release()


class SessionStore:
    """Live sessions by Gradio session hash, at most `max_sessions`: the least recently used
    session without a conversation goes; when all have one, new sessions are refused."""

    def __init__(self, max_sessions: int, max_per_client: int = 0):
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client      # 0: no limit per client
        self._sessions: OrderedDict[str, UserSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, client: str | None = None) -> UserSession:
        evicted = None
        with self._lock:
            session = self._sessions.get(key)
            if session is not None and not session.closed:
                self._sessions.move_to_end(key)
                return session
            self._sessions.pop(key, None)
            mine = [k for k, s in self._sessions.items() if client is not None and s.client == client]
            if self.max_per_client and len(mine) >= self.max_per_client:
                full, among, limit = CLIENT_FULL.format(n=len(mine)), mine, "per-client session limit"
            elif len(self._sessions) >= self.max_sessions:
                full, among, limit = SERVER_FULL, list(self._sessions), "session limit"
            else:
                full = None
            if full is not None:
                evicted = next((k for k in among if not self._sessions[k].has_conversation), None)
                if evicted is None:
                    log.warning("%s reached and every session it counts has a conversation: a new "
                                "session is refused", limit)
                    refused = UserSession(key, client)
                    refused.refused = full
                    return refused
                evicted = self._sessions.pop(evicted)
            session = self._sessions[key] = UserSession(key, client)
        if evicted is not None:
            log.info("session limit reached: closing the least recently used session without a conversation")
            evicted.close()
        return session

    def close(self, key: str) -> bool:
        """Close the session of `key`; False when there was none."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.close()
        return session is not None

    def image_bytes(self) -> int:
        """Bytes of the decoded images the live sessions keep (Pillow holds RGB as 4 bytes a
        pixel): at most max_sessions x image.max_kept_pixels x 4."""
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(4 * x.image.width * x.image.height for s in sessions for x in s.images)

    def __len__(self) -> int:
        return len(self._sessions)


def forget_gradio_session(demo, session_hash: str) -> None:
    """Drop what Gradio keeps of a closed session (its tab's heartbeat ended) and never frees:

      * its SessionState in the state holder (a copy of the Blocks config per session, and the
        gr.State value, the closed UserSession): Gradio only marks it closed, keeps it for an
        hour and removes the entry itself only when state_session_capacity is exceeded;
      * its set of event ids in the queue (pending_event_ids_session: an id is added per event
        and removed only when a session's waiting events are cancelled, never when they end),
        and its message queue (an LRU of 2000 sessions).

    The app has already let go of the session (demo.unload), so a tab that reconnects under the
    same session hash starts afresh either way. The queue's records are left alone while one of
    the session's events is still known to the queue: it would still send messages there."""
    app = getattr(demo, "server_app", None)
    queue = getattr(demo, "_queue", None)
    if app is None or queue is None:
        return
    holder = app.state_holder
    with holder.lock:
        holder.session_data.pop(session_hash, None)
        holder.time_last_used.pop(session_hash, None)
    ids = queue.pending_event_ids_session.get(session_hash, set())
    if not any(event_id in queue.event_ids_to_events for event_id in list(ids)):
        queue.pending_event_ids_session.pop(session_hash, None)
        queue.pending_messages_per_session.pop(session_hash, None)
