"""The CoRGI phases as one stream of typed events.

    session = ChatSession(engine, image)
    for event in session.ask("What is on the sign?"):
        ...   # PhaseStarted, TextDelta, StepsParsed, EvidenceReady, AnswerReady, TurnFinished

Phase 1+2 and phase 4 continue the conversation (locally its token sequence and warm KV
cache; on a server its messages, which the server's prefix cache keeps warm); phase 3 captions
every region crop at once. If the stream is closed early (Stop) or a phase fails, the
conversation is cut back to where the turn started, so it stays usable.

What produces the text is a backend: `local.LocalBackend` (the engine in this process) or
`remote.RemoteBackend` (an OpenAI-compatible server). The phases, prompts, parsing, events and
timings are the same for both.
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
from .json_schemas import Structure
from .types import (AnswerReady, CacheStats, Event, Evidence, EvidenceReady, Phase, PhaseFinished,
                    PhaseStarted, RegionDone, Sampling, Span, SpanTimed, StepsParsed, StepStreamed, TextDelta,
                    TurnFinished, TurnResult)


def as_backend(engine_or_backend):
    """An Engine (the local model) becomes a LocalBackend; a backend stays what it is."""
    if hasattr(engine_or_backend, "reply"):
        return engine_or_backend
    from .local import LocalBackend
    return LocalBackend(engine_or_backend)


class TurnClock:
    """A turn's wall time: phase times that tile the turn (each phase runs from the end of the
    one before, so they add up to the total, the moments between phases included) and the
    timeline's spans, in seconds from the turn's start."""

    def __init__(self, backend):
        self.backend = backend
        self.t0 = self._lap = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.spans: list[Span] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def vision_seconds(self) -> float:
        return self.backend.vision_seconds()

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
    """The images of a conversation and the turns asked about them, on one backend conversation.

    `ChatSession(engine, image)` (the local model) or `ChatSession(backend, [view1, view2, ...])`
    (a `LocalBackend`, a `remote.RemoteBackend`): several images of the first turn (camera
    views) are one vision batch. `add_images([...])` attaches images that join the
    conversation: they enter at the next `ask()` (as part of that turn, so Stop and Regenerate
    take them back out with it), and that turn is about them.

    The phases are written once, here; a backend only produces text: `reply()` streams one
    assistant message after the conversation, `captions()` the region captions of phase 3."""

    def __init__(self, engine, image: Image.Image | list[Image.Image],
                 settings: PipelineConfig | None = None):
        self.backend = as_backend(engine)
        self.engine = getattr(self.backend, "engine", self.backend)
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise InputError("at least one image is needed")
        self.image = images[0]
        self.settings = settings or self.backend.config.pipeline
        try:
            self.conv = self.backend.start(images)
        except ValueError as exc:   # the processor refuses e.g. aspect ratios over 200:1
            raise InputError(f"this image cannot be used: {exc}") from None
        self.turns: list[TurnResult] = []
        self._turn_starts: list[int] = []
        self._turn_added: list[tuple[list[Image.Image], list[int]]] = []   # per turn: images it attached, images before
        self.pending: list[Image.Image] = []                # attached, enter at the next ask()
        self.current: list[int] = list(range(len(images)))  # the images the next turn is about
        self.added_tokens = self.backend.added_tokens
        self.thinks_by_default = self.backend.family.thinks_by_default

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the conversation (0-based indices as in Box.image), pending ones last."""
        return self.conv.images + self.pending

    def add_images(self, images: list[Image.Image]) -> list[int]:
        """Attach images that join the conversation; returns their indices. Nothing is encoded
        or re-read now: the next turn appends their tokens after the history and is about them."""
        for image in images:
            try:
                self.backend.check_image(image)
            except ValueError as exc:
                raise InputError(f"this image cannot be used: {exc}") from None
        first = len(self.images)
        self.pending += list(images)
        return list(range(first, first + len(images)))

    @property
    def convention(self) -> boxes.BoxConvention:
        return self.convention_of(self.current[0] if self.current else 0)

    def convention_of(self, index: int) -> boxes.BoxConvention:
        return boxes.convention_for(self.backend.family.box_style, self.conv.sizes[index])

    def warm_up(self) -> CacheStats:
        """Encode the images and prefill the conversation head now, before the first question."""
        stats = CacheStats()
        self.backend.warm_up(self.conv, stats)
        return stats

    def undo_last_turn(self) -> TurnResult | None:
        """Forget the last turn (Regenerate): its tokens leave the conversation, and so do the
        image tokens of images it attached; those images are pending again, so asking again
        attaches them again (their features come from the vision cache)."""
        if not self.turns:
            return None
        self.backend.truncate(self.conv, self._turn_starts.pop())
        added, self.current = self._turn_added.pop()
        self.pending = added + self.pending
        return self.turns.pop()

    def close(self) -> None:
        self.backend.close(self.conv)

    def ask(self, question: str, settings: PipelineConfig | None = None) -> Iterator[Event]:
        settings = settings or self.settings
        question = clean_question(question, settings.max_question_chars)
        turn_start = self.backend.mark(self.conv)
        (added, self.pending), current_before = (self.pending, []), self.current
        try:
            if added:
                # The new images join here, inside the turn: undoing the turn takes them out.
                self.current = self.backend.join(self.conv, added)
            result = yield from self._turn(question, settings)
        except BaseException:
            # Stop (GeneratorExit), a model or server error, out of memory: drop this turn's
            # messages (and its images; the images are pending again).
            self.backend.truncate(self.conv, turn_start)
            self.pending, self.current = added + self.pending, current_before
            raise
        self.turns.append(result)
        self._turn_starts.append(turn_start)
        self._turn_added.append((added, current_before))
        yield TurnFinished(result)

    # ---- the phases ---------------------------------------------------------------------
    def _turn(self, question: str, cfg: PipelineConfig) -> Iterator[Event]:
        backend, convention = self.backend, self.convention
        structured = cfg.structured_output
        turn_images = list(self.current)
        # Boxes are read with the convention of the image they are on; the model names it
        # ("image": N) only when the turn has several; otherwise it is the turn's one image.
        images = parsing.ImageConventions({i: self.convention_of(i) for i in turn_images}, turn_images[0])
        grammar_images = tuple((i + 1, self.convention_of(i)) for i in turn_images) if len(turn_images) > 1 else ()
        numbers = [i + 1 for i in turn_images] if len(self.conv.images) > 1 else None
        stats, raw, prompt_texts, warnings = CacheStats(), {}, {}, []
        clock = TurnClock(backend)
        timings = clock.timings
        sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed + len(self.turns))

        plain_answer = None
        if cfg.plain_answer:
            plain_answer = yield from self._plain_answer(question, cfg, sampling, stats, clock,
                                                         raw, prompt_texts)

        # Phase 1+2: reasoning steps with boxes, continuing the conversation.
        # A server's JSON schema cannot hold the think block: there the JSON comes alone (a
        # server with a reasoning parser sends its thinking apart, as <think> text here).
        think_block = not (structured and getattr(backend, "schema_only", False))
        content = prompts.reasoning_request(question, cfg.max_steps, convention, added_tokens=self.added_tokens,
                                            image_numbers=numbers, think=think_block)
        no_think = False
        if not cfg.thinking:
            if structured:
                cfg = replace(cfg, max_thinking_chars=0)       # the grammar writes <think></think>
            # Locally a structured phase's grammar writes the empty block itself.
            no_think = self.thinks_by_default and not (structured and think_block)
        structure = Structure("reasoning", cfg, convention, grammar_images) if structured else None
        step_stream = parsing.StepStream(convention, cfg.max_steps, images)
        text = yield from self._assistant_message(Phase.REASONING, content, no_think, cfg.reasoning_max_new_tokens,
                                                  sampling, structure, stats, clock, prompt_texts,
                                                  step_stream)
        raw["reasoning"] = text
        warnings += self._schema_warnings(structure, text)
        reasoning = parsing.parse_reasoning(text, convention, cfg.max_steps, images=images)
        warnings += reasoning.warnings
        if not reasoning.ok:
            warnings.append("no reasoning steps could be read from the model's output; "
                            "answering without region evidence")
        yield StepsParsed(reasoning)

        # Phase 3: evidence from every grounded step, all regions at once.
        grounded = grounded_steps(reasoning.steps, cfg.max_regions)
        n_grounded = len(grounded_steps(reasoning.steps, None))
        if n_grounded > len(grounded):
            warnings.append(f"{n_grounded} grounded steps; only the first {cfg.max_regions} regions were examined")
        tasks = [prompts.crop_task(s.kind, s.statement, added_tokens=self.added_tokens) for s in grounded]
        prompt_texts["evidence"] = "\n---\n".join(tasks)
        yield PhaseStarted(Phase.EVIDENCE, prompt_texts["evidence"])
        evidence: list[Evidence] = []
        if grounded:
            crops = [boxes.crop(self.conv.images[s.bbox.image], s.bbox, cfg.crop_padding) for s in grounded]
            for event in backend.captions(crops, tasks, cfg.evidence_max_new_tokens, cfg.crop_max_pixels,
                                          replace(sampling), stats, clock):
                if isinstance(event, RegionDone):
                    step = grounded[event.region]
                    item = Evidence(step_index=step.index, bbox=step.bbox, kind=step.kind, text=event.text.strip())
                    evidence.append(item)
                    yield EvidenceReady(item, region=event.region, total=len(grounded))
                else:
                    yield event
            evidence.sort(key=lambda e: e.step_index)
        raw["evidence"] = "\n".join(e.text for e in evidence)
        yield PhaseFinished(Phase.EVIDENCE, clock.phase_done(Phase.EVIDENCE), raw["evidence"])

        # Phase 4: synthesis from the steps (already in context) and the evidence.
        content = prompts.synthesis_request(question, evidence, convention, added_tokens=self.added_tokens,
                                            image_numbers=numbers)
        # The answer directly: its thinking was phase 1+2.
        structure = Structure("synthesis", cfg, convention, grammar_images) if structured else None
        text = yield from self._assistant_message(Phase.SYNTHESIS, content, self.thinks_by_default,
                                                  cfg.synthesis_max_new_tokens, sampling, structure, stats, clock,
                                                  prompt_texts)
        raw["synthesis"] = text
        warnings += self._schema_warnings(structure, text)
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
        history, question) and not CoRGI's own steps; at the turn's start the conversation
        holds exactly that prefix. The branch's reply leaves the conversation again (locally:
        K/V layers cut in place, linear-attention layers back to the snapshot taken there), so
        phase 1+2 continues from the same warm prefix and the conversation is that of a turn
        without the plain answer."""
        content = prompts.plain_answer_request(question, added_tokens=self.added_tokens)
        prompt = self.backend.prompt(content, self.thinks_by_default)
        prompt_texts[Phase.PLAIN.value] = prompt
        yield PhaseStarted(Phase.PLAIN, prompt)
        text = yield from self.backend.reply(self.conv, Phase.PLAIN, prompt, cfg.plain_max_new_tokens, sampling,
                                             None, stats, clock, no_think=self.thinks_by_default, branch=True)
        raw[Phase.PLAIN.value] = text
        yield PhaseFinished(Phase.PLAIN, clock.phase_done(Phase.PLAIN), text)
        return parsing.plain_text(text)

    def _assistant_message(self, phase: Phase, content: str, no_think: bool, max_new_tokens: int,
                           sampling: Sampling, structure: Structure | None, stats: CacheStats, clock: TurnClock,
                           prompt_texts: dict, step_stream: parsing.StepStream | None = None) -> Iterator[Event]:
        """The phase's user message, then the model's reply streamed and kept in the
        conversation; return the reply text. step_stream (phase 1+2): each step is emitted as
        StepStreamed when its object closes."""
        prompt = self.backend.prompt(content, no_think)
        prompt_texts[phase.value] = prompt
        yield PhaseStarted(phase, prompt)
        reply = self.backend.reply(self.conv, phase, prompt, max_new_tokens, sampling, structure, stats, clock,
                                   no_think=no_think)
        text = yield from self._streamed_steps(reply, step_stream)
        yield PhaseFinished(phase, clock.phase_done(phase), text)
        return text

    @staticmethod
    def _streamed_steps(reply: Iterator, step_stream: parsing.StepStream | None) -> Iterator[Event]:
        """Pass the reply's events on, and each step as it closes; return the reply's text."""
        while True:
            try:
                event = next(reply)
            except StopIteration as done:
                return done.value
            yield event
            if step_stream is not None and isinstance(event, TextDelta):
                for step in step_stream.feed(event.text):
                    yield StepStreamed(step)

    def _schema_warnings(self, structure: Structure | None, text: str) -> list[str]:
        """A structured phase whose output is not the JSON asked for: the server ignored the
        schema (response_format), and the tolerant parser reads what it wrote."""
        if structure is None or parsing.is_json_object(text):
            return []
        return [f"the {self.backend.name} backend's {structure.phase} output is not the JSON its schema asks "
                f"for (the server may ignore response_format); it was read with the tolerant parser"]
