"""The local backend: the pipeline's replies produced by the engine loaded in this process.

A conversation is the engine's Conversation (its token list and warm KV cache); a reply
appends the phase's prompt tokens, decodes token ids (grammar-constrained for the structured
phases) and streams them as text; phase 3 is one batch over every crop. `remote.py` is the
same interface over an OpenAI-compatible server. `pipeline.ChatSession` drives either.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from PIL import Image

from . import prompts
from .engine.engine import Engine, out_of_memory_as_error
from .json_schemas import Structure
from .types import CacheStats, Phase, RegionDone, Sampling, TextDelta


class TextStream:
    """Incremental detokenizer: token ids in, new complete text out (no half UTF-8 characters).

    Decodes only a short window (the tokens since the last emitted text, plus the ones
    before them for context), not the whole phase per token: the offsets scheme of TGI/vLLM."""

    def __init__(self, engine: Engine, skip_special: bool = False):
        self.engine, self.ids, self.text, self.skip_special = engine, [], "", skip_special
        self._prefix = self._read = 0      # ids[_prefix:_read] decode to text already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.engine.decode_text
        emitted = decode(self.ids[self._prefix:self._read], skip_special=self.skip_special)
        window = decode(self.ids[self._prefix:], skip_special=self.skip_special)
        if window.endswith("\ufffd") or len(window) <= len(emitted):
            return ""
        delta = window[len(emitted):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


class LocalBackend:
    name = "local"

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def config(self):
        return self.engine.config

    @property
    def family(self):
        return self.engine.lm.family

    @property
    def added_tokens(self) -> tuple[str, ...]:
        # Untrusted text must not encode to any added token of this tokenizer (<|im_end|>, <think>, ...).
        return self.engine.lm.added_tokens

    def model_info(self) -> dict[str, str]:
        return Engine.model_info(self.engine)   # {"id", "family", "dtype", "device"} of engine.lm

    def concurrency(self) -> int:
        return 1            # one model: turns take their turn

    def memory(self) -> dict[str, int]:
        engine = self.engine
        return {"kv_bytes": engine.kv_bytes_total(), "kv_budget_bytes": engine.kv_budget,
                "snapshot_bytes": engine.snapshot_bytes_total(), "static_bytes": engine.static_bytes(),
                "vision_bytes": engine.vision.cached_bytes, "vision_budget_bytes": engine.vision.cache_bytes}

    def vision_seconds(self) -> float:
        return self.engine.vision.seconds

    # ---- conversation state ----------------------------------------------------------
    def start(self, images: list[Image.Image]):
        """A conversation about `images` (the first turn's). Raises ValueError for a shape the
        processor refuses."""
        engine = self.engine
        if len(images) == 1:
            return engine.start_conversation(images[0], prompts.conversation_head())
        texts = prompts.multi_image_head(len(images))
        conv = engine.start_conversation(images[0], texts[0])
        engine.add_images(conv, images[1:], texts[1:], in_head=True)
        return conv

    def check_image(self, image: Image.Image) -> None:
        cfg = self.config.image
        self.engine.image_grid(image, cfg.min_pixels, cfg.max_pixels)

    def join(self, conv, images: list[Image.Image]) -> list[int]:
        texts = prompts.joined_images(len(conv.images) + 1, len(images))
        with out_of_memory_as_error():
            return self.engine.add_images(conv, images, texts)

    def mark(self, conv) -> int:
        return len(conv.token_ids)

    def truncate(self, conv, mark: int) -> None:
        conv.truncate(mark)

    def warm_up(self, conv, stats: CacheStats) -> None:
        if conv.kv_len < len(conv.token_ids):
            with out_of_memory_as_error():
                self.engine.prefill(conv, stats)

    def close(self, conv) -> None:
        self.engine.end_conversation(conv)

    # ---- replies ---------------------------------------------------------------------
    def prompt(self, content: str, no_think: bool) -> str:
        """The text a phase appends: the user message and the assistant's opening."""
        return prompts.user_turn(content) + (prompts.NO_THINK if no_think else "")

    def reply(self, conv, phase: Phase, prompt: str, max_new_tokens: int, sampling: Sampling,
              structure: Structure | None, stats: CacheStats, clock, no_think: bool = False,
              branch: bool = False) -> Iterator:
        """Stream the reply to `prompt` (TextDelta, SpanTimed); return its text. The reply stays
        in the conversation, closed as a message; branch=True: it leaves it again (the plain
        answer), from the turn's warm prefix. Out of memory: OutOfMemory."""
        with out_of_memory_as_error():
            return (yield from self._reply(conv, phase, prompt, max_new_tokens, sampling, structure, stats, clock,
                                           branch))

    def _reply(self, conv, phase: Phase, prompt: str, max_new_tokens: int, sampling: Sampling,
               structure: Structure | None, stats: CacheStats, clock, branch: bool) -> Iterator:
        engine = self.engine
        start, vision = clock.now(), clock.vision_seconds()
        computed, reused = stats.prefill_tokens_computed, stats.prefix_tokens_reused
        turn_start = len(conv.token_ids)
        if branch and engine.cache_enabled and conv.kv_len < turn_start:
            # Compute the shared prefix first, so the branch point is a cache boundary (and, on
            # hybrid models, a snapshot): nothing before it is computed again by phase 1+2.
            engine.prefill(conv, stats)
        # The grammar compiles on the engine's grammar thread while the prefill runs; phase 4's
        # (same boxes) during phase 1, so neither waits for a compile on a new image size.
        pending = (engine.constraint_ahead(structure.phase, structure.settings, structure.convention,
                                           structure.images) if structure is not None else None)
        if structure is not None and structure.phase == "reasoning":
            engine.constraint_ahead("synthesis", structure.settings, structure.convention, structure.images)
        try:
            engine.append(conv, prompt)
            text, last = yield from self._decode(conv, phase, max_new_tokens, sampling, pending, stats, clock,
                                                 (start, vision, computed, reused))
            if branch:
                return text
        finally:
            if branch:
                conv.truncate(turn_start)        # the branch's tokens leave the conversation
        constraint = pending.result() if pending is not None else None     # done: generate() awaited it
        if constraint is not None and not constraint.is_finished():
            # Out of token budget inside the structure: close it validly so it still parses.
            # The grammar gives the closing tokens (exact even when a UTF-8 character was cut).
            closing = constraint.completion_text()
            conv.token_ids.extend(constraint.finish())
            text = constraint.text()
            yield TextDelta(phase, closing)
        engine.append(conv, "\n" if last == engine.lm.special.im_end else prompts.END_OF_MESSAGE)
        return text

    def _decode(self, conv, phase: Phase, max_new_tokens: int, sampling: Sampling, constraint,
                stats: CacheStats, clock, since: tuple) -> Iterator:
        """Stream one reply after what the conversation holds, up to a stop token (left out of
        the text); return (text, last token). Timeline: prefill from `since` = (start, vision
        seconds, computed, reused) up to the first token, then decode."""
        engine = self.engine
        stream = TextStream(engine)
        stop_ids = engine.lm.special.stop_ids
        last, decode_start, generated = None, None, 0
        for token in engine.generate(conv, max_new_tokens, sampling, constraint, stats):
            if decode_start is None:
                start, vision, computed, reused = since
                yield from clock.prefill_spans(phase, start, vision, stats, computed, reused)
                decode_start = clock.now()
            last, generated = token, generated + 1
            if token in stop_ids:
                break
            delta = stream.push(token)
            if delta:
                yield TextDelta(phase, delta)
        if decode_start is not None:
            yield clock.span(phase, "decode", decode_start, clock.now() - decode_start, generated)
        return stream.text, last

    def captions(self, crops: list[Image.Image], tasks: list[str], max_new_tokens: int, max_pixels: int,
                 sampling: Sampling, stats: CacheStats, clock) -> Iterator:
        """Phase 3: every crop with its task, as one batch. Yields TextDelta(region=row),
        SpanTimed (prefill, then one per region) and RegionDone(row, text) per region."""
        with out_of_memory_as_error():
            yield from self._captions(crops, tasks, max_new_tokens, max_pixels, sampling, stats, clock)

    def _captions(self, crops: list[Image.Image], tasks: list[str], max_new_tokens: int, max_pixels: int,
                  sampling: Sampling, stats: CacheStats, clock) -> Iterator:
        engine = self.engine
        head_before, head_after = prompts.crop_head()
        heads = [(head_before, head_after + task + prompts.IM_END + "\n" + prompts.IM_START + "assistant\n")
                 for task in tasks]
        streams = [TextStream(engine, skip_special=True) for _ in crops]
        finished = [False] * len(crops)
        counts = [0] * len(crops)
        stop_ids = engine.lm.special.stop_ids
        start, vision = clock.now(), clock.vision_seconds()
        computed, reused = stats.prefill_tokens_computed, stats.prefix_tokens_reused
        decode_start = None
        for row, token in engine.generate_batch(crops, heads, max_new_tokens, max_pixels, replace(sampling), stats):
            if decode_start is None:     # the batch's prefill (and its crops' encoding) ends here
                yield from clock.prefill_spans(Phase.EVIDENCE, start, vision, stats, computed, reused)
                decode_start = clock.now()
            if token in stop_ids:
                finished[row] = True
                yield clock.span(Phase.EVIDENCE, f"region {row + 1}", decode_start,
                                 clock.now() - decode_start, counts[row])
                yield RegionDone(row, streams[row].text)
                continue
            counts[row] += 1
            delta = streams[row].push(token)
            if delta:
                yield TextDelta(Phase.EVIDENCE, delta, region=row)
        for row, done in enumerate(finished):
            if not done:
                if decode_start is not None:
                    yield clock.span(Phase.EVIDENCE, f"region {row + 1}", decode_start,
                                     clock.now() - decode_start, counts[row])
                yield RegionDone(row, streams[row].text)
