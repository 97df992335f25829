"""Pipeline events -> what the UI shows: chat messages, the boxes image, crops, timings, traces.

Plain functions and one small accumulator (TurnView); nothing here imports Gradio or torch,
so all of it is unit-tested without a browser or a model. Messages are the dicts gr.Chatbot
takes: {"role", "content", "metadata"}; a "metadata" title makes a collapsible phase.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from corgi import boxes
from corgi.types import (AnswerReady, CacheStats, Evidence, EvidenceReady, KeyEvidence, Phase, PhaseFinished,
                         PhaseStarted, ReasoningResult, Span, SpanTimed, Step, StepKind, StepsParsed,
                         StepStreamed, SynthesisResult, TextDelta, TurnFinished, TurnResult)

# Box colours by step kind; the chat names them so the legend and the picture agree.
COLOURS = {StepKind.OBJECT: (220, 38, 38), StepKind.TEXT: (37, 99, 235)}
COLOUR_NAMES = {StepKind.OBJECT: "red", StepKind.TEXT: "blue"}
KEY_EVIDENCE_COLOUR = (22, 163, 74)      # the answer's key-evidence boxes (K1, K2 ...): green

PHASE_TITLES = {
    Phase.REASONING: "Reasoning: steps and regions",
    Phase.EVIDENCE: "Evidence: reading the regions",
    Phase.SYNTHESIS: "Synthesis: writing the answer",
    Phase.PLAIN: "Plain answer (no grounding, for comparison)",
}

# Panels a change can touch; the app re-sends only those (an image or gallery re-encodes
# on every update, the chat only sends a diff). TIMINGS covers the timeline and the table.
CHAT, BOXES, GALLERY, TIMINGS, DEBUG = "chat", "boxes", "gallery", "timings", "debug"

DISPLAY_LONG_SIDE = 1600     # no image sent to the browser is larger than this on its long side
BOXES_LONG_SIDE = 1280       # the boxes picture, re-sent as steps stream: a panel, and full screen
CROP_LONG_SIDE = 480         # region crops in the gallery

NOISE_WARNING = ("**This model has random weights: its words are noise.** It is an embedded twin "
                 "(real tokenizer, random weights) that runs every code path but cannot see. For real "
                 "answers load a real checkpoint: `./launch_chatbot.sh --model Qwen/Qwen2.5-VL-3B-Instruct` "
                 "or `./launch_chatbot.sh --config configs/qwen2.5-vl-3b.yaml`.")
NOISE_NOTE = ("*Random-weight twin: this answer is noise. Load a real checkpoint "
              "(`./launch_chatbot.sh --model Qwen/Qwen2.5-VL-3B-Instruct`) for real answers.*")


def model_line(info: dict[str, str]) -> str:
    """Which model, on what: "`id` on cpu", or "`id` (qwen3-vl) on the openai server http://..."."""
    if info.get("backend", "local") == "local":
        return f"`{info['id']}` on {info['device']}"
    return f"`{info['id']}` ({info['family']}) on the {info['backend']} server {info.get('server', '')}"


def display_size(image: Image.Image, long_side: int = DISPLAY_LONG_SIDE) -> Image.Image:
    """`image` as RGB, scaled down (never up) so its long side is at most `long_side`."""
    out = image.convert("RGB")
    scale = long_side / max(out.size)
    if scale < 1:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))),
                         Image.Resampling.LANCZOS)
    return out


def thumbnail(image: Image.Image, long_side: int, framed: bool = False) -> Image.Image:
    """A small copy; `framed`: an orange frame (the image the next question is about)."""
    out = display_size(image, long_side)
    if framed:
        pad = max(4, long_side // 40)
        frame = Image.new("RGB", (out.width + 2 * pad, out.height + 2 * pad), (249, 115, 22))
        frame.paste(out, (pad, pad))
        out = frame
    return out


def steps_signature(steps: list[Step]) -> tuple:
    """What the boxes image depends on: equal signatures draw equal images."""
    return tuple((s.index, s.kind.value, s.bbox.to_list() if s.bbox else None) for s in steps)


def seconds_text(seconds: float) -> str:
    """The one duration format of the UI (chat, timeline, report): '0.42 s', '12.3 s'."""
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def step_line(step: Step, image_numbers: bool = False) -> str:
    where = step.kind.value
    if step.bbox is not None and step.kind in COLOURS:
        where += f", {COLOUR_NAMES[step.kind]} box"
        if image_numbers:
            where += f" on image {step.bbox.image + 1}"
    return f"- **S{step.index}** ({where}): {escape_md(step.statement)}"


def escape_md(text: str) -> str:
    """Model-written text for a chat line: no HTML tags, no images, no links (markdown brackets
    escaped; "://" written with entities, so a bare URL is not auto-linked either)."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("[", "\\[").replace("]", "\\]").replace("://", ":&#47;&#47;").replace("\n", " "))


def code_block(text: str) -> str:
    """Raw model text as a fenced block: shown verbatim, never read as markdown or HTML.
    The fence is longer than any backtick run inside, so the text cannot close it."""
    run, longest = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def question_message(text: str) -> dict[str, Any]:
    """The user's question as the chat shows it (Markdown escaped: it is text, not markup)."""
    return {"role": "user", "content": escape_md(text)}


def notice(text: str) -> dict[str, Any]:
    """A plain assistant message: errors, hints, 'stopped'."""
    return {"role": "assistant", "content": text}


def status_message(title: str, text: str, done: bool, seconds: float | None = None,
                   msg_id: str | None = None) -> dict[str, Any]:
    """A collapsible message with a spinner while pending and its duration once done."""
    meta: dict[str, Any] = {"title": title, "status": "done" if done else "pending"}
    if seconds is not None:
        meta["log"] = seconds_text(seconds)       # the UI's one duration format (Gradio's "duration" has its own)
    if msg_id:
        meta["id"] = msg_id
    return {"role": "assistant", "content": text, "metadata": meta}


def steps_markdown(result: ReasoningResult) -> str:
    """The model's thinking as a quote, then one line per step naming its box colour."""
    lines = [f"> {line}" for line in result.thinking.strip().splitlines()]
    if lines:
        lines.append("")
    lines.extend(step_line(step) for step in result.steps)
    return "\n".join(lines)


def answer_markdown(result: SynthesisResult) -> str:
    """Model text, escaped: what a model reads out of an image must not become live markup."""
    if not result.ok:   # the parser could not read the answer: `answer` is the model's raw text
        return "\n\n".join(escape_md(line) for line in result.answer.splitlines() if line.strip())
    parts = [f"**{escape_md(result.answer)}**"]
    if result.explanation:
        parts.append(escape_md(result.explanation))
    if result.key_evidence:
        parts.append("Key evidence (green boxes):\n" + "\n".join(
            f"- {'**K%d** ' % n if k.bbox else ''}{escape_md(k.text)}"
            for n, k in enumerate(result.key_evidence, 1)))
    return "\n\n".join(parts)


def compare_markdown(corgi: str, corgi_seconds: float | None, plain: str, plain_seconds: float | None) -> str:
    """The CoRGI answer beside the plain one (both already escaped markdown), as a table."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n\n", "<br><br>").replace("\n", "<br>")
    corgi_title = "CoRGI (grounded)" + (f", {seconds_text(corgi_seconds)}" if corgi_seconds is not None else "")
    plain_title = "Plain answer" + (f", {seconds_text(plain_seconds)}" if plain_seconds is not None else "")
    return f"| {corgi_title} | {plain_title} |\n|---|---|\n| {cell(corgi)} | {cell(plain)} |"


class TurnView:
    """One turn as chat messages, rebuilt from the pipeline's events as they arrive.

    `apply(event)` records the event and says which panels changed; `messages()` renders the
    current state. Rendering from state (rather than patching message dicts) keeps
    stop/failure handling to one place: whatever phase was pending is closed there.
    """

    def __init__(self, question: str, number: int, max_regions: int, clock=time.perf_counter,
                 note: str | None = None, plain: bool = False, image_numbers: bool = False):
        self.question, self.number, self.max_regions, self.clock = question, number, max_regions, clock
        self.note = note                              # appended to the answer (e.g. NOISE_NOTE)
        self.image_numbers = image_numbers            # several images: steps say which one
        self.streamed: list[Step] = []                # steps as they close, before StepsParsed
        first = Phase.PLAIN if plain else Phase.REASONING
        self.order: list[Phase] = [first]             # pending at once: the user sees work start
        self.text: dict[Phase, str] = {first: ""}
        self.started: dict[Phase, float] = {first: clock()}
        self.t0 = self.started[first]
        self.seconds: dict[Phase, float] = {}
        self.spans: list[Span] = []                   # the timeline so far
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
        if isinstance(event, SpanTimed):
            self.spans.append(event.span)
            return {TIMINGS}
        if isinstance(event, StepsParsed):
            self.reasoning = event.result
            return {CHAT, BOXES}
        if isinstance(event, EvidenceReady):
            self.evidence[event.region] = event.evidence
            self.total_regions = event.total
            return {CHAT, GALLERY}
        if isinstance(event, AnswerReady):
            self.answer = event.result
            return {CHAT, BOXES}          # its key-evidence boxes
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

    @property
    def key_evidence(self) -> list[KeyEvidence]:
        return self.answer.key_evidence if self.answer is not None and self.answer.ok else []

    def elapsed(self) -> float:
        """Seconds since the turn started: finished phases exact, the running one so far."""
        done = sum(self.seconds.values())
        running = [p for p in self.order if p not in self.seconds]
        if running and self.ending is None:
            return done + max(0.0, self.clock() - self.started[running[-1]])
        return done

    def messages(self) -> list[dict[str, Any]]:
        out = [question_message(self.question)]
        for phase in self.order:
            done = phase in self.seconds or self.ending is not None
            title = PHASE_TITLES[phase]
            if self.ending is not None and phase not in self.seconds:
                title += " (interrupted)"
            out.append(status_message(title, self._phase_content(phase), done, self.seconds.get(phase),
                                      msg_id=f"turn{self.number}-{phase.value}"))
            if phase == Phase.REASONING and done and self.steps:
                # The steps stay in view when their phase collapses: a plain message.
                out.append(notice("**Steps** (pick one on the image or in the list beside it)\n"
                                  + "\n".join(step_line(s, self.image_numbers) for s in self.steps)))
        if self.answer is not None:
            text = answer_markdown(self.answer)
            if Phase.PLAIN in self.seconds:
                plain = self.result.plain_answer if self.result and self.result.plain_answer is not None \
                    else self.text.get(Phase.PLAIN, "").strip()
                corgi_seconds = sum(v for p, v in self.seconds.items() if p != Phase.PLAIN)
                text = compare_markdown(text, corgi_seconds, escape_md(plain) or "(no answer)",
                                        self.seconds[Phase.PLAIN])
            out.append(notice(f"{text}\n\n{self.note}" if self.note else text))
        warnings = self.result.warnings if self.result else []
        if warnings:
            out.append(status_message(f"Notes ({len(warnings)})",
                                      "\n".join(f"- {escape_md(w)}" for w in warnings),
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
                return "\n".join(step_line(s, self.image_numbers) for s in self.streamed) + "\n\n*writing ...*"
            if self.reasoning is not None:   # finished but unreadable: show what came out
                return code_block(text) + "\n\n*No reasoning steps could be read from this output.*"
            return code_block(text) if text else ""
        if phase == Phase.EVIDENCE:
            regions = boxes.grounded_steps(self.steps, self.max_regions)   # region r: the r-th
            if not regions and phase in self.seconds:
                return "No step marked a region, so there was nothing to look at."
            lines = []
            for r, step in enumerate(regions):
                if r in self.evidence:
                    text = escape_md(self.evidence[r].text) or "(nothing found)"
                else:
                    text = (escape_md(self.region_text.get(r, "")) + " ...").strip()
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

def draw_boxes(image: Image.Image, steps: list[Step], key_evidence: list[tuple[int, KeyEvidence]] = (),
               highlight: int | None = None) -> Image.Image:
    """A copy of `image` with each grounded step's box outlined in its kind's colour and
    labelled S1, S2... (reasoning steps have no region and are not drawn), the answer's
    key-evidence boxes in green ((n, evidence) pairs, tagged Kn), and step `highlight` (an S
    number) shaded."""
    out = display_size(image)    # always a copy, at most display size
    short = min(out.size)
    width = max(2, round(short / 150))
    marks = [(f"S{s.index}", s.bbox, COLOURS[s.kind], s.index == highlight)
             for s in steps if s.bbox is not None and s.kind in COLOURS]
    marks += [(f"K{n}", k.bbox, KEY_EVIDENCE_COLOUR, False) for n, k in key_evidence if k.bbox]
    if highlight is not None and any(h for *_, h in marks):
        shade = Image.new("RGBA", out.size, (0, 0, 0, 0))
        for _, box, colour, lit in marks:
            if lit:
                ImageDraw.Draw(shade).rectangle(box.to_pixels(out.width, out.height), fill=(*colour, 70))
        out = Image.alpha_composite(out.convert("RGBA"), shade).convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, round(short / 28)))
    placed: list[tuple[int, int, int, int]] = []
    for label, box, colour, lit in marks:
        x1, y1, x2, y2 = box.to_pixels(out.width, out.height)
        x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)    # to_pixels' end is exclusive, rectangle's inclusive
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width * 2 if lit else width)
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


@dataclass(frozen=True)
class Tile:
    """Where conversation image `image` lies in the boxes panel's picture (pixels)."""
    image: int
    x: int
    width: int
    height: int


def boxes_view(images: list[tuple[int, Image.Image]], steps: list[Step], key_evidence: list[KeyEvidence] = (),
               highlight: int | None = None) -> tuple[Image.Image, list[Tile]]:
    """The images a turn is about, side by side at one height (one image: itself), each with
    the boxes that lie on it; at most display size in all. Returns the picture and its tiles."""
    drawn = [(i, draw_boxes(display_size(image, BOXES_LONG_SIDE), [s for s in steps if s.bbox and s.bbox.image == i],
                            [(n, k) for n, k in enumerate(key_evidence, 1) if k.bbox and k.bbox.image == i],
                            highlight))
             for i, image in images]
    if len(drawn) == 1:
        i, picture = drawn[0]
        return picture, [Tile(i, 0, picture.width, picture.height)]
    height = min(p.height for _, p in drawn)
    scaled = [(i, p.resize((max(1, round(p.width * height / p.height)), height), Image.Resampling.LANCZOS))
              for i, p in drawn]
    gap = max(4, height // 60)
    picture = Image.new("RGB", (sum(p.width for _, p in scaled) + gap * (len(scaled) - 1), height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, height // 24))
    tiles, x = [], 0
    for i, p in scaled:
        picture.paste(p, (x, 0))
        label = f"image {i + 1}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        draw.rectangle((x, height - (bottom - top) - 8, x + right - left + 8, height), fill=(17, 24, 39))
        draw.text((x + 4 - left, height - (bottom - top) - 4 - top), label, fill=(255, 255, 255), font=font)
        tiles.append(Tile(i, x, p.width, p.height))
        x += p.width + gap
    picture = display_size(picture, BOXES_LONG_SIDE)
    if picture.width != x - gap:      # scaled down to display size: so are the tiles
        f = picture.width / (x - gap)
        tiles = [Tile(t.image, round(t.x * f), round(t.width * f), round(t.height * f)) for t in tiles]
    return picture, tiles


def step_at(tiles: list[Tile], steps: list[Step], x: float, y: float) -> int | None:
    """The S number of the smallest step box under pixel (x, y) of the boxes picture."""
    for tile in tiles:
        if tile.x <= x < tile.x + tile.width and 0 <= y < tile.height:
            u, v = (x - tile.x) / tile.width, y / tile.height
            under = [s for s in steps if s.bbox is not None and s.bbox.image == tile.image
                     and s.kind in COLOURS and s.bbox.x1 <= u <= s.bbox.x2 and s.bbox.y1 <= v <= s.bbox.y2]
            return min(under, key=lambda s: s.bbox.area).index if under else None
    return None


def gallery_items(images: list[Image.Image], evidence: list[Evidence], padding: float,
                  picked: int | None = None) -> list[tuple[Image.Image, str]]:
    """(crop, caption) per region, cropped exactly as the model saw it, from the image its box is
    on; the picked step's crop is framed in its colour and its caption marked."""
    items = []
    for e in evidence:
        verb = "reads" if e.kind == StepKind.TEXT else "sees"
        crop = display_size(boxes.crop(images[e.bbox.image], e.bbox, padding), CROP_LONG_SIDE)
        mark = ""
        if e.step_index == picked:
            framed = Image.new("RGB", (crop.width + 12, crop.height + 12), COLOURS.get(e.kind, KEY_EVIDENCE_COLOUR))
            framed.paste(crop, (6, 6))
            crop, mark = framed, "▶ "
        items.append((crop, f"{mark}S{e.step_index} {verb}: {e.text or '(nothing found)'}"))
    return items


def selected_markdown(step: Step | None, evidence: list[Evidence], image_numbers: bool = False) -> str:
    """What the picked step says and what its region showed."""
    if step is None:
        return "*Pick a step (in the list or on its box) to see what it says and what its region showed.*"
    line = step_line(step, image_numbers).removeprefix("- ")
    found = next((e for e in evidence if e.step_index == step.index), None)
    if found is not None:
        verb = "read" if found.kind == StepKind.TEXT else "saw"
        line += f"\n\nIts region {verb}: {escape_md(found.text) or '(nothing found)'}"
    elif step.bbox is None:
        line += "\n\n(a reasoning step: no region)"
    return line


# ---- timeline and timings -------------------------------------------------------------

PART_COLOURS = {"image encoding": "#a855f7", "prefill": "#f59e0b", "decode": "#3b82f6", "region": "#10b981"}
PHASE_SHORT = {Phase.PLAIN: "plain", Phase.REASONING: "1+2 reasoning", Phase.EVIDENCE: "3 evidence",
               Phase.SYNTHESIS: "4 answer"}
PHASE_COLOURS = {Phase.PLAIN: "#9ca3af", Phase.REASONING: "#fca5a5", Phase.EVIDENCE: "#86efac",
                 Phase.SYNTHESIS: "#93c5fd"}
TIMELINE_CSS = """<style>
.tl{font:12px/1.3 system-ui,sans-serif;color:var(--body-text-color,#111)}
.tl-row{margin:6px 0 10px}.tl-head{display:flex;justify-content:space-between;font-weight:600}
.tl-bar{position:relative;height:14px;background:rgba(127,127,127,.12);border-radius:3px;margin-top:2px;overflow:hidden}
.tl-bar.parts{height:10px}.tl-bar div{position:absolute;top:0;bottom:0;border-right:1px solid rgba(255,255,255,.6)}
.tl-bar span{position:absolute;left:3px;top:0;font-size:10px;white-space:nowrap;color:#111}
.tl-note{color:var(--body-text-color-subdued,#555);margin-top:2px}
.tl-key span{display:inline-block;margin-right:8px}.tl-key i{display:inline-block;width:9px;height:9px;margin-right:3px;border-radius:2px}
</style>"""


@dataclass
class TimelineRow:
    label: str
    phases: list[tuple[Phase, float, float]]       # (phase, start, seconds)
    spans: list[Span]
    total: float
    note: str


def timeline_rows(warmup: tuple[CacheStats, float] | None, results: list[TurnResult],
                  live: "TurnView | None") -> list[TimelineRow]:
    rows = []
    if warmup is not None:
        stats, seconds = warmup
        rows.append(TimelineRow("image, at upload", [], [Span(Phase.REASONING, "image encoding", 0.0, seconds)],
                                seconds, f"encoded and prefilled {stats.prefill_tokens_computed} tokens "
                                         f"({stats.vision_misses} encoded, {stats.vision_hits} from the cache)"))
    for n, result in enumerate(results, 1):
        rows.append(_turn_row(f"turn {n}", result.timings, result.timeline, result.cache, done=True))
    if live is not None and live.result is None:
        seconds = {p.value: v for p, v in live.seconds.items()}
        running = [p for p in live.order if p not in live.seconds]
        if running and live.ending is None:
            seconds[running[-1].value] = live.elapsed() - sum(live.seconds.values())
        rows.append(_turn_row(f"turn {len(results) + 1}" + (" (stopped)" if live.ending else " (running)"),
                              seconds, live.spans, None, done=False))
    return rows


def _turn_row(label: str, timings: dict[str, float], spans: list[Span], cache: CacheStats | None,
              done: bool) -> TimelineRow:
    phases, t = [], 0.0
    for phase in (Phase.PLAIN, Phase.REASONING, Phase.EVIDENCE, Phase.SYNTHESIS):
        if phase.value in timings:
            phases.append((phase, t, timings[phase.value]))
            t += timings[phase.value]
    parts: dict[str, float] = {}
    for span in spans:
        if span.part.startswith("region"):
            continue
        key = "crop encoding" if span.phase == Phase.EVIDENCE and span.part == "image encoding" else span.part
        parts[key] = parts.get(key, 0.0) + span.seconds
    regions = sum(1 for s in spans if s.part.startswith("region"))
    bits = [f"{k} {seconds_text(v)}" for k, v in parts.items()]
    if regions:
        bits.append(f"{regions} region{'s' * (regions != 1)}")
    if cache is not None:
        bits.append(f"{cache.prefix_tokens_reused} of {cache.prompt_tokens} prompt tokens from the cache")
        bits.append(f"{cache.vision_misses} image{'s' * (cache.vision_misses != 1)} encoded"
                    if cache.vision_misses else "no image re-encoded")
    return TimelineRow(label, phases, spans, t, " · ".join(bits))


def timeline_html(warmup: tuple[CacheStats, float] | None, results: list[TurnResult],
                  live: "TurnView | None" = None) -> str:
    """Per turn two bars on one time scale: its phases, and under them where the time went
    (image encoding, prefill, decode, each region). Numbers only: no model text."""
    rows = timeline_rows(warmup, results, live)
    if not rows:
        return '<div class="tl">The timeline of each turn appears here.</div>'
    scale = max(max(r.total for r in rows), 1e-6)

    def pct(x: float) -> str:
        return f"{100 * x / scale:.2f}%"

    out = [TIMELINE_CSS, '<div class="tl">']
    for row in rows:
        out.append(f'<div class="tl-row"><div class="tl-head"><span>{html.escape(row.label)}</span>'
                   f'<span>{seconds_text(row.total)}</span></div>')
        if row.phases:
            out.append('<div class="tl-bar">')
            for phase, start, seconds in row.phases:
                out.append(f'<div style="left:{pct(start)};width:{pct(seconds)};background:{PHASE_COLOURS[phase]}" '
                           f'title="{PHASE_SHORT[phase]}: {seconds_text(seconds)}"><span>{PHASE_SHORT[phase]}</span></div>')
            out.append('</div>')
        out.append('<div class="tl-bar parts">')
        for span in row.spans:
            key = "region" if span.part.startswith("region") else span.part
            detail = f"{span.part}: {seconds_text(span.seconds)}"
            if span.part == "prefill":
                detail += f", {span.tokens} tokens computed, {span.reused} from the cache"
            elif span.tokens:
                detail += f", {span.tokens} tokens"
            top = "" if key != "region" else ";opacity:.75"
            out.append(f'<div style="left:{pct(span.start)};width:{pct(span.seconds)};'
                       f'background:{PART_COLOURS[key]}{top}" title="{html.escape(detail)}"></div>')
        out.append(f'</div><div class="tl-note">{html.escape(row.note)}</div></div>')
    out.append('<div class="tl-key">' + "".join(f'<span><i style="background:{c}"></i>{k}</span>'
                                                 for k, c in PART_COLOURS.items()) + "</div></div>")
    return "".join(out)


TIMING_ROWS = [
    ("plain s", "plain"), ("reasoning s", "reasoning"), ("evidence s", "evidence"), ("synthesis s", "synthesis"),
    ("total s", "total"),
    ("vision hits", "vision_hits"), ("vision misses", "vision_misses"),
    ("prompt tokens", "prompt_tokens"), ("prefill computed", "prefill_tokens_computed"),
    ("prefix reused", "prefix_tokens_reused"),
    ("region crops encoded", "region_vision_misses"), ("region crops cached", "region_vision_hits"),
]


def timings_table(warmup: tuple[CacheStats, float] | None, turns: list[TurnResult | None],
                  live: TurnView | None = None) -> dict[str, Any]:
    """Metrics as rows, one column per turn (a narrow panel fits a tall table better).

    'image' is the upload's warm-up (image encoded, conversation head prefilled); the live
    column fills in phase by phase, its cache counters once the turn ends. A stopped or failed
    turn (None) keeps an empty column: within one streamed run the table only grows, so
    Gradio's diff of consecutive values never deletes from nested lists."""
    columns: list[tuple[str, dict[str, Any]]] = []
    if warmup is not None:
        stats, seconds = warmup
        columns.append(("image", {"total": round(seconds, 2), **stats.to_json()}))
    for n, result in enumerate(turns, 1):
        if result is None:
            columns.append((f"turn {n} (stopped)", {}))
        else:
            columns.append((f"turn {n}", {**{k: round(v, 2) for k, v in result.timings.items()},
                                          **result.cache.to_json()}))
    if live is not None and live.result is None:
        columns.append((f"turn {len(turns) + 1}", live.live_seconds()))
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
        for phase in ("plain", "reasoning", "evidence", "synthesis"):
            if phase in r.prompts:
                parts.append(f"==== {phase} prompt ====\n{r.prompts[phase]}")
            if phase in r.raw:
                parts.append(f"==== {phase} output ====\n{r.raw[phase]}")
    return "\n\n".join(parts)


def trace(model: dict[str, str], results: list[TurnResult], images: list[str] | None = None,
          settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object `python -m corgi run --json` prints, plus the conversation's image names
    (Box.image and each turn's "images" index them) and the settings its turns ran with."""
    out: dict[str, Any] = {"model": dict(model)}
    if images is not None:
        out["images"] = list(images)
    if settings is not None:
        out["settings"] = dict(settings)
    out["turns"] = [r.to_json() for r in results]
    return out
