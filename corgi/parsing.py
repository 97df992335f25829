"""Model text -> typed results (formats in `formats.py`), tolerant of whatever comes back.

Small models drift: they drop think tags, wrap JSON in markdown fences, use single quotes,
leave trailing commas, hit the token limit mid-object, or add prose after the JSON. Both
parsers share one extraction helper (`extract_json`) and never raise on a string input;
problems become short warnings instead.

Why a reader of our own (checked against this module's tests): jiter's partial mode
(`pydantic_core.from_json(allow_partial=True)`) reads strict JSON only, needs the value to end
the text and keeps half-written objects; json-repair keeps half-written steps on a cut, parses
from the first bracket even when that is prose, reports no repaired/truncated flags, and takes
seconds (or raises) on the hostile inputs that cost this reader milliseconds.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from .boxes import BoxConvention, to_canonical
from .formats import (ANSWER, BBOX, DESCRIPTION, EXPLANATION, IMAGE, KEY_EVIDENCE, KIND, MAX_KEY_EVIDENCE,
                      STATEMENT, STEP_KINDS, STEPS, THINK_CLOSE, THINK_OPEN)
from .types import Box, KeyEvidence, ReasoningResult, Step, StepKind, SynthesisResult

__all__ = ["Found", "Work", "ImageConventions", "StepStream", "plain_text", "extract_json", "parse_reasoning", "parse_synthesis", "MAX_KEY_EVIDENCE"]

# ---- JSON extraction ---------------------------------------------------------------

# Bounds that keep hostile input cheap: nesting deeper than this is not our format, and a
# search gives up after at most this many candidate starts or once its `Work` budget is spent.
_MAX_DEPTH = 32
_MAX_CANDIDATES = 200
_MIN_TOKEN_BUDGET = 10_000
_MIN_CHAR_BUDGET = 100_000

_OPENER = re.compile(r"[\[{]")
# Strings use the unrolled-loop form (no nested quantifiers over the same characters), so
# matching is linear even on a 100k-character unterminated string.
_TOKEN = re.compile(
    r'"[^"\\]*(?:\\.[^"\\]*)*(?P<dq>")?'
    r"|'[^'\\]*(?:\\.[^'\\]*)*(?P<sq>')?"
    r"|[{}\[\],:]"
    r"|[^\s{}\[\],:\"']+",
    re.S,
)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None, "none": None}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
_DECODER = json.JSONDecoder(strict=False)   # strict=False: raw newlines inside strings are fine


class Work:
    """What extraction did over one text, and the budget that bounds it.

    Counted: searches (`extract_json` calls), candidate starts tried, tokens the tolerant
    reader read, and characters examined (by the strict decoder up to where it stopped, by the
    reader from each candidate start to its last token; a strict attempt that hit the recursion
    limit counts the whole rest of the text). A search tries no further candidate once
    `tokens` or `chars` is over budget, so `chars` stays below `max_chars` + 2 * len(text) and the
    cost of any input is linear in its length. One Work may serve every search over a text.
    """

    def __init__(self, text_length: int) -> None:
        self.max_tokens = _MIN_TOKEN_BUDGET + 2 * text_length   # a full pass plus retries
        self.max_chars = _MIN_CHAR_BUDGET + 4 * text_length
        self.searches = 0
        self.candidates = 0
        self.tokens = 0
        self.chars = 0

    @property
    def spent(self) -> bool:
        return self.tokens >= self.max_tokens or self.chars >= self.max_chars

    def __repr__(self) -> str:
        return (f"Work(searches={self.searches}, candidates={self.candidates}, tokens={self.tokens}"
                f"/{self.max_tokens}, chars={self.chars}/{self.max_chars})")


class _NotJson(Exception):
    """The text at a candidate start is not (repairable) JSON."""


class _Missing:
    """A value the text was cut off before."""


_MISSING = _Missing()


@dataclass
class Found:
    value: Any
    start: int          # index of the opening bracket in the searched text
    end: int            # index just past the value (the end of the text when truncated)
    repaired: bool      # needed repairs beyond strict JSON
    truncated: bool     # the text ended inside the value; only complete parts were kept


def extract_json(text: str, accept: Callable[[Any], bool], *, start: int = 0,
                 work: Work | None = None) -> Found | None:
    """The first JSON object or array in `text[start:]` that `accept` likes, or None.

    Each `{` or `[` is a candidate start. Strict JSON is tried first (fast, C); otherwise a
    tolerant reader repairs quotes, commas, Python literals and unquoted keys, and closes
    a value the text ended inside (see `_Reader`). `work` (default: a fresh one for this text)
    counts and bounds the effort; positions in the result are indices into `text`.
    """
    if work is None:
        work = Work(len(text) - start)
    work.searches += 1
    pos = start
    for _ in range(_MAX_CANDIDATES):
        match = _OPENER.search(text, pos)
        if match is None or work.spent:
            return None
        work.candidates += 1
        found = _decode_at(text, match.start(), work)
        if found is not None and accept(found.value):
            return found
        # A complete value that is not wanted (e.g. "[10, 20]" in prose) is skipped whole;
        # otherwise an inner bracket may still start the real thing.
        pos = found.end if found is not None and not found.truncated else match.start() + 1
    return None


def _decode_at(text: str, start: int, work: Work) -> Found | None:
    try:
        value, end = _DECODER.raw_decode(text, start)
        work.chars += end - start
        return Found(value, start, end, repaired=False, truncated=False)
    except json.JSONDecodeError as exc:
        work.chars += exc.pos - start + 1
    except (ValueError, RecursionError):
        work.chars += len(text) - start
    reader = _Reader(text, start, work)
    try:
        value, complete = reader.value(0)
    except _NotJson:
        return None
    finally:
        work.chars += reader.seen - start
    if value is _MISSING:
        return None
    return Found(value, start, reader.end if complete else len(text),
                 repaired=True, truncated=not complete)


class _Reader:
    """A forgiving recursive-descent JSON reader over regex tokens.

    Repairs: single-quoted strings, trailing/doubled/missing commas, True/False/None,
    unquoted keys, a `]` or `}` that closes the wrong bracket, bad escapes, and text that
    ends mid-value. On such a cut every container keeps its complete parts, except that a
    half-written object inside an array (a step, an evidence item) is dropped: its missing
    fields cannot be trusted. Methods return (value, complete).
    """

    def __init__(self, text: str, start: int, work: Work) -> None:
        self._text = text
        self._tokens: Iterator[re.Match[str]] = _TOKEN.finditer(text, start)
        self._peeked: re.Match[str] | None = None
        self._work = work
        self.end = start            # just past the last token taken
        self.seen = start           # just past the last token read (taken or peeked)

    def _peek(self) -> re.Match[str] | None:
        if self._peeked is None:
            if self._work.tokens >= self._work.max_tokens:
                raise _NotJson
            self._work.tokens += 1
            self._peeked = next(self._tokens, None)
            self.seen = self._peeked.end() if self._peeked is not None else len(self._text)
        return self._peeked

    def _take(self) -> re.Match[str] | None:
        token = self._peek()
        self._peeked = None
        if token is not None:
            self.end = token.end()
        return token

    def value(self, depth: int) -> tuple[Any, bool]:
        if depth > _MAX_DEPTH:
            raise _NotJson
        token = self._take()
        if token is None:
            return _MISSING, False
        text = token.group()
        if text == "{":
            return self._object(depth)
        if text == "[":
            return self._array(depth)
        if text[0] in "\"'":
            return _string(token)
        if text in ("}", "]", ",", ":"):
            raise _NotJson
        if token.end() == len(self._text):
            return _MISSING, False     # a number or literal cut short ("12" of "123")
        return _bareword(text), True

    def _object(self, depth: int) -> tuple[dict[str, Any], bool]:
        result: dict[str, Any] = {}
        while True:
            token = self._peek()
            if token is None:
                return result, False
            text = token.group()
            if text == "}":
                self._take()
                return result, True
            if text == "]":
                return result, True        # wrong closer: leave it for the enclosing array
            if text == ",":
                self._take()
                continue
            if text in ("{", "[", ":"):
                raise _NotJson
            self._take()
            if text[0] in "\"'":
                key, closed = _string(token)
                if not closed:
                    return result, False
            else:
                key = text                 # unquoted key, as in JavaScript
            colon = self._peek()
            if colon is None:
                return result, False
            if colon.group() != ":":
                raise _NotJson
            self._take()
            value, complete = self.value(depth + 1)
            if value is not _MISSING:
                result[key] = value
            if not complete:
                return result, False

    def _array(self, depth: int) -> tuple[list[Any], bool]:
        result: list[Any] = []
        while True:
            token = self._peek()
            if token is None:
                return result, False
            text = token.group()
            if text == "]":
                self._take()
                return result, True
            if text == "}":
                return result, True        # wrong closer: leave it for the enclosing object
            if text == ",":
                self._take()
                continue
            if text == ":":
                raise _NotJson
            value, complete = self.value(depth + 1)
            if not complete:
                if value is not _MISSING and not isinstance(value, dict):
                    result.append(value)
                return result, False
            result.append(value)


def _string(token: re.Match[str]) -> tuple[str, bool]:
    text = token.group()
    closed = token.group("dq") is not None or token.group("sq") is not None
    body = text[1:-1] if closed else text[1:]
    if "\\" not in body:
        return body, closed
    if text[0] == '"' and closed:
        try:
            return json.loads(text, strict=False), True   # handles surrogate pairs
        except ValueError:
            pass
    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", _unescape, body, flags=re.S), closed


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if len(code) == 5:
        char = chr(int(code[1:], 16))
        return char if not 0xD800 <= ord(char) <= 0xDFFF else "\ufffd"
    return _ESCAPES.get(code, code)    # unknown escapes (\d, \') keep the character


def _bareword(text: str) -> Any:
    literal = _LITERALS.get(text.lower(), _MISSING)
    if literal is not _MISSING:
        return literal
    if _NUMBER.fullmatch(text):
        number = float(text)
        return int(number) if number.is_integer() and not re.search(r"[.eE]", text) else number
    raise _NotJson


# ---- text clean-up shared by both parsers ------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Chat-template tokens a decoder may leave in; box/ref tokens are kept for `_token_box`.
_CHAT_TOKENS = re.compile(r"<\|(?:im_start|im_end|endoftext|vision_start|vision_end|"
                          r"image_pad|video_pad|vision_pad|fim_[a-z]+)\|>")
_ANY_SPECIAL = re.compile(r"<\|[a-z_]{1,40}\|>")
_FENCE = re.compile(r"^[ \t]*```[\w-]*[ \t]*$", re.M)


def _clean(text: Any) -> str:
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    return _CHAT_TOKENS.sub("", _CONTROL.sub("", text))


def _split_think(text: str) -> tuple[str | None, str]:
    """(explicit thinking or None, the text after it where the JSON should be)."""
    close = text.find(THINK_CLOSE)
    if close >= 0:
        before = text[:close]
        # Qwen3 chat templates may put the opening tag in the prompt, so it can be absent.
        opened = before.find(THINK_OPEN)
        thinking = before[opened + len(THINK_OPEN):] if opened >= 0 else before
        return thinking.strip(), text[close + len(THINK_CLOSE):]
    return None, text


def is_json_object(text: str) -> bool:
    """True when the text after any think block is exactly one JSON object (what a structured
    phase gives when its schema was enforced)."""
    _, rest = _split_think(text)
    try:
        return isinstance(json.loads(rest.strip()), dict)
    except (ValueError, RecursionError):
        return False


def _display_text(text: str) -> str:
    """The model's text as a human would want it: no think blocks, fences or special tokens."""
    # str.rfind, not a lazy regex: many unclosed "<think>" tags would make that quadratic.
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        text = text[close + len(THINK_CLOSE):]    # models think first, then answer
    if THINK_OPEN in text:
        # An unclosed think block is all the model wrote; keep its words rather than nothing.
        before, _, after = text.partition(THINK_OPEN)
        text = before if before.strip() else after
    text = text.replace(THINK_OPEN, "").replace(THINK_CLOSE, "")
    text = _FENCE.sub("", _ANY_SPECIAL.sub("", text))
    return text.strip()


def plain_text(text: str) -> str:
    """A free-text reply (the plain answer) as a reader wants it: no think blocks or tokens."""
    return _display_text(_clean(text))


def _find(text: str, accept: Callable[[Any], bool],
          work: Work) -> tuple[str | None, Found | None, str]:
    """Split off thinking and find the JSON; returns (thinking, found, searched text)."""
    thinking, body = _split_think(text)
    found = extract_json(body, accept, work=work)
    if found is None and thinking is not None:
        # Some models put the JSON inside the think block; take it from there.
        found = extract_json(text, accept, work=work)
        if found is not None:
            return thinking, found, text
    return thinking, found, body


def _short(warning: str, limit: int = 200) -> str:
    """Warnings quote model output, which can be huge; keep them one readable line."""
    return warning if len(warning) <= limit else warning[:limit - 5] + " ...)."


def _lower_keys(entry: dict[Any, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in entry.items()}


def _first(entry: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in entry:
            return entry[key]
    return None


def _as_text(value: Any) -> str | None:
    """A readable string from a value that should have been one, or None."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(" ".join(str(v).split()) for v in value)
    return None


# ---- boxes ---------------------------------------------------------------------------

_BOX_KEYS = (BBOX, "bbox", "box", "box_2d", "bbox2d", "bounding_box", "coordinates")
_NUMBER_IN_TEXT = re.compile(r"-?\d+(?:\.\d+)?")
# Qwen2-VL grounding: <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
_BOX_TOKENS = re.compile(r"<\|box_start\|>([^<]{0,200})<\|box_end\|>")
_REF_TOKENS = re.compile(r"<\|object_ref_(?:start|end)\|>")


def _box_coords(value: Any) -> list[Any] | None:
    """The four numbers of a box in any of the shapes models write, or None for no box."""
    if value is None:
        return None
    if isinstance(value, str):
        numbers = _NUMBER_IN_TEXT.findall(value)
        return numbers or None
    if isinstance(value, dict):
        lowered = _lower_keys(value)
        if all(k in lowered for k in ("x1", "y1", "x2", "y2")):
            return [lowered[k] for k in ("x1", "y1", "x2", "y2")]
        return [value]    # unreadable; to_canonical words the warning
    if isinstance(value, list):
        if not value:
            return None
        flat: list[Any] = []
        for item in value:    # [[x1, y1], [x2, y2]] and [[x1, y1, x2, y2]]
            flat.extend(item if isinstance(item, list) else [item])
        return [_number_in(v) if isinstance(v, str) else v for v in flat]
    return [value]


def _number_in(text: str) -> str:
    """"12px" -> "12"; text without a number stays as it is for the warning."""
    match = _NUMBER_IN_TEXT.search(text)
    return match.group() if match else text


@dataclass(frozen=True)
class ImageConventions:
    """Several images in one turn: the box convention of each image the model may name (by
    0-based conversation index) and the image a box without an "image" field is on.

    The model writes "image": N for the image the prompt calls "Image N" (1-based). A number
    that names no image of the turn is dropped with a warning: its box cannot be placed (a
    clamped index would put the crop on the wrong picture), so a grounded step becomes reasoning."""
    by_index: dict[int, BoxConvention]
    default: int = 0


def _image_of(entry: dict[str, Any], images: ImageConventions | None, label: str,
              warnings: list[str]) -> int | None:
    """The 0-based image a box is on, or None when the model named an image that is not there."""
    default = images.default if images is not None else 0
    raw = entry.get(IMAGE)
    if raw is None:
        return default
    number = _as_text(raw)
    digits = _NUMBER_IN_TEXT.search(number or "")
    index = int(float(digits.group())) - 1 if digits else None
    if index is None or index not in (images.by_index if images is not None else {0: None}):
        warnings.append(_short(f"{label}: no image {str(raw)[:20]!r} in this turn; its box was dropped."))
        return None
    return index


def _read_box(value: Any, convention: BoxConvention, label: str, warnings: list[str],
              entry: dict[str, Any] | None = None,
              images: ImageConventions | None = None) -> tuple[Box | None, bool]:
    """(box, whether a box was written at all); conversion warnings go to `warnings`. The box
    is converted with the convention of the image it is on (entry's "image" field)."""
    coords = _box_coords(value)
    if coords is None:
        return None, False
    image = _image_of(entry or {}, images, label, warnings)
    if image is None:
        return None, True
    if images is not None:
        convention = images.by_index[image]
    box, warning = to_canonical(coords, convention)
    if warning:
        warnings.append(_short(f"{label}: {warning}."))
    if box is not None and image:
        box = replace(box, image=image)
    return box, True


def _token_box(statement: str) -> tuple[str, list[str] | None]:
    """Strip Qwen2-VL grounding tokens from a statement; returns (statement, box numbers)."""
    coords = None
    match = _BOX_TOKENS.search(statement)
    if match:
        coords = _NUMBER_IN_TEXT.findall(match.group(1)) or None
        statement = _BOX_TOKENS.sub(" ", statement)
    statement = _ANY_SPECIAL.sub(" ", _REF_TOKENS.sub("", statement))
    return " ".join(statement.split()), coords


# ---- phase 1+2: reasoning steps ----------------------------------------------------

_STATEMENT_KEYS = (STATEMENT, "step", "description", "content", "text")
_KIND_KEYS = (KIND, "type", "category")
_STEPS_WORD = STEPS.rstrip("s")      # a key containing "step" holds the steps ("Steps", "reasoning_steps")


def _looks_like_steps(value: Any) -> bool:
    if isinstance(value, dict):
        return _steps_list(value) is not None or _is_step(value)
    # A list counts only with an object in it: ["red", "blue"] in prose is not the steps.
    return isinstance(value, list) and any(isinstance(v, dict) for v in value)


def _is_step(value: Any) -> bool:
    return isinstance(value, dict) and STATEMENT in _lower_keys(value)


def _steps_list(value: dict[Any, Any]) -> list[Any] | None:
    for key, item in value.items():
        if _STEPS_WORD in str(key).lower() and isinstance(item, list):
            return item
    return None


def _kind(raw: Any) -> StepKind | None:
    """The step kind a model meant, or None when the word is not one we know."""
    word = str(raw).strip().lower() if raw is not None else ""
    if not word:
        return None
    if word in STEP_KINDS:
        return StepKind(word)
    if any(w in word for w in ("ocr", "text", "read", "transcri")):
        return StepKind.TEXT
    if any(w in word for w in ("reason", "logic", "infer", "think", "none")):
        return StepKind.REASONING
    if any(w in word for w in ("obj", "visual", "vision", "region", "look", "image", "detect", "ground")):
        return StepKind.OBJECT
    return None


def parse_reasoning(text: str, convention: BoxConvention, max_steps: int, *,
                    work: Work | None = None, images: ImageConventions | None = None) -> ReasoningResult:
    """Phase 1+2 output -> thinking and numbered steps.

    Every OBJECT/TEXT step has a box; a step whose box is missing or unreadable becomes
    REASONING, and REASONING steps carry no box. `ok` is False only when no step was read.
    A `max_steps` below 1 means no cap. `work`: pass a `Work` to see (or bound) the effort;
    by default one is made for the text, shared by all its searches. `images`: a turn with
    several images (each box's "image" field says which; see ImageConventions).
    """
    text = _clean(text)
    work = work if work is not None else Work(len(text))
    warnings: list[str] = []
    thinking, found, searched = _find(text, _looks_like_steps, work)
    if found is None:
        if thinking is None:
            thinking = _display_text(text)
        warnings.append("No steps JSON found in the model's output.")
        return ReasoningResult(thinking=thinking, steps=[], ok=False, warnings=warnings)

    if thinking is None:
        # No think tags: whatever came before the JSON is the model's thinking.
        thinking = _display_text(searched[:found.start])
    entries = _entries(found, searched, warnings, work)
    if found.repaired and not found.truncated:
        warnings.append("The steps JSON was malformed and has been repaired.")
    if found.truncated:
        warnings.append("The output was cut off; kept the steps written before the cut.")

    steps: list[Step] = []
    for position, raw in enumerate(entries, 1):
        step = _step(raw, position, len(steps) + 1, convention, warnings, images)
        if step is not None:
            steps.append(step)
    if not steps:
        warnings.append("The model wrote no usable steps.")
        return ReasoningResult(thinking=thinking, steps=[], ok=False, warnings=warnings)
    if max_steps >= 1 and len(steps) > max_steps:
        warnings.append(f"The model wrote {len(steps)} steps; kept the first {max_steps}.")
        steps = steps[:max_steps]
    return ReasoningResult(thinking=thinking, steps=steps, ok=True, warnings=warnings)


def _entries(found: Found, searched: str, warnings: list[str], work: Work) -> list[Any]:
    value = found.value
    if isinstance(value, list):
        return value
    steps = _steps_list(value)
    if steps is not None:
        return steps
    # One step object per line (JSON lines) instead of a list: gather them all. A step
    # the text ends inside is half-written, so it is left out like one inside a list.
    warnings.append("The steps were not wrapped in a list; read them one by one.")
    entries: list[Any] = []
    current: Found | None = found
    while current is not None and not current.truncated:
        entries.append(current.value)
        current = extract_json(searched, _is_step, start=current.end, work=work)
    return entries


def _step(raw: Any, position: int, index: int, convention: BoxConvention,
          warnings: list[str], images: ImageConventions | None = None) -> Step | None:
    if isinstance(raw, str):
        raw = {STATEMENT: raw}       # a bare sentence is a step without kind or box
    if not isinstance(raw, dict):
        warnings.append(f"Dropped step entry {position}: it is not an object.")
        return None
    entry = _lower_keys(raw)
    statement = _as_text(_first(entry, _STATEMENT_KEYS))
    if statement is None:
        warnings.append(f"Dropped step entry {position}: it has no readable statement.")
        return None
    statement, token_coords = _token_box(statement)
    if not statement:
        warnings.append(f"Dropped step entry {position}: its statement is empty.")
        return None

    label = f"Step {index}"
    box_value = _first(entry, _BOX_KEYS)
    if _box_coords(box_value) is None and token_coords is not None:
        box_value = token_coords
    box, written = _read_box(box_value, convention, label, warnings, entry, images)

    raw_kind = _first(entry, _KIND_KEYS)
    kind = _kind(raw_kind)
    if kind is None:
        kind = StepKind.OBJECT if box is not None else StepKind.REASONING
        if raw_kind not in (None, ""):
            warnings.append(f"{label}: unknown kind {str(raw_kind)[:40]!r}; treated as {kind.value}.")
    if kind != StepKind.REASONING and box is None:
        reason = "unreadable" if written else "missing"
        warnings.append(f"{label}: {kind.value} step with a {reason} box; treated as reasoning.")
        kind = StepKind.REASONING
    if kind == StepKind.REASONING:
        box = None
    return Step(index=index, statement=statement, kind=kind, bbox=box)


# ---- phase 4: synthesis --------------------------------------------------------------

_ANSWER_KEYS = (ANSWER, "final_answer")
_EXPLANATION_KEYS = (EXPLANATION, "rationale", "reasoning")
_SYNTHESIS_KEYS = (*_ANSWER_KEYS, EXPLANATION, KEY_EVIDENCE)
_EVIDENCE_TEXT_KEYS = (DESCRIPTION, "text", "evidence", "statement", "content")


def _looks_like_synthesis(value: Any) -> bool:
    return isinstance(value, dict) and any(k in _lower_keys(value) for k in _SYNTHESIS_KEYS)


def parse_synthesis(text: str, convention: BoxConvention, *, work: Work | None = None,
                    images: ImageConventions | None = None) -> SynthesisResult:
    """Phase 4 output -> answer, explanation and at most MAX_KEY_EVIDENCE key evidence items.

    When no JSON can be read, or it has no answer, `ok` is False and `answer` holds the
    model's text (think blocks, fences and special tokens removed). `work`: as in
    `parse_reasoning`.
    """
    text = _clean(text)
    work = work if work is not None else Work(len(text))
    warnings: list[str] = []
    _, found, _ = _find(text, _looks_like_synthesis, work)
    if found is None:
        warnings.append("No answer JSON found in the model's output; showing its raw text.")
        return SynthesisResult(answer=_display_text(text), explanation="", key_evidence=[],
                               ok=False, warnings=warnings)
    if found.repaired and not found.truncated:
        warnings.append("The answer JSON was malformed and has been repaired.")
    if found.truncated:
        warnings.append("The answer was cut off; kept what was written before the cut.")

    entry = _lower_keys(found.value)
    answer = _as_text(_first(entry, _ANSWER_KEYS)) or ""
    explanation = _as_text(_first(entry, _EXPLANATION_KEYS)) or ""
    key_evidence = _key_evidence(entry.get(KEY_EVIDENCE), convention, warnings, images)
    ok = bool(answer)
    if not ok:
        warnings.append("The answer JSON has no answer; showing the model's raw text.")
        answer = _display_text(text)
    return SynthesisResult(answer=answer, explanation=explanation, key_evidence=key_evidence,
                           ok=ok, warnings=warnings)


def _key_evidence(raw: Any, convention: BoxConvention, warnings: list[str],
                  images: ImageConventions | None = None) -> list[KeyEvidence]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    result: list[KeyEvidence] = []
    for position, item in enumerate(items, 1):
        if isinstance(item, str):
            item = {DESCRIPTION: item}
        if not isinstance(item, dict):
            warnings.append(f"Dropped key evidence entry {position}: it is not an object.")
            continue
        entry = _lower_keys(item)
        description, token_coords = _token_box(_as_text(_first(entry, _EVIDENCE_TEXT_KEYS)) or "")
        box_value = _first(entry, _BOX_KEYS)
        if _box_coords(box_value) is None:
            box_value = token_coords
        box, _ = _read_box(box_value, convention, f"Key evidence {len(result) + 1}", warnings, entry, images)
        if not description and box is None:
            warnings.append(f"Dropped key evidence entry {position}: no description or box.")
            continue
        result.append(KeyEvidence(text=description, bbox=box))
    if len(result) > MAX_KEY_EVIDENCE:
        warnings.append(f"The model gave {len(result)} key evidence items; kept the first {MAX_KEY_EVIDENCE}.")
        result = result[:MAX_KEY_EVIDENCE]
    return result


# ---- phase 1+2 while it streams --------------------------------------------------------

class StepStream:
    """Steps of a phase 1+2 reply as they are written: feed text deltas, get each step the
    moment its JSON object closes.

    It re-reads the text so far with `parse_reasoning` itself, only when a delta has a "}"
    (a step object can only close there), so a streamed step is exactly what the final parse
    makes of it: same reader, same box conversion, same numbering. jiter's partial mode was
    the alternative; it reads strict JSON only and keeps half-written objects, and then the
    streamed steps and the final ones could differ. Nothing is emitted inside an open think
    block (braces there are not the steps), and if a later parse disagrees with the steps
    already emitted (the model's text changed what the first JSON is), streaming stops and
    the final `StepsParsed` is the word that counts."""

    def __init__(self, convention: BoxConvention, max_steps: int,
                 images: ImageConventions | None = None) -> None:
        self.convention, self.max_steps, self.images = convention, max_steps, images
        self.text = ""
        self.steps: list[Step] = []
        self._stopped = False

    def feed(self, delta: str) -> list[Step]:
        self.text += delta
        if self._stopped or "}" not in delta or self._inside_think():
            return []
        steps = parse_reasoning(self.text, self.convention, self.max_steps, images=self.images).steps
        if steps[:len(self.steps)] != self.steps:
            self._stopped = True
            return []
        fresh = steps[len(self.steps):]
        self.steps += fresh
        return fresh

    def _inside_think(self) -> bool:
        return self.text.lstrip().startswith(THINK_OPEN) and THINK_CLOSE not in self.text
