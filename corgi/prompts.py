"""The text of each phase, in Qwen's ChatML.

Layout (why): everything shared comes first and never changes, so one KV cache serves
every phase and every follow-up turn; each phase only appends.

    [system][user: image][user: Q1 + phase-1+2 instructions][assistant: steps]
    [user: evidence + phase-4 instructions][assistant: answer][user: Q2 ...] ...

Phase 3 is separate: each region crop is its own short sequence (CROP_*), decoded as a batch.

The output formats the prompts ask for are those of `formats.py` (the grammar enforces them,
`parsing.py` reads them).

Untrusted text (the question, step statements, region captions) goes through `plain()`: pass
the loaded tokenizer's added tokens (`added_tokens_of(tokenizer)`) as `added_tokens=` so that none
of them, e.g. "<|im_end|>", "<tool_call>" or "</think>", can be forged from a question.
"""
from __future__ import annotations

import functools
import unicodedata
import json
import re
from typing import Collection

from .boxes import BoxConvention
from .formats import (ANSWER, BBOX, DESCRIPTION, EXPLANATION, IMAGE, KEY_EVIDENCE, KIND, KIND_OBJECT,
                      KIND_REASONING, KIND_TEXT, MAX_KEY_EVIDENCE, STATEMENT, STEPS, THINK_CLOSE,
                      THINK_OPEN)
from .types import Evidence, StepKind

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
END_OF_MESSAGE = IM_END + "\n"
# Appended after "<|im_start|>assistant\n" for a model that opens <think> itself (Qwen3.5): the
# empty think block its chat template writes with enable_thinking=False, so it answers directly.
NO_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
# What Qwen's chat templates write after "assistant\n" when thinking is off (enable_thinking=False):
# models that think by default (families.Family.thinks_by_default) then answer directly.
NO_THINK = THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n"

SYSTEM = ("You are CoRGI, a careful visual reasoner. You answer questions about an image by "
          "reasoning in short steps, grounding every step that depends on the image in a box, "
          "and answering only from the evidence you checked.")

ZWNJ = "\u200c"     # zero-width non-joiner: breaks a token's literal, not what a reader sees


def added_tokens_of(tokenizer) -> tuple[str, ...]:
    """Every added token of a transformers tokenizer (special or not): the strings that
    tokenise as one control id wherever they appear in text."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    names = {getattr(t, "content", t) for t in decoder.values()}
    if not names and hasattr(tokenizer, "get_added_vocab"):
        names = set(tokenizer.get_added_vocab())
    return tuple(sorted(n for n in names if isinstance(n, str) and n))


@functools.lru_cache(maxsize=16)
def _token_starts(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    """Matches (empty) at every position where one of `tokens` begins, overlaps included."""
    breakable = sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)
    if not breakable:
        return None
    return re.compile("(?=" + "|".join(map(re.escape, breakable)) + ")")


def plain(text: str, added_tokens: Collection[str] = ()) -> str:
    """Untrusted text (questions, captions, statements) as plain text.

    A literal like "<|im_end|>" would otherwise be tokenised as the control token and could end
    the message early or forge a turn. A zero-width non-joiner goes after the first character of
    every occurrence of every token in `added_tokens` (the loaded tokenizer's, see
    `added_tokens_of()`), and, whatever the tokenizer, inside every "<|" and "|>". The text reads
    the same; since no token contains the joiner, no token can be left or formed by the
    insertions. (Tokens of one character cannot be broken and are left alone.)
    """
    text = text.replace("<|", "<" + ZWNJ + "|").replace("|>", "|" + ZWNJ + ">")
    if not added_tokens:
        return text
    starts = _token_starts(tuple(sorted(set(added_tokens))))
    if starts is None:
        return text
    points = sorted({m.start() + 1 for m in starts.finditer(text)})
    if not points:
        return text
    pieces, last = [], 0
    for point in points:
        pieces.append(text[last:point])
        last = point
    pieces.append(text[last:])
    return ZWNJ.join(pieces)


IMAGE_NOTE = "This is the image we will talk about."
IMAGES_NOTE = "These are the images we will talk about."


def image_name(number: int) -> str:
    """How a prompt names an image of a conversation with several: "Image 2: "."""
    return f"Image {number}: "


def joined_note(n_images: int) -> str:
    """The text after images attached mid-conversation."""
    return (f"{'This image joins' if n_images == 1 else 'These images join'} the conversation; "
            f"the next question is about {'it' if n_images == 1 else 'them'}.")


def user_turn(content: str) -> str:
    """A user message in ChatML, then the assistant's turn opened (the local backend's text;
    a server's chat template writes the same around `content`)."""
    return f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


def conversation_head() -> tuple[str, str]:
    """Text before and after the image placeholder; the image's pad tokens go in between."""
    before = f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{VISION_START}"
    after = f"{VISION_END}{IMAGE_NOTE}{IM_END}\n"
    return before, after


def multi_image_head(n_images: int) -> list[tuple[str, str]]:
    """Several images in the first message (camera views): (before, after) of each image's
    pads, each image named "Image N" so that steps and boxes can say which one they are on."""
    texts = []
    for number in range(1, n_images + 1):
        before = f"{image_name(number)}{VISION_START}"
        if number == 1:
            before = f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n" + before
        after = VISION_END + ("\n" if number < n_images else f"{IMAGES_NOTE}{IM_END}\n")
        texts.append((before, after))
    return texts


def joined_images(first_number: int, n_images: int) -> list[tuple[str, str]]:
    """Images attached mid-conversation: one user message that names them; the turn that
    follows is about them. Earlier turns keep their own images."""
    texts = []
    for k in range(n_images):
        number = first_number + k
        before = (f"{IM_START}user\n" if k == 0 else "") + f"{image_name(number)}{VISION_START}"
        last = k == n_images - 1
        after = VISION_END + ("\n" if not last else f"{joined_note(n_images)}{IM_END}\n")
        texts.append((before, after))
    return texts


def _images_note(image_numbers: list[int] | None) -> str:
    """What a phase prompt says about the images when the conversation has several."""
    if not image_numbers:
        return ""
    names = ", ".join(f"Image {n}" for n in image_numbers)
    if len(image_numbers) == 1:
        return f" The question is about {names}."
    return (f" The question is about {names}. Before every box write {_q(IMAGE)}: N, the number of "
            f"the image the box is on; each image has its own box coordinates.")


def _q(word: str) -> str:
    return json.dumps(word)


_BOX_SHAPE = "[x1, y1, x2, y2]"
_STEPS_EXAMPLE = (f'{{{_q(STEPS)}: [{{{_q(STATEMENT)}: "...", {_q(KIND)}: {_q(KIND_OBJECT)}, '
                  f"{_q(BBOX)}: {_BOX_SHAPE}}}]}}")
_ANSWER_EXAMPLE = (f'{{{_q(ANSWER)}: "...", {_q(EXPLANATION)}: "2-3 sentences", {_q(KEY_EVIDENCE)}: '
                   f'[{{{_q(DESCRIPTION)}: "...", {_q(BBOX)}: {_BOX_SHAPE}}}]}}')


def reasoning_request(question: str, max_steps: int, convention: BoxConvention, *,
                      added_tokens: Collection[str] = (), image_numbers: list[int] | None = None,
                      think: bool = True) -> str:
    """The phase 1+2 user message. image_numbers: the conversation has several images; the
    prompt names the turn's. think=False: no think block is asked for (a server's JSON schema
    cannot hold one)."""
    thinking = f"Think briefly inside {THINK_OPEN}...{THINK_CLOSE}. Then write" if think else "Write"
    return (
        f"Question: {plain(question, added_tokens)}\n\n"
        f"{thinking} at most {max_steps} "
        f"reasoning steps as one JSON object: {_STEPS_EXAMPLE}. "
        f"{KIND} is {_q(KIND_OBJECT)} when the step looks at something in the image, {_q(KIND_TEXT)} "
        f"when it reads text in the image, and {_q(KIND_REASONING)} when it needs no region "
        f"(then {_q(BBOX)}: null). "
        f"Boxes use {convention.describe()}, top-left origin.{_images_note(image_numbers)}"
    )


def reasoning_prompt(question: str, max_steps: int, convention: BoxConvention, *,
                     added_tokens: Collection[str] = (), image_numbers: list[int] | None = None) -> str:
    return user_turn(reasoning_request(question, max_steps, convention, added_tokens=added_tokens,
                                       image_numbers=image_numbers))


def synthesis_request(question: str, evidence: list[Evidence], convention: BoxConvention, *,
                      added_tokens: Collection[str] = (), image_numbers: list[int] | None = None) -> str:
    if evidence:
        lines = [f"Region {i} (step {e.step_index}, {_evidence_label(e.kind)}): "
                 f"{plain(e.text.strip(), added_tokens) or '(nothing found)'}"
                 for i, e in enumerate(evidence, 1)]
        evidence_text = "Evidence from the regions you marked:\n" + "\n".join(lines)
    else:
        evidence_text = "No region evidence is available; answer from the image and your steps."
    return (
        f"{evidence_text}\n\n"
        f"Now answer the question: {plain(question, added_tokens)}\n"
        f"Reply with one JSON object: {_ANSWER_EXAMPLE} "
        f"with at most {MAX_KEY_EVIDENCE} key evidence items; boxes use {convention.describe()}."
        f"{_images_note(image_numbers)}"
    )


def synthesis_prompt(question: str, evidence: list[Evidence], convention: BoxConvention, *,
                     added_tokens: Collection[str] = (), image_numbers: list[int] | None = None) -> str:
    return user_turn(synthesis_request(question, evidence, convention, added_tokens=added_tokens,
                                       image_numbers=image_numbers))


def plain_answer_request(question: str, *, added_tokens: Collection[str] = ()) -> str:
    """The question alone, answered directly: the baseline CoRGI is compared with. It follows
    the same prefix (system, images, history) as phase 1+2 and is cut off again afterwards."""
    return f"Question: {plain(question, added_tokens)}\n\nAnswer directly in one or two sentences."


def plain_answer_prompt(question: str, *, added_tokens: Collection[str] = ()) -> str:
    return user_turn(plain_answer_request(question, added_tokens=added_tokens))


def _evidence_label(kind: StepKind) -> str:
    return "text read" if kind == StepKind.TEXT else "caption"


CROP_SYSTEM = "You describe regions cropped from a larger image."


def crop_head() -> tuple[str, str]:
    before = f"{IM_START}system\n{CROP_SYSTEM}{IM_END}\n{IM_START}user\n{VISION_START}"
    return before, VISION_END


def crop_task(kind: StepKind, statement: str, *, added_tokens: Collection[str] = ()) -> str:
    """What a region crop's user message says after the crop."""
    if kind == StepKind.TEXT:
        task = "Transcribe all text in this region exactly. Reply with the text only."
    else:
        task = "Describe the main object in this region in one sentence."
    return f"{task}\nContext: {plain(statement, added_tokens)}"


def crop_instruction(kind: StepKind, statement: str, *, added_tokens: Collection[str] = ()) -> str:
    return f"{crop_task(kind, statement, added_tokens=added_tokens)}{IM_END}\n{IM_START}assistant\n"


# ---- the user's question ------------------------------------------------------------------

class InputError(ValueError):
    """The user's input cannot be used; the message says why in one sentence."""


def clean_question(question: str, max_chars: int) -> str:
    if not isinstance(question, str):
        raise InputError("the question must be text")
    # Control characters (other than newline and tab) can break prompts and terminals.
    text = "".join(ch for ch in question if ch in "\n\t" or unicodedata.category(ch)[0] != "C").strip()
    if not text:
        raise InputError("the question is empty")
    if len(text) > max_chars:
        raise InputError(f"the question is too long ({len(text)} characters; the limit is {max_chars})")
    return text
