"""The text of each phase, in Qwen's ChatML.

Layout (why): everything shared comes first and never changes, so one KV cache serves
every phase and every follow-up turn; each phase only appends.

    [system][user: image][user: Q1 + phase-1+2 instructions][assistant: steps]
    [user: evidence + phase-4 instructions][assistant: answer][user: Q2 ...] ...

Phase 3 is separate: each region crop is its own short sequence (CROP_*), decoded as a batch.

Output formats the parser (`parsing.py`) and the grammar (`engine/grammar.py`) agree on:
  phase 1+2:  <think>free text</think>\n{"steps": [{"statement": str, "kind": "object"|"text"|"reasoning", "bbox_2d": [x1, y1, x2, y2] | null}, ...]}
  phase 4:    {"answer": str, "explanation": str, "key_evidence": [{"description": str, "bbox_2d": [x1, y1, x2, y2] | null}, ...]}
"""
from __future__ import annotations

from .boxes import BoxConvention
from .types import Evidence, StepKind

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
END_OF_MESSAGE = IM_END + "\n"

SYSTEM = ("You are CoRGI, a careful visual reasoner. You answer questions about an image by "
          "reasoning in short steps, grounding every step that depends on the image in a box, "
          "and answering only from the evidence you checked.")


def plain(text: str) -> str:
    """Untrusted text (questions, captions, statements) as plain text: a literal like
    "<|im_end|>" would otherwise be tokenised as the control token and could end the message
    early or forge a turn. A zero-width non-joiner breaks the literal, not the meaning."""
    return text.replace("<|", "<\u200c|").replace("|>", "|\u200c>")


def conversation_head() -> tuple[str, str]:
    """Text before and after the image placeholder; the image's pad tokens go in between."""
    before = f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{VISION_START}"
    after = f"{VISION_END}This is the image we will talk about.{IM_END}\n"
    return before, after


def reasoning_prompt(question: str, max_steps: int, convention: BoxConvention) -> str:
    return (
        f"{IM_START}user\nQuestion: {plain(question)}\n\n"
        f"Think briefly inside {THINK_OPEN}...{THINK_CLOSE}. Then write at most {max_steps} "
        "reasoning steps as one JSON object: "
        '{"steps": [{"statement": "...", "kind": "object", "bbox_2d": [x1, y1, x2, y2]}]}. '
        'kind is "object" when the step looks at something in the image, "text" when it reads '
        'text in the image, and "reasoning" when it needs no region (then "bbox_2d": null). '
        f"Boxes use {convention.describe()}, top-left origin."
        f"{IM_END}\n{IM_START}assistant\n"
    )


def synthesis_prompt(question: str, evidence: list[Evidence], convention: BoxConvention) -> str:
    if evidence:
        lines = [f"Region {i} (step {e.step_index}, {_evidence_label(e.kind)}): {plain(e.text.strip()) or '(nothing found)'}"
                 for i, e in enumerate(evidence, 1)]
        evidence_text = "Evidence from the regions you marked:\n" + "\n".join(lines)
    else:
        evidence_text = "No region evidence is available; answer from the image and your steps."
    return (
        f"{IM_START}user\n{evidence_text}\n\n"
        f"Now answer the question: {plain(question)}\n"
        "Reply with one JSON object: "
        '{"answer": "...", "explanation": "2-3 sentences", "key_evidence": '
        '[{"description": "...", "bbox_2d": [x1, y1, x2, y2]}]} '
        f"with at most 3 key evidence items; boxes use {convention.describe()}."
        f"{IM_END}\n{IM_START}assistant\n"
    )


def _evidence_label(kind: StepKind) -> str:
    return "text read" if kind == StepKind.TEXT else "caption"


CROP_SYSTEM = "You describe regions cropped from a larger image."


def crop_head() -> tuple[str, str]:
    before = f"{IM_START}system\n{CROP_SYSTEM}{IM_END}\n{IM_START}user\n{VISION_START}"
    return before, VISION_END


def crop_instruction(kind: StepKind, statement: str) -> str:
    if kind == StepKind.TEXT:
        task = "Transcribe all text in this region exactly. Reply with the text only."
    else:
        task = "Describe the main object in this region in one sentence."
    return f"{task}\nContext: {plain(statement)}{IM_END}\n{IM_START}assistant\n"
