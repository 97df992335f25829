"""The openai backend: the pipeline's replies produced by an OpenAI-compatible server (vLLM,
SGLang, `transformers serve`), through the official `openai` client. No torch here.

A conversation is its list of chat messages (images as JPEG data URIs); every phase 1+2 and
phase 4 request carries the whole list, so the server's prefix cache serves the shared
beginning. Phase 3 is one request per crop, all at once (the server batches them). Stop,
Regenerate and a failed turn drop the turn's messages (`mark` / `truncate`).

Structured phases send their JSON Schema as `response_format` (json_schema); whether the
server honoured it shows in the output (the pipeline warns when it is not the JSON asked for,
and the tolerant parser reads it). A server's reasoning text (`reasoning_content`, vLLM's and
SGLang's reasoning parsers) streams as a <think> block, as a local model writes it.

Every failure of the server becomes one RemoteError with one clear line.
"""
from __future__ import annotations

import base64
import io
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

from . import prompts
from .config import Config
from .families import BY_NAME, Family, UnknownFamily
from .formats import THINK_CLOSE, THINK_OPEN
from .json_schemas import Structure
from .types import CacheStats, Phase, RegionDone, Sampling, TextDelta

JPEG_QUALITY = 90
# Text a server's chat template turns into control tokens; broken up in untrusted text (besides
# every "<|" and "|>", which prompts.plain always breaks).
ADDED_TOKENS = (THINK_OPEN, THINK_CLOSE, "<tool_call>", "</tool_call>")


class RemoteError(RuntimeError):
    """The server could not give a reply; the message says why in one line."""


def family_for(name: str, model_id: str) -> Family:
    """model.family, or ("auto") the family the served model's name says: the box convention
    and thinking depend on it, and a server does not tell."""
    if name != "auto":
        return BY_NAME[name]
    lowered = model_id.lower().replace("_", "-").replace(" ", "-")
    # Longest names first: "qwen3.5-moe" before "qwen3.5", "qwen2.5-vl" before "qwen2-vl".
    for family in sorted(BY_NAME.values(), key=lambda f: -len(f.name)):
        if family.name in lowered:
            return family
    if "qwen3.6" in lowered:
        return BY_NAME["qwen3.5-moe" if "a3b" in lowered or "moe" in lowered else "qwen3.5"]
    raise UnknownFamily(f"cannot tell the model family from the served name {model_id!r}: set model.family "
                        f"(one of {', '.join(BY_NAME)})")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen's image processor resizes to (transformers' smart_resize: sides multiples
    of `factor`, area within [min_pixels, max_pixels], aspect kept). An image sent at this size
    is not resized again by a server whose bounds include it, so its boxes are in our pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class RemoteConversation:
    images: list[Image.Image] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)     # (width, height) as sent
    messages: list[dict[str, Any]] = field(default_factory=list)


class RemoteBackend:
    name = "openai"
    schema_only = True      # response_format holds JSON only: phase 1+2 asks for no think block

    def __init__(self, config: Config, client=None):
        import httpx                  # noqa: F401  (see below)
        from openai import OpenAI     # here, so that RemoteError is importable without the client
        # httpx is imported now, before any phase 3 thread: the client looks it up lazily while
        # streaming, and a thread that does so while another thread's first import of httpx is
        # under way sees a half-initialised module.
        m = config.model
        self.config = config
        self.model, self.base_url = m.id, m.base_url
        self.family = family_for(m.family, m.id)
        self.added_tokens = ADDED_TOKENS
        self.factor = self.family.patch_size * self.family.merge_size
        self.client = client or OpenAI(base_url=m.base_url, api_key=os.environ.get(m.api_key_env) or "EMPTY",
                                       timeout=m.timeout_s, max_retries=0)
        self._api_key_env = m.api_key_env
        self._sees_images = False     # check_vision passed (once per backend)

    def check(self) -> None:
        """Reach the server once: an unreachable server, a refused key, a model it does not serve
        or one that does not take images is one RemoteError now, not in the middle of a turn. The
        model list says which models it serves; for a server whose list cannot be read
        (transformers serve lists only its hub cache) the answer to check_vision's first
        one-token request tells whether it serves the model."""
        import openai
        try:
            served = [m.id for m in self.client.models.list()]
        except openai.APIStatusError as exc:
            if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
                raise self.explain(exc) from None
            served = None
        except Exception as exc:
            raise self.explain(exc) from None
        if served and self.model not in served:
            raise RemoteError(f"the model server at {self.base_url} does not serve model {self.model!r} "
                              f"(it serves: {', '.join(served[:8])})")
        self.check_vision()

    def check_vision(self) -> None:
        """Fail unless the served model sees images. A text-only model's server may refuse an
        image (vLLM: an HTTP 400 that explain() gives the vision hint) or, as `transformers serve`
        5.23 does, drop the image parts without a word and answer the text alone: HTTP 200
        (`get_processor_inputs_from_messages` keeps only the text parts for an LLM), and every
        turn would be answered about an image the model never saw. That shows only in the
        prompt's length, so: one token for "Hi", then for "Hi" after a small image; the same
        prompt length means the image never reached the model. Once per backend: check() at
        start-up, else the first reply with images (a RemoteBackend used without check())."""
        if self._sees_images:
            return
        without = self._prompt_tokens("Hi")
        side = 2 * self.factor
        image = _image_url(Image.new("RGB", (side, side), (128, 128, 128)))
        with_image = self._prompt_tokens([image, _text("Hi")])
        if without is not None and with_image is not None and with_image <= without:
            raise RemoteError(f"the model {self.model!r} at {self.base_url} does not take images: the server "
                              f"answered a request with an image as if it had none ({with_image} prompt tokens "
                              f"with it, {without} without); serve a vision model")
        self._sees_images = True       # or the server does not count tokens: nothing to tell by

    def _prompt_tokens(self, content) -> int | None:
        """The prompt length the server counts for one user message (one token of reply)."""
        try:
            # Retries: a server that failed the list may have closed the connection it kept open.
            answer = self.client.with_options(max_retries=2).chat.completions.create(
                model=self.model, max_tokens=1, messages=[{"role": "user", "content": content}])
        except Exception as exc:
            raise self.explain(exc) from None
        return getattr(getattr(answer, "usage", None), "prompt_tokens", None)

    def explain(self, exc: BaseException) -> RemoteError:
        """One line for anything the client raised."""
        import openai
        where = f"the model server at {self.base_url}"
        if isinstance(exc, RemoteError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            return RemoteError(f"{where} did not answer within {self.config.model.timeout_s:g} s (model.timeout_s)")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc.__context__
            detail = f" ({type(cause).__name__})" if cause is not None else ""
            return RemoteError(f"cannot reach {where}{detail}; is it running?")
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return RemoteError(f"{where} refused the API key (HTTP {exc.status_code}); set "
                               f"${self._api_key_env} (model.api_key_env)")
        if isinstance(exc, openai.NotFoundError):
            return RemoteError(f"{where} does not serve model {self.model!r}: {_detail(exc)}")
        if isinstance(exc, openai.APIStatusError):
            detail = _detail(exc)
            hint = ("; is the served model a vision model?"
                    if any(word in detail.lower() for word in ("image", "multimodal", "vision")) else "")
            return RemoteError(f"{where} refused the request (HTTP {exc.status_code}): {detail}{hint}")
        if isinstance(exc, openai.APIError):
            return RemoteError(f"{where} failed: {_short(str(exc))}")
        return RemoteError(f"{where} failed: {type(exc).__name__}: {_short(str(exc))}")

    def model_info(self) -> dict[str, str]:
        return {"id": self.model, "family": self.family.name, "dtype": "server", "device": self.base_url,
                "backend": self.name, "server": self.base_url}

    def concurrency(self) -> int:
        return self.config.ui.remote_concurrency      # the server batches: several turns at once

    def memory(self) -> dict[str, int]:
        return {}          # the caches are the server's

    def vision_seconds(self) -> float:
        return 0.0         # the server's image encoding is part of its prefill

    # ---- conversation state ----------------------------------------------------------
    def start(self, images: list[Image.Image]) -> RemoteConversation:
        conv = RemoteConversation()
        parts: list[dict[str, Any]] = []
        for number, image in enumerate(images, 1):
            if len(images) > 1:
                parts.append(_text(prompts.image_name(number)))
            parts.append(self._image_part(conv, image))
        parts.append(_text(prompts.IMAGE_NOTE if len(images) == 1 else prompts.IMAGES_NOTE))
        conv.messages += [{"role": "system", "content": prompts.SYSTEM}, {"role": "user", "content": parts}]
        return conv

    def check_image(self, image: Image.Image) -> None:
        cfg = self.config.image
        smart_resize(image.height, image.width, self.factor, cfg.min_pixels, cfg.max_pixels)

    def join(self, conv: RemoteConversation, images: list[Image.Image]) -> list[int]:
        first = len(conv.images)
        parts: list[dict[str, Any]] = []
        for number, image in enumerate(images, first + 1):
            parts += [_text(prompts.image_name(number)), self._image_part(conv, image)]
        parts.append(_text(prompts.joined_note(len(images))))
        conv.messages.append({"role": "user", "content": parts})
        return list(range(first, len(conv.images)))

    def mark(self, conv: RemoteConversation) -> tuple[int, int]:
        return len(conv.messages), len(conv.images)

    def truncate(self, conv: RemoteConversation, mark: tuple[int, int]) -> None:
        messages, images = mark
        del conv.messages[messages:], conv.images[images:], conv.sizes[images:]

    def warm_up(self, conv: RemoteConversation, stats: CacheStats) -> None:
        pass               # nothing to compute ahead: the first request carries the images

    def close(self, conv: RemoteConversation) -> None:
        conv.messages.clear()

    def _image_part(self, conv: RemoteConversation, image: Image.Image) -> dict[str, Any]:
        """The image at the size the model sees it (so boxes in its pixels are ours), as a data URI."""
        cfg = self.config.image
        height, width = smart_resize(image.height, image.width, self.factor, cfg.min_pixels, cfg.max_pixels)
        conv.images.append(image)
        conv.sizes.append((width, height))
        return _image_url(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))

    # ---- replies ---------------------------------------------------------------------
    def prompt(self, content: str, no_think: bool) -> str:
        return content     # the server's chat template writes the roles around it

    def reply(self, conv: RemoteConversation, phase: Phase, prompt: str, max_new_tokens: int, sampling: Sampling,
              structure: Structure | None, stats: CacheStats, clock, no_think: bool = False,
              branch: bool = False) -> Iterator:
        """Stream the server's reply to `prompt` after the conversation (TextDelta, SpanTimed);
        return its text. The user message and the reply join the conversation unless branch."""
        if conv.images:
            self.check_vision()       # a text-only server answers as if no image were there
        user = {"role": "user", "content": prompt}
        request = self._request(conv.messages + [user], max_new_tokens, sampling, structure, no_think)
        start = clock.now()
        parts: list[str] = []
        content: list[str] = []
        thinking, usage, first = False, None, None
        stream = self._open(request)
        try:
            for chunk in stream:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                reasoning = _reasoning_text(delta)
                text = ""
                if reasoning:
                    text = ("" if thinking else THINK_OPEN) + reasoning
                    thinking = True
                if delta.content:
                    if thinking:
                        text, thinking = text + THINK_CLOSE + "\n", False
                    text += delta.content
                    content.append(delta.content)
                if text:
                    if first is None:
                        first = clock.now()
                        yield clock.span(phase, "prefill", start, first - start)
                    parts.append(text)
                    yield TextDelta(phase, text)
        except Exception as exc:
            raise self.explain(exc) from None
        finally:
            stream.close()
        if thinking:
            parts.append(THINK_CLOSE + "\n")
            yield TextDelta(phase, parts[-1])
        end = clock.now()
        tokens = _count(stats, usage)
        if first is None:
            yield clock.span(phase, "prefill", start, end - start)
            first = end
        _retime_prefill(clock, phase, usage)
        yield clock.span(phase, "decode", first, end - first, tokens)
        if not branch:
            conv.messages += [user, {"role": "assistant", "content": "".join(content)}]
        return "".join(parts)

    def captions(self, crops: list[Image.Image], tasks: list[str], max_new_tokens: int, max_pixels: int,
                 sampling: Sampling, stats: CacheStats, clock) -> Iterator:
        """Phase 3: one streamed request per crop, all at once. Yields TextDelta(region=row),
        SpanTimed (the prefill up to the first token of any region, then one per region) and
        RegionDone(row, text)."""
        cfg = self.config.image
        requests = []
        for crop, task in zip(crops, tasks):
            height, width = smart_resize(crop.height, crop.width, self.factor, min(cfg.min_pixels, max_pixels),
                                         max_pixels)
            image = crop.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            messages = [{"role": "system", "content": prompts.CROP_SYSTEM},
                        {"role": "user", "content": [_image_url(image), _text(task)]}]
            requests.append(self._request(messages, max_new_tokens, sampling, None, self.family.thinks_by_default))
        events: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        def run(row: int, request: dict) -> None:
            try:
                stream = self._open(request)
                try:
                    usage = None
                    for chunk in stream:
                        if cancelled.is_set():
                            return
                        usage = chunk.usage or usage
                        if chunk.choices and chunk.choices[0].delta.content:
                            events.put(("text", row, chunk.choices[0].delta.content))
                    events.put(("done", row, usage))
                finally:
                    stream.close()
            except BaseException as exc:   # noqa: BLE001  (handed to the consumer, which raises it)
                events.put(("error", row, exc))

        start, decode_start = clock.now(), None
        texts = [""] * len(crops)
        pool = ThreadPoolExecutor(max_workers=len(crops), thread_name_prefix="corgi-region")
        complete = False
        try:
            for row, request in enumerate(requests):
                pool.submit(run, row, request)
            left = len(crops)
            while left:
                kind, row, value = events.get()
                if kind == "error":
                    raise self.explain(value)
                if decode_start is None:
                    decode_start = clock.now()
                    yield clock.span(Phase.EVIDENCE, "prefill", start, decode_start - start)
                if kind == "text":
                    texts[row] += value
                    yield TextDelta(Phase.EVIDENCE, value, region=row)
                    continue
                left -= 1
                tokens = _count(stats, value)
                yield clock.span(Phase.EVIDENCE, f"region {row + 1}", decode_start, clock.now() - decode_start, tokens)
                yield RegionDone(row, texts[row])
            complete = True
        finally:
            # Stop or a failed region: the other requests end at their next chunk; not waited for.
            cancelled.set()
            pool.shutdown(wait=complete, cancel_futures=True)

    def _request(self, messages: list[dict], max_new_tokens: int, sampling: Sampling,
                 structure: Structure | None, no_think: bool) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model, "messages": messages, "stream": True, "max_tokens": max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
            "stream_options": {"include_usage": True}}
        if structure is not None:
            request["response_format"] = {"type": "json_schema", "json_schema": {
                "name": f"corgi_{structure.phase}", "schema": structure.json_schema(), "strict": True}}
        if no_think:
            # Qwen3.5's template (and Qwen3's) writes an empty think block: the model answers directly.
            request["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}}
        return request

    def _open(self, request: dict[str, Any]):
        try:
            return self.client.chat.completions.create(**request)
        except Exception as exc:
            raise self.explain(exc) from None


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image_url(image: Image.Image) -> dict[str, Any]:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}


def _reasoning_text(delta) -> str:
    """A server's reasoning-parser output: `reasoning_content` (vLLM, SGLang) or `reasoning`."""
    extra = getattr(delta, "model_extra", None) or {}
    value = getattr(delta, "reasoning_content", None) or extra.get("reasoning_content") or extra.get("reasoning")
    return value if isinstance(value, str) else ""


def _count(stats: CacheStats, usage) -> int:
    """The server's usage figures into the turn's: prompt tokens, those its prefix cache had
    (prompt_tokens_details.cached_tokens, where it says), completion tokens. Returns the latter."""
    if usage is None:
        return 0
    prompt = usage.prompt_tokens or 0
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    stats.prompt_tokens += prompt
    stats.prefix_tokens_reused += cached
    stats.prefill_tokens_computed += prompt - cached
    completion = usage.completion_tokens or 0
    stats.decode_output_tokens += completion
    return completion


def _retime_prefill(clock, phase: Phase, usage) -> None:
    """The phase's prefill span (already shown live) gets the usage's token counts."""
    if usage is None:
        return
    for span in reversed(clock.spans):
        if span.phase == phase and span.part == "prefill":
            details = getattr(usage, "prompt_tokens_details", None)
            span.reused = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
            span.tokens = (usage.prompt_tokens or 0) - span.reused
            return


def _detail(exc) -> str:
    """The server's own words in an error answer: OpenAI's {"error": {"message"}}, FastAPI's
    {"detail"}, or the client's message."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        message = (inner.get("message") if isinstance(inner, dict) else inner) or body.get("message") \
            or body.get("detail")
        if message:
            return _short(str(message))
    return _short(getattr(exc, "message", None) or str(exc))


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
