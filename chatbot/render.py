"""Pipeline events -> what the UI shows: chat messages, the boxes image, crops, timings, traces.

Plain functions and one small accumulator (TurnView); nothing here imports Gradio or torch,
so all of it is unit-tested without a browser or a model. Messages are the dicts gr.Chatbot
takes: {"role", "content", "metadata"}; a "metadata" title makes a collapsible phase.
"""
from __future__ import annotations

import time
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from corgi import boxes
from corgi.types import (AnswerReady, CacheStats, Evidence, EvidenceReady, Phase, PhaseFinished,
                         PhaseStarted, ReasoningResult, Step, StepKind, StepsParsed, StepStreamed,
                         SynthesisResult, TextDelta, TurnFinished, TurnResult)

# Box colours by step kind; the chat names them so the legend and the picture agree.
COLOURS = {StepKind.OBJECT: (220, 38, 38), StepKind.TEXT: (37, 99, 235)}
COLOUR_NAMES = {StepKind.OBJECT: "red", StepKind.TEXT: "blue"}

PHASE_TITLES = {
    Phase.REASONING: "Reasoning: steps and regions",
    Phase.EVIDENCE: "Evidence: reading the regions",
    Phase.SYNTHESIS: "Synthesis: writing the answer",
}

# Panels a change can touch; the app re-sends only those (an image or gallery re-encodes
# PNGs on every update, the chat only sends a diff).
CHAT, BOXES, GALLERY, TIMINGS, DEBUG = "chat", "boxes", "gallery", "timings", "debug"

DISPLAY_LONG_SIDE = 1600     # no image sent to the browser is larger than this on its long side
CROP_LONG_SIDE = 480         # region crops in the gallery

NOISE_WARNING = ("**This model has random weights: its words are noise.** It is an embedded twin "
                 "(real tokenizer, random weights) that runs every code path but cannot see. For real "
                 "answers load a real checkpoint: `./launch_chatbot.sh --model Qwen/Qwen2.5-VL-3B-Instruct` "
                 "or `./launch_chatbot.sh --config configs/qwen2.5-vl-3b.yaml`.")
NOISE_NOTE = ("*Random-weight twin: this answer is noise. Load a real checkpoint "
              "(`./launch_chatbot.sh --model Qwen/Qwen2.5-VL-3B-Instruct`) for real answers.*")


def display_size(image: Image.Image, long_side: int = DISPLAY_LONG_SIDE) -> Image.Image:
    """`image` as RGB, scaled down (never up) so its long side is at most `long_side`."""
    out = image.convert("RGB")
    scale = long_side / max(out.size)
    if scale < 1:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))),
                         Image.Resampling.LANCZOS)
    return out


def steps_signature(steps: list[Step]) -> tuple:
    """What the boxes image depends on: equal signatures draw equal images."""
    return tuple((s.index, s.kind.value, s.bbox.to_list() if s.bbox else None) for s in steps)


def step_line(step: Step) -> str:
    where = step.kind.value
    if step.bbox is not None and step.kind in COLOURS:
        where += f", {COLOUR_NAMES[step.kind]} box"
    return f"- **S{step.index}** ({where}): {escape_md(step.statement)}"


def escape_md(text: str) -> str:
    """Model-written text for a chat line: no HTML tags, no images, no links."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("![", "!\\[").replace("\n", " "))


def code_block(text: str) -> str:
    """Raw model text as a fenced block: shown verbatim, never read as markdown or HTML.
    The fence is longer than any backtick run inside, so the text cannot close it."""
    run, longest = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def notice(text: str) -> dict[str, Any]:
    """A plain assistant message: errors, hints, 'stopped'."""
    return {"role": "assistant", "content": text}


def status_message(title: str, text: str, done: bool, seconds: float | None = None,
                   msg_id: str | None = None) -> dict[str, Any]:
    """A collapsible message with a spinner while pending and its duration once done."""
    meta: dict[str, Any] = {"title": title, "status": "done" if done else "pending"}
    if seconds is not None:
        meta["duration"] = round(seconds, 2)
    if msg_id:
        meta["id"] = msg_id
    return {"role": "assistant", "content": text, "metadata": meta}


def grounded_steps(steps: list[Step], max_regions: int) -> list[Step]:
    """The steps phase 3 looks at, in the pipeline's order (region r is the r-th of these)."""
    return [s for s in steps if s.bbox is not None and s.kind != StepKind.REASONING][:max_regions]


def steps_markdown(result: ReasoningResult) -> str:
    """The model's thinking as a quote, then one line per step naming its box colour."""
    lines = [f"> {line}" for line in result.thinking.strip().splitlines()]
    if lines:
        lines.append("")
    lines.extend(step_line(step) for step in result.steps)
    return "\n".join(lines)


def answer_markdown(result: SynthesisResult) -> str:
    if not result.ok:   # the parser could not read the answer: `answer` is the model's raw text
        return result.answer
    parts = [f"**{result.answer}**"]
    if result.explanation:
        parts.append(result.explanation)
    if result.key_evidence:
        parts.append("Key evidence:\n" + "\n".join(f"- {k.text}" for k in result.key_evidence))
    return "\n\n".join(parts)


class TurnView:
    """One turn as chat messages, rebuilt from the pipeline's events as they arrive.

    `apply(event)` records the event and says which panels changed; `messages()` renders the
    current state. Rendering from state (rather than patching message dicts) keeps
    stop/failure handling to one place: whatever phase was pending is closed there.
    """

    def __init__(self, question: str, number: int, max_regions: int, clock=time.perf_counter,
                 note: str | None = None):
        self.question, self.number, self.max_regions, self.clock = question, number, max_regions, clock
        self.note = note                              # appended to the answer (e.g. NOISE_NOTE)
        self.streamed: list[Step] = []                # steps as they close, before StepsParsed
        self.order: list[Phase] = [Phase.REASONING]   # pending at once: the user sees work start
        self.text: dict[Phase, str] = {Phase.REASONING: ""}
        self.started: dict[Phase, float] = {Phase.REASONING: clock()}
        self.seconds: dict[Phase, float] = {}
        self.reasoning: ReasoningResult | None = None
        self.region_text: dict[int, str] = {}
        self.evidence: dict[int, Evidence] = {}       # by region
        self.total_regions: int | None = None
        self.answer: SynthesisResult | None = None
        self.result: TurnResult | None = None
        self.ending: str | None = None                # why the turn ended early (stop, failure)

    # ---- events in ----------------------------------------------------------------
    def apply(self, event) -> set[str]:
        if isinstance(event, TextDelta):
            if event.region is None:
                self.text[event.phase] = self.text.get(event.phase, "") + event.text
            else:
                self.region_text[event.region] = self.region_text.get(event.region, "") + event.text
            return {CHAT}
        if isinstance(event, PhaseStarted):
            if event.phase not in self.order:
                self.order.append(event.phase)
            self.text.setdefault(event.phase, "")
            self.started[event.phase] = self.clock()
            return {CHAT, TIMINGS}
        if isinstance(event, PhaseFinished):
            self.seconds[event.phase] = event.seconds
            return {CHAT, TIMINGS}
        if isinstance(event, StepStreamed):
            self.streamed.append(event.step)
            return {CHAT, BOXES}
        if isinstance(event, StepsParsed):
            self.reasoning = event.result
            return {CHAT, BOXES}
        if isinstance(event, EvidenceReady):
            self.evidence[event.region] = event.evidence
            self.total_regions = event.total
            return {CHAT, GALLERY}
        if isinstance(event, AnswerReady):
            self.answer = event.result
            return {CHAT}
        if isinstance(event, TurnFinished):
            self.result = event.result
            return {CHAT, TIMINGS, DEBUG}
        return set()

    def end(self, message: str) -> None:
        """The turn stopped early (Stop, bad input, a model failure): close it with `message`."""
        self.ending = message

    # ---- what it looks like ---------------------------------------------------------
    @property
    def steps(self) -> list[Step]:
        return self.reasoning.steps if self.reasoning else list(self.streamed)

    def evidence_list(self) -> list[Evidence]:
        return [self.evidence[r] for r in sorted(self.evidence)]

    def messages(self) -> list[dict[str, Any]]:
        out = [{"role": "user", "content": self.question}]
        for phase in self.order:
            done = phase in self.seconds or self.ending is not None
            title = PHASE_TITLES[phase]
            if self.ending is not None and phase not in self.seconds:
                title += " (interrupted)"
            out.append(status_message(title, self._phase_content(phase), done, self.seconds.get(phase),
                                      msg_id=f"turn{self.number}-{phase.value}"))
            if phase == Phase.REASONING and done and self.steps:
                # The steps stay in view when their phase collapses: a plain message.
                out.append(notice("**Steps**\n" + "\n".join(step_line(s) for s in self.steps)))
        if self.answer is not None:
            text = answer_markdown(self.answer)
            out.append(notice(f"{text}\n\n{self.note}" if self.note else text))
        warnings = self.result.warnings if self.result else []
        if warnings:
            out.append(status_message(f"Notes ({len(warnings)})", "\n".join(f"- {w}" for w in warnings),
                                      done=True, msg_id=f"turn{self.number}-notes"))
        if self.ending is not None:
            out.append(notice(self.ending))
        return out

    def _phase_content(self, phase: Phase) -> str:
        if phase == Phase.REASONING:
            if self.reasoning is not None and self.reasoning.ok:
                thinking = self.reasoning.thinking.strip()
                return "\n".join(f"> {escape_md(line)}" for line in thinking.splitlines()) or "(no thinking)"
            text = self.text[phase]
            if self.streamed:     # readable lines as each step closes; the raw text is in Debug
                return "\n".join(step_line(s) for s in self.streamed) + "\n\n*writing ...*"
            if self.reasoning is not None:   # finished but unreadable: show what came out
                return code_block(text) + "\n\n*No reasoning steps could be read from this output.*"
            return code_block(text) if text else ""
        if phase == Phase.EVIDENCE:
            regions = grounded_steps(self.steps, self.max_regions)
            if not regions and phase in self.seconds:
                return "No step marked a region, so there was nothing to look at."
            lines = []
            for r, step in enumerate(regions):
                if r in self.evidence:
                    text = self.evidence[r].text or "(nothing found)"
                else:
                    text = (self.region_text.get(r, "") + " ...").strip()
                reading = "reads" if step.kind == StepKind.TEXT else "sees"
                lines.append(f"- **S{step.index}** {reading}: {text}")
            return "\n".join(lines)
        text = self.text.get(phase, "")
        return code_block(text) if text else ""

    def live_seconds(self) -> dict[str, float | str]:
        """Phase durations so far: finished phases exact, the running one as 'n.n...'."""
        out: dict[str, float | str] = {}
        for phase in self.order:
            if phase in self.seconds:
                out[phase.value] = round(self.seconds[phase], 2)
            elif self.ending is None:
                out[phase.value] = f"{self.clock() - self.started[phase]:.1f}..."
        return out


# ---- side panel ---------------------------------------------------------------------

def draw_boxes(image: Image.Image, steps: list[Step]) -> Image.Image:
    """A copy of `image` with each grounded step's box outlined in its kind's colour and
    labelled S1, S2... (reasoning steps have no region and are not drawn)."""
    out = display_size(image)    # always a copy, at most display size
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    width = max(2, round(short / 150))
    font = ImageFont.load_default(size=max(12, round(short / 28)))
    placed: list[tuple[int, int, int, int]] = []
    for step in steps:
        if step.bbox is None or step.kind not in COLOURS:
            continue
        colour = COLOURS[step.kind]
        x1, y1, x2, y2 = step.bbox.to_pixels(out.width, out.height)
        x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)    # to_pixels' end is exclusive, rectangle's inclusive
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        label = f"S{step.index}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        pad = max(2, width)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        # The tag sits above the box's top-left corner, or inside it when there is no room.
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1
        tx = min(x1, max(0, out.width - tag_w))
        # Labels never overlap: move a tag down (then right) past the tags already placed.
        for _ in range(len(placed) + 1):
            hit = next((p for p in placed if tx < p[2] and p[0] < tx + tag_w and ty < p[3] and p[1] < ty + tag_h), None)
            if hit is None:
                break
            ty = hit[3]
            if ty + tag_h > out.height:
                ty, tx = max(0, y1 - tag_h), min(hit[2], max(0, out.width - tag_w))
        placed.append((tx, ty, tx + tag_w, ty + tag_h))
        draw.rectangle((tx, ty, tx + tag_w - 1, ty + tag_h - 1), fill=colour)
        draw.text((tx + pad - left, ty + pad - top), label, fill=(255, 255, 255), font=font)
    return out


def gallery_items(image: Image.Image, evidence: list[Evidence], padding: float) -> list[tuple[Image.Image, str]]:
    """(crop, caption) per region, cropped exactly as the model saw it."""
    items = []
    for e in evidence:
        verb = "reads" if e.kind == StepKind.TEXT else "sees"
        crop = display_size(boxes.crop(image, e.bbox, padding), CROP_LONG_SIDE)
        items.append((crop, f"S{e.step_index} {verb}: {e.text or '(nothing found)'}"))
    return items


TIMING_ROWS = [
    ("reasoning s", "reasoning"), ("evidence s", "evidence"), ("synthesis s", "synthesis"),
    ("total s", "total"),
    ("vision hits", "vision_hits"), ("vision misses", "vision_misses"),
    ("prompt tokens", "prompt_tokens"), ("prefill computed", "prefill_tokens_computed"),
    ("prefix reused", "prefix_tokens_reused"),
    ("region crops encoded", "region_vision_misses"), ("region crops cached", "region_vision_hits"),
]


def timings_table(warmup: tuple[CacheStats, float] | None, results: list[TurnResult],
                  live: TurnView | None = None) -> dict[str, Any]:
    """Metrics as rows, one column per turn (a narrow panel fits a tall table better).

    'image' is the upload's warm-up (image encoded, conversation head prefilled); the live
    column fills in phase by phase, its cache counters once the turn ends."""
    columns: list[tuple[str, dict[str, Any]]] = []
    if warmup is not None:
        stats, seconds = warmup
        columns.append(("image", {"total": round(seconds, 2), **stats.to_json()}))
    for n, result in enumerate(results, 1):
        columns.append((f"turn {n}", {**{k: round(v, 2) for k, v in result.timings.items()},
                                      **result.cache.to_json()}))
    if live is not None and live.result is None:
        columns.append((f"turn {len(results) + 1}", live.live_seconds()))
    if not columns:
        return {"headers": ["metric"], "data": []}
    data = []
    for label, key in TIMING_ROWS:
        data.append([label] + [values.get(key, "") for _, values in columns])
    return {"headers": ["metric"] + [name for name, _ in columns], "data": data}


# ---- debugging and traces -----------------------------------------------------------

def debug_json(results: list[TurnResult]) -> dict[str, Any]:
    """Per turn: the parsed result, raw outputs, cache and timings, plus each phase's prompt."""
    return {f"turn {n}": {**r.to_json(), "prompts": dict(r.prompts)} for n, r in enumerate(results, 1)}


def debug_text(results: list[TurnResult]) -> str:
    """Prompts and raw outputs as plain text, the latest turn first (the one usually debugged);
    within a turn in the order the model saw and wrote them."""
    parts = []
    for n, r in reversed(list(enumerate(results, 1))):
        parts.append(f"######## turn {n}: {r.question}")
        for phase in ("reasoning", "evidence", "synthesis"):
            if phase in r.prompts:
                parts.append(f"==== {phase} prompt ====\n{r.prompts[phase]}")
            if phase in r.raw:
                parts.append(f"==== {phase} output ====\n{r.raw[phase]}")
    return "\n\n".join(parts)


def trace(model: dict[str, str], results: list[TurnResult]) -> dict[str, Any]:
    """The same JSON object `python -m corgi run --json` prints."""
    return {"model": dict(model), "turns": [r.to_json() for r in results]}
