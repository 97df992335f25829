"""Plain data that flows between the engine, the pipeline and the front ends.

Every box here is canonical: normalised 0..1 of the *original* image, origin top-left,
x1 < x2 and y1 < y2. Conversions from a model's native convention live in `boxes.py`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Union


class StepKind(str, Enum):
    OBJECT = "object"        # look at a region: caption it
    TEXT = "text"            # read a region: transcribe it (OCR)
    REASONING = "reasoning"  # pure reasoning, no region


class Phase(str, Enum):
    REASONING = "reasoning"   # phase 1+2: steps with boxes
    EVIDENCE = "evidence"     # phase 3: region captions / OCR
    SYNTHESIS = "synthesis"   # phase 4: answer
    PLAIN = "plain"           # optional: the question answered plainly, for comparison


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    image: int = 0             # which of the conversation's images (0-based) the box is on

    def to_list(self, ndigits: int = 4) -> list[float]:
        return [round(v, ndigits) for v in (self.x1, self.y1, self.x2, self.y2)]

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        return (round(self.x1 * width), round(self.y1 * height),
                round(self.x2 * width), round(self.y2 * height))

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


@dataclass
class Step:
    index: int                 # 1-based, as shown to users (S1, S2, ...)
    statement: str
    kind: StepKind
    bbox: Box | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "statement": self.statement, "kind": self.kind.value,
                "bbox": self.bbox.to_list() if self.bbox else None,
                "image": self.bbox.image if self.bbox else None}


@dataclass
class ReasoningResult:
    """Phase 1+2 parsed. `ok` is False when no step could be read from the model's text."""
    thinking: str
    steps: list[Step]
    ok: bool
    warnings: list[str] = field(default_factory=list)


@dataclass
class Evidence:
    step_index: int
    bbox: Box
    kind: StepKind             # OBJECT -> caption, TEXT -> transcription
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"step_index": self.step_index, "bbox": self.bbox.to_list(), "image": self.bbox.image,
                "kind": self.kind.value, "text": self.text}


@dataclass
class KeyEvidence:
    text: str
    bbox: Box | None = None

    def to_json(self) -> dict[str, Any]:
        return {"bbox": self.bbox.to_list() if self.bbox else None,
                "image": self.bbox.image if self.bbox else None, "text": self.text}


@dataclass
class SynthesisResult:
    """Phase 4 parsed. When `ok` is False, `answer` holds the model's raw text."""
    answer: str
    explanation: str
    key_evidence: list[KeyEvidence]
    ok: bool
    warnings: list[str] = field(default_factory=list)


@dataclass
class CacheStats:
    vision_hits: int = 0
    vision_misses: int = 0
    prompt_tokens: int = 0             # tokens the model attended over, all phases
    prefill_tokens_computed: int = 0   # of those, tokens whose K/V were computed now
    prefix_tokens_reused: int = 0      # of those, tokens whose K/V came from the cache
    region_vision_hits: int = 0        # phase 3 crops found in the vision cache
    region_vision_misses: int = 0      # phase 3 crops sent through the vision tower
    # The decode loops (every phase; a batch of rows counts one model step per forward):
    decode_model_steps: int = 0        # forwards after the prefills (one-token steps + multi-token)
    decode_output_tokens: int = 0      # tokens they produced, all rows
    forced_tokens: int = 0             # of those, forced by the grammar (jump-forward: no model step)
    drafted_tokens: int = 0            # prompt-lookup drafts verified
    accepted_drafts: int = 0           # of those, kept (equal to what one-token steps give)

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Sampling:
    temperature: float = 0.0           # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Span:
    """One stretch of a turn's wall time, for the timeline: seconds from the turn's start.
    A phase's spans tile it: image encoding (when images join in it), prefill (to the first
    token), decode; phase 3 has one span per region, from its batch's first token to its end."""
    phase: Phase
    part: str                  # "image encoding", "prefill", "decode" or "region N" (1-based)
    start: float
    seconds: float
    tokens: int = 0            # prefill: tokens computed now; decode / region: tokens generated
    reused: int = 0            # prefill: prefix tokens whose state came from the cache

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase.value, "part": self.part, "start": round(self.start, 4),
                "seconds": round(self.seconds, 4), "tokens": self.tokens, "reused": self.reused}


@dataclass
class TurnResult:
    question: str
    answer: str
    explanation: str
    steps: list[Step]
    evidence: list[Evidence]
    key_evidence: list[KeyEvidence]
    timings: dict[str, float]          # [plain,] reasoning, evidence, synthesis: they add up to total (s)
    raw: dict[str, str]                # raw model text of reasoning and synthesis
    prompts: dict[str, str] = field(default_factory=dict)   # exact prompt text per phase
    cache: CacheStats = field(default_factory=CacheStats)
    warnings: list[str] = field(default_factory=list)
    images: list[int] = field(default_factory=lambda: [0])   # the conversation images this turn is about
    plain_answer: str | None = None    # the plain one-phase answer, when asked for
    timeline: list[Span] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "images": list(self.images),
            "plain_answer": self.plain_answer,
            "answer": self.answer,
            "explanation": self.explanation,
            "steps": [s.to_json() for s in self.steps],
            "evidence": [e.to_json() for e in self.evidence],
            "key_evidence": [k.to_json() for k in self.key_evidence],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "raw": dict(self.raw),
            "cache": self.cache.to_json(),
            "timeline": [span.to_json() for span in self.timeline],
            "warnings": list(self.warnings),
        }


# ---- pipeline events: what the CLI prints and the UI renders, in order -------------

@dataclass
class PhaseStarted:
    phase: Phase
    prompt: str                # the exact text appended to the conversation for this phase


@dataclass
class TextDelta:
    phase: Phase
    text: str
    region: int | None = None  # phase 3: which region (0-based) the text belongs to


@dataclass
class PhaseFinished:
    phase: Phase
    seconds: float
    raw: str = ""


@dataclass
class StepStreamed:
    """Phase 1+2, while it streams: a step whose JSON object just closed (its box, if any, final)."""
    step: Step


@dataclass
class SpanTimed:
    """A timeline span just ended (live timeline)."""
    span: Span


@dataclass
class StepsParsed:
    result: ReasoningResult


@dataclass
class EvidenceReady:
    evidence: Evidence
    region: int                # 0-based position among this turn's regions
    total: int


@dataclass
class AnswerReady:
    result: SynthesisResult


@dataclass
class TurnFinished:
    result: TurnResult


@dataclass
class RegionDone:
    """Between a backend and the pipeline only (not an Event): phase 3's region `region` is
    finished with `text`; the pipeline makes it an EvidenceReady."""
    region: int
    text: str


Event = Union[PhaseStarted, TextDelta, PhaseFinished, StepStreamed, SpanTimed, StepsParsed, EvidenceReady,
              AnswerReady, TurnFinished]


class OutOfMemory(RuntimeError):
    """The model ran out of accelerator memory in a turn (torch's OutOfMemoryError, translated
    by the engine so that the pipeline, the CLI and the UI need no torch). The turn is dropped;
    the conversation goes on from before it."""
