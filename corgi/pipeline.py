"""The CoRGI phases as one stream of typed events.

    session = ChatSession(engine, image)
    for event in session.ask("What is on the sign?"):
        ...   # PhaseStarted, TextDelta, StepsParsed, EvidenceReady, AnswerReady, TurnFinished

Phase 1+2 and phase 4 continue the conversation's token sequence (and its warm KV cache);
phase 3 captions every region crop in one batch. If the stream is closed early (Stop) or a
phase fails, the conversation is cut back to where the turn started, so it stays usable.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

from PIL import Image

from . import boxes, parsing, prompts
from .boxes import grounded_steps
from .prompts import InputError, clean_question  # noqa: F401  (InputError: re-exported)
from .config import PipelineConfig
from .engine.engine import Engine, Sampling
from .types import (AnswerReady, CacheStats, Event, Evidence, EvidenceReady, Phase, PhaseFinished,
                    PhaseStarted, Span, SpanTimed, StepsParsed, StepStreamed, TextDelta,
                    TurnFinished, TurnResult)


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


class TurnClock:
    """A turn's wall time: phase times that tile the turn (each phase runs from the end of the
    one before, so they add up to the total, the moments between phases included) and the
    timeline's spans, in seconds from the turn's start."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.t0 = self._lap = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.spans: list[Span] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def vision_seconds(self) -> float:
        return self.engine.vision.seconds

    def phase_done(self, phase: Phase) -> float:
        t = time.perf_counter()
        self.timings[phase.value], self._lap = t - self._lap, t
        return self.timings[phase.value]

    def span(self, phase: Phase, part: str, start: float, seconds: float, tokens: int = 0,
             reused: int = 0) -> SpanTimed:
        self.spans.append(Span(phase, part, start, max(seconds, 0.0), tokens, reused))
        return SpanTimed(self.spans[-1])

    def prefill_spans(self, phase: Phase, start: float, vision_before: float, stats: CacheStats,
                      computed_before: int, reused_before: int) -> list[SpanTimed]:
        """At a phase's first token: its image encoding (if images were encoded) and prefill."""
        end = self.now()
        vision = self.vision_seconds() - vision_before
        events = [self.span(phase, "image encoding", start, vision)] if vision > 0 else []
        events.append(self.span(phase, "prefill", start + vision, end - start - vision,
                                stats.prefill_tokens_computed - computed_before,
                                stats.prefix_tokens_reused - reused_before))
        return events


class ChatSession:
    """The images of a conversation and the turns asked about them, on one engine Conversation.

    `ChatSession(engine, image)` or `ChatSession(engine, [view1, view2, ...])`: several images of
    the first turn (camera views) are one vision batch. `add_images([...])` attaches images that
    join the conversation: they enter at the next `ask()` (as part of that turn, so Stop and
    Regenerate take their tokens back out with it), and that turn is about them."""

    def __init__(self, engine: Engine, image: Image.Image | list[Image.Image],
                 settings: PipelineConfig | None = None):
        self.engine = engine
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise InputError("at least one image is needed")
        self.image = images[0]
        self.settings = settings or engine.config.pipeline
        try:
            if len(images) == 1:
                self.conv = engine.start_conversation(images[0], prompts.conversation_head())
            else:
                texts = prompts.multi_image_head(len(images))
                self.conv = engine.start_conversation(images[0], (texts[0][0], texts[0][1]))
                engine.add_images(self.conv, images[1:], texts[1:], in_head=True)
        except ValueError as exc:   # the processor refuses e.g. aspect ratios over 200:1
            raise InputError(f"this image cannot be used: {exc}") from None
        self.turns: list[TurnResult] = []
        self._turn_starts: list[int] = []
        self._turn_added: list[tuple[list[Image.Image], list[int]]] = []   # per turn: images it attached, images before
        self.pending: list[Image.Image] = []                # attached, enter at the next ask()
        self.current: list[int] = list(range(len(images)))  # the images the next turn is about
        # Untrusted text must not encode to any added token of this tokenizer (<|im_end|>, <think>, ...).
        self.added_tokens = engine.lm.added_tokens
        self.thinks_by_default = engine.lm.family.thinks_by_default

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the conversation (0-based indices as in Box.image), pending ones last."""
        return self.conv.images + self.pending

    def add_images(self, images: list[Image.Image]) -> list[int]:
        """Attach images that join the conversation; returns their indices. Nothing is encoded
        or re-read now: the next turn appends their tokens after the history and is about them."""
        cfg = self.engine.config.image
        for image in images:
            try:
                self.engine.image_grid(image, cfg.min_pixels, cfg.max_pixels)
            except ValueError as exc:
                raise InputError(f"this image cannot be used: {exc}") from None
        first = len(self.images)
        self.pending += list(images)
        return list(range(first, first + len(images)))

    @property
    def convention(self) -> boxes.BoxConvention:
        return self.convention_of(self.current[0] if self.current else 0)

    def convention_of(self, index: int) -> boxes.BoxConvention:
        return boxes.convention_for(self.engine.lm.family.box_style, self.conv.sizes[index])

    def warm_up(self) -> CacheStats:
        """Encode the images and prefill the conversation head now, before the first question."""
        stats = CacheStats()
        if self.conv.kv_len < len(self.conv.token_ids):
            self.engine.prefill(self.conv, stats)
        return stats

    def undo_last_turn(self) -> TurnResult | None:
        """Forget the last turn (Regenerate): its tokens leave the conversation, and so do the
        image tokens of images it attached; those images are pending again, so asking again
        attaches them again (their features come from the vision cache)."""
        if not self.turns:
            return None
        self.conv.truncate(self._turn_starts.pop())
        added, self.current = self._turn_added.pop()
        self.pending = added + self.pending
        return self.turns.pop()

    def close(self) -> None:
        self.engine.end_conversation(self.conv)

    def ask(self, question: str, settings: PipelineConfig | None = None) -> Iterator[Event]:
        settings = settings or self.settings
        question = clean_question(question, settings.max_question_chars)
        turn_start = len(self.conv.token_ids)
        (added, self.pending), current_before = (self.pending, []), self.current
        try:
            if added:
                # The new images join here, inside the turn: undoing the turn takes them out.
                texts = prompts.joined_images(len(self.conv.images) + 1, len(added))
                self.current = self.engine.add_images(self.conv, added, texts)
            result = yield from self._turn(question, settings)
        except BaseException:
            # Stop (GeneratorExit), a model error, out of memory: drop this turn's tokens
            # (and its images' tokens; the images are pending again).
            self.conv.truncate(turn_start)
            self.pending, self.current = added + self.pending, current_before
            raise
        self.turns.append(result)
        self._turn_starts.append(turn_start)
        self._turn_added.append((added, current_before))
        yield TurnFinished(result)

    # ---- the phases ---------------------------------------------------------------------
    def _turn(self, question: str, cfg: PipelineConfig) -> Iterator[Event]:
        engine, convention = self.engine, self.convention
        turn_images = list(self.current)
        # Boxes are read with the convention of the image they are on; the model names it
        # ("image": N) only when the turn has several; otherwise it is the turn's one image.
        images = parsing.ImageConventions({i: self.convention_of(i) for i in turn_images}, turn_images[0])
        grammar_images = tuple((i + 1, self.convention_of(i)) for i in turn_images) if len(turn_images) > 1 else ()
        numbers = [i + 1 for i in turn_images] if len(self.conv.images) > 1 else None
        stats, raw, prompt_texts, warnings = CacheStats(), {}, {}, []
        clock = TurnClock(engine)
        timings = clock.timings
        sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed + len(self.turns))

        plain_answer = None
        if cfg.plain_answer:
            plain_answer = yield from self._plain_answer(question, cfg, sampling, stats, clock,
                                                         raw, prompt_texts)

        # Phase 1+2: reasoning steps with boxes, continuing the conversation.
        prompt = prompts.reasoning_prompt(question, cfg.max_steps, convention, added_tokens=self.added_tokens,
                                          image_numbers=numbers)
        if not cfg.thinking:
            if cfg.structured_output:
                cfg = replace(cfg, max_thinking_chars=0)       # the grammar writes <think></think>
            elif self.thinks_by_default:
                prompt += prompts.NO_THINK
        constraint = (engine.constraint("reasoning", cfg, convention, grammar_images)
                      if cfg.structured_output else None)
        step_stream = parsing.StepStream(convention, cfg.max_steps, images)
        text = yield from self._assistant_message(Phase.REASONING, prompt, cfg.reasoning_max_new_tokens,
                                                  sampling, constraint, stats, clock, prompt_texts,
                                                  step_stream)
        raw["reasoning"] = text
        reasoning = parsing.parse_reasoning(text, convention, cfg.max_steps, images=images)
        warnings += reasoning.warnings
        if not reasoning.ok:
            warnings.append("no reasoning steps could be read from the model's output; "
                            "answering without region evidence")
        yield StepsParsed(reasoning)

        # Phase 3: evidence from every grounded step, all regions in one batch.
        grounded = grounded_steps(reasoning.steps, cfg.max_regions)
        n_grounded = len(grounded_steps(reasoning.steps, None))
        if n_grounded > len(grounded):
            warnings.append(f"{n_grounded} grounded steps; only the first {cfg.max_regions} regions were examined")
        head_before, head_after = prompts.crop_head()
        instructions = [prompts.crop_instruction(s.kind, s.statement, added_tokens=self.added_tokens)
                        for s in grounded]
        prompt_texts["evidence"] = "\n---\n".join(instructions)
        yield PhaseStarted(Phase.EVIDENCE, prompt_texts["evidence"])
        evidence: list[Evidence] = []
        if grounded:
            crops = [boxes.crop(self.conv.images[s.bbox.image], s.bbox, cfg.crop_padding) for s in grounded]
            heads = [(head_before, head_after + instruction) for instruction in instructions]
            streams = [TextStream(engine, skip_special=True) for _ in grounded]
            finished = [False] * len(grounded)
            stop_ids = engine.lm.special.stop_ids
            start, vision = clock.now(), clock.vision_seconds()
            computed, reused = stats.prefill_tokens_computed, stats.prefix_tokens_reused
            decode_start = None
            counts = [0] * len(grounded)
            for row, token in engine.generate_batch(crops, heads, cfg.evidence_max_new_tokens,
                                                    cfg.crop_max_pixels, replace(sampling), stats):
                if decode_start is None:     # the batch's prefill (and its crops' encoding) ends here
                    yield from clock.prefill_spans(Phase.EVIDENCE, start, vision, stats, computed, reused)
                    decode_start = clock.now()
                if token in stop_ids:
                    finished[row] = True
                    yield clock.span(Phase.EVIDENCE, f"region {row + 1}", decode_start,
                                     clock.now() - decode_start, counts[row])
                    yield self._evidence_ready(grounded, streams, row, evidence)
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
                    yield self._evidence_ready(grounded, streams, row, evidence)
            evidence.sort(key=lambda e: e.step_index)
        raw["evidence"] = "\n".join(e.text for e in evidence)
        yield PhaseFinished(Phase.EVIDENCE, clock.phase_done(Phase.EVIDENCE), raw["evidence"])

        # Phase 4: synthesis from the steps (already in context) and the evidence.
        prompt = prompts.synthesis_prompt(question, evidence, convention, added_tokens=self.added_tokens,
                                          image_numbers=numbers)
        if self.thinks_by_default:
            prompt += prompts.NO_THINK      # the answer directly: its thinking was phase 1+2
        constraint = (engine.constraint("synthesis", cfg, convention, grammar_images)
                      if cfg.structured_output else None)
        text = yield from self._assistant_message(Phase.SYNTHESIS, prompt, cfg.synthesis_max_new_tokens,
                                                  sampling, constraint, stats, clock, prompt_texts)
        raw["synthesis"] = text
        synthesis = parsing.parse_synthesis(text, convention, images=images)
        warnings += synthesis.warnings
        yield AnswerReady(synthesis)

        timings["total"] = sum(timings.values())     # the phases tile the turn: this is its wall time
        return TurnResult(question=question, answer=synthesis.answer, explanation=synthesis.explanation,
                          steps=reasoning.steps, evidence=evidence, key_evidence=synthesis.key_evidence,
                          timings=timings, raw=raw, prompts=prompt_texts, cache=stats, warnings=warnings,
                          plain_answer=plain_answer, images=turn_images, timeline=clock.spans)

    def _plain_answer(self, question: str, cfg: PipelineConfig, sampling: Sampling, stats: CacheStats,
                      clock: TurnClock, raw: dict, prompt_texts: dict) -> Iterator[Event]:
        """The question answered plainly, as a branch off the turn's start.

        Why before phase 1+2 and not after: the plain answer must see what CoRGI sees (images,
        history, question) and not CoRGI's own steps; at the turn's start the cache covers
        exactly that prefix. The branch appends its prompt, decodes, then cuts the conversation
        back to the turn's start: K/V layers are cut in place, linear-attention layers go back
        to the snapshot taken at that point, so phase 1+2 continues from the same warm prefix
        and the conversation's tokens are those of a turn without the plain answer."""
        engine, conv = self.engine, self.conv
        turn_start = len(conv.token_ids)
        start, vision = clock.now(), clock.vision_seconds()
        computed, reused = stats.prefill_tokens_computed, stats.prefix_tokens_reused
        if engine.cache_enabled and conv.kv_len < turn_start:
            # Compute the shared prefix first, so the branch point is a cache boundary (and, on
            # hybrid models, a snapshot): nothing before it is computed again by phase 1+2.
            engine.prefill(conv, stats)
        prompt = prompts.plain_answer_prompt(question, added_tokens=self.added_tokens)
        if self.thinks_by_default:
            prompt += prompts.NO_THINK
        prompt_texts[Phase.PLAIN.value] = prompt
        yield PhaseStarted(Phase.PLAIN, prompt)
        try:
            engine.append(conv, prompt)
            text, _ = yield from self._decode(Phase.PLAIN, cfg.plain_max_new_tokens, sampling, None, stats,
                                              clock, (start, vision, computed, reused))
        finally:
            conv.truncate(turn_start)        # the branch's tokens leave the conversation
        raw[Phase.PLAIN.value] = text
        yield PhaseFinished(Phase.PLAIN, clock.phase_done(Phase.PLAIN), text)
        return parsing.plain_text(text)

    def _assistant_message(self, phase: Phase, prompt: str, max_new_tokens: int, sampling: Sampling,
                           constraint, stats: CacheStats, clock: TurnClock, prompt_texts: dict,
                           step_stream: parsing.StepStream | None = None) -> Iterator[Event]:
        """Append `prompt`, stream the model's reply, close the message; return the reply text.
        step_stream (phase 1+2): each step is emitted as StepStreamed when its object closes."""
        engine, conv = self.engine, self.conv
        prompt_texts[phase.value] = prompt
        yield PhaseStarted(phase, prompt)
        engine.append(conv, prompt)
        text, last = yield from self._decode(phase, max_new_tokens, sampling, constraint, stats, clock,
                                             None, step_stream)
        if constraint is not None and not constraint.is_finished():
            # Out of token budget inside the structure: close it validly so it still parses.
            # The grammar gives the closing tokens (exact even when a UTF-8 character was cut).
            closing = constraint.completion_text()
            conv.token_ids.extend(constraint.finish())
            text = constraint.text()
            yield TextDelta(phase, closing)
            yield from self._streamed_steps(step_stream, closing)
        engine.append(conv, "\n" if last == engine.lm.special.im_end else prompts.END_OF_MESSAGE)
        yield PhaseFinished(phase, clock.phase_done(phase), text)
        return text

    def _decode(self, phase: Phase, max_new_tokens: int, sampling: Sampling, constraint, stats: CacheStats,
                clock: TurnClock, since: tuple | None = None,
                step_stream: parsing.StepStream | None = None) -> Iterator[Event]:
        """Stream one reply after what the conversation holds, up to a stop token (left out of
        the text); return (text, last token). Timeline: prefill up to the first token (from
        `since` = (start, vision seconds, computed, reused) when the caller prefilled already),
        then decode."""
        engine = self.engine
        if since is None:
            since = (clock.now(), clock.vision_seconds(), stats.prefill_tokens_computed, stats.prefix_tokens_reused)
        stream = TextStream(engine)
        stop_ids = engine.lm.special.stop_ids
        last, decode_start, generated = None, None, 0
        for token in engine.generate(self.conv, max_new_tokens, sampling, constraint, stats):
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
                yield from self._streamed_steps(step_stream, delta)
        if decode_start is not None:
            yield clock.span(phase, "decode", decode_start, clock.now() - decode_start, generated)
        return stream.text, last

    @staticmethod
    def _streamed_steps(step_stream: parsing.StepStream | None, delta: str) -> Iterator[Event]:
        if step_stream is not None:
            for step in step_stream.feed(delta):
                yield StepStreamed(step)

    def _evidence_ready(self, grounded, streams, row, evidence) -> EvidenceReady:
        step = grounded[row]
        item = Evidence(step_index=step.index, bbox=step.bbox, kind=step.kind, text=streams[row].text.strip())
        evidence.append(item)
        return EvidenceReady(item, region=row, total=len(grounded))
