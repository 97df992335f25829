"""The accepted outputs as xgrammar EBNF, and their worst-case lengths.

  phase 1+2 (`reasoning_spec` / `reasoning_grammar_source`):
      <think>THINK</think>\\n{"steps": [STEP, STEP, ...]}
      THINK  at most `max_thinking_chars` characters, anything but "<" (newlines allowed)
      STEP   {"statement": STR, "kind": "object", "bbox_2d": BOX}
           | {"statement": STR, "kind": "text", "bbox_2d": BOX}
           | {"statement": STR, "kind": "reasoning", "bbox_2d": null}
      1..max_steps steps. Several images (`images`): a grounded step's box is
           "image": N, "bbox_2d": BOX_N, BOX_N in image N's own convention (the same for ITEM).
  phase 4 (`synthesis_spec` / `synthesis_grammar_source`):
      {"answer": STR, "explanation": STR, "key_evidence": [ITEM, ...]}
      ITEM   {"description": STR, "bbox_2d": BOX | null}, 0..MAX_EVIDENCE_ITEMS items.

  STR    a JSON string: any code point except '"', '\\\\' and control characters (< 0x20, 0x7f),
         or one of the escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t (no \\u escapes); at most
         MAX_STRING_CHARS characters (the explanation: MAX_EXPLANATION_CHARS); an escape counts 2.
  BOX    [x1, y1, x2, y2]: integers without leading zeros, x in 0..x_range and y in 0..y_range of
         the `BoxConvention`, as exact digit-by-digit ranges. x1 <= x2 is not enforced
         (`boxes.to_canonical` repairs reversed corners).

One whitespace style only (", " and ": "), so the text is predictable. Key names, kinds, tags and
limits come from `corgi.formats`.

The structure, the step/item counts and the box ranges are in the EBNF; the *lengths* (thinking
text, strings) are not: `lengths.py` enforces them (the package docstring says why), so a
source does not depend on `max_thinking_chars` and one compile serves every limit.

Unicode. The character classes exclude U+D800..U+DFFF: xgrammar 0.2.8's negated classes otherwise
accept UTF-8-encoded surrogates, which Python's decoder and `json.loads` refuse.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ...boxes import BoxConvention
from ...formats import (ANSWER, BBOX, DESCRIPTION, EXPLANATION, GROUNDED_KINDS, IMAGE, KEY_EVIDENCE, KIND,
                        MAX_EXPLANATION_CHARS, MAX_KEY_EVIDENCE, MAX_STRING_CHARS,
                        STATEMENT, STEP_KINDS, STEPS, THINK_CLOSE, THINK_OPEN)

MAX_EVIDENCE_ITEMS = MAX_KEY_EVIDENCE

_UTF8_MAX = 4                 # bytes per code point, worst case

# The fixed text between the values, written once for both the EBNF and the byte bounds.
_NULL = "null"


def _key(name: str) -> str:
    return json.dumps(name) + ": "


_STEPS_OPEN = THINK_CLOSE + "\n{" + _key(STEPS) + "["     # </think>\n{"steps": [
_STEP_OPEN = "{" + _key(STATEMENT)                       # {"statement": 
_STEP_KIND = ", " + _key(KIND)                           # , "kind": 
_THEN_BOX = ", " + _key(BBOX)                            # , "bbox_2d": 
_ANSWER_OPEN = "{" + _key(ANSWER)
_EXPLANATION = ", " + _key(EXPLANATION)
_EVIDENCE_OPEN = ", " + _key(KEY_EVIDENCE) + "["
_ITEM_OPEN = "{" + _key(DESCRIPTION)
_SEP = ", "


# -- grammar sources ------------------------------------------------------------------------

def _lit(text: str) -> str:
    """An EBNF string literal for `text` (quotes, backslashes and newlines escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _int_range_alternatives(n: int) -> list[str]:
    """EBNF alternatives matching exactly the decimal integers 0..n, without leading zeros."""
    if n < 0:
        raise ValueError(f"range upper bound must be >= 0, got {n}")
    digits = str(n)
    length = len(digits)
    if length == 1:
        return [f"[0-{n}]"]
    alts = ["[0-9]"] + ["[1-9]" + " [0-9]" * (size - 1) for size in range(2, length)]
    for i, ch in enumerate(digits):          # same length as n: smaller digit at position i
        low, high = (1 if i == 0 else 0), int(ch) - 1
        if high >= low:
            parts = [_lit(digits[:i])] if i else []
            parts.append(f"[{low}-{high}]")
            parts.extend(["[0-9]"] * (length - i - 1))
            alts.append(" ".join(parts))
    alts.append(_lit(digits))
    return alts


def _int_rule(name: str, n: int) -> str:
    return f"{name} ::= " + " | ".join(f"({a})" for a in _int_range_alternatives(n))


def _box_rules(convention: BoxConvention, suffix: str = "") -> list[str]:
    x_name = "xint" + suffix
    rules = [_int_rule(x_name, convention.x_range)]
    y_name = x_name
    if convention.y_range != convention.x_range:
        y_name = "yint" + suffix
        rules.append(_int_rule(y_name, convention.y_range))
    rules.append(f'box{suffix} ::= "[" {x_name} ", " {y_name} ", " {x_name} ", " {y_name} "]"')
    return rules


Images = tuple[tuple[int, BoxConvention], ...]   # several images: (N of "Image N", its convention)


def _image_box_rules(images: Images) -> list[str]:
    """`ibox` ::= "image": N, "bbox_2d": box_N for each image: a box's range is its own image's."""
    alternatives = [f'({_lit(json.dumps(IMAGE) + ": " + str(number) + _THEN_BOX)} box{number})'
                    for number, _ in images]
    rules = ["ibox ::= " + " | ".join(alternatives)]
    for number, convention in images:
        rules += _box_rules(convention, str(number))
    return rules


# xgrammar 0.2.8's negated classes accept UTF-8-encoded surrogates (ED A0..BF ..), which are not
# valid UTF-8 (Python's decode and json.loads refuse them): exclude them explicitly.
_SURROGATES = r"\uD800-\uDFFF"

# A JSON string, written recursively like xgrammar's own builtin JSON grammar (cheapest form).
_STRING_RULES = [
    'str ::= "\\"" strtail',
    'strtail ::= "\\"" | [^"\\\\\\0-\\x1f\\x7f' + _SURROGATES + '] strtail'
    ' | "\\\\" ["\\\\/bfnrt] strtail',
]


def _list_of(item: str, min_items: int, max_items: int) -> str:
    """EBNF for `item` repeated min..max times, separated by ", " (min is 0 or 1)."""
    if max_items < 1:
        return '""'
    more = f' ({_lit(_SEP)} {item}){{0,{max_items - 1}}}' if max_items > 1 else ""
    one_or_more = f"({item}{more})"
    return one_or_more if min_items >= 1 else f"({one_or_more})?"


def _kind_then_box(kind: str, images: Images = ()) -> str:
    if kind in GROUNDED_KINDS and images:
        return f"({_lit(json.dumps(kind) + _SEP)} ibox)"
    if kind in GROUNDED_KINDS:
        return f"({_lit(json.dumps(kind) + _THEN_BOX)} box)"
    return _lit(json.dumps(kind) + _THEN_BOX + _NULL)


def reasoning_grammar_source(max_steps: int, convention: BoxConvention,
                             max_thinking_chars: int, images: Images = ()) -> str:
    """EBNF (xgrammar dialect) for phase 1+2: <think>...</think>\\n{"steps": [...]}.

    The thinking and string lengths are enforced by the decoder (`lengths.py`), so the
    source does not depend on `max_thinking_chars` (one compile serves every limit).
    """
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    if max_thinking_chars < 0:
        raise ValueError("max_thinking_chars must be >= 0")
    steps = _list_of("step", 1, max_steps)
    rules = [
        f"root ::= {_lit(THINK_OPEN)} [^{THINK_CLOSE[0]}{_SURROGATES}]* {_lit(_STEPS_OPEN)} {steps}"
        f' {_lit("]}")}',
        f'step ::= {_lit(_STEP_OPEN)} str {_lit(_STEP_KIND)} kindbox "}}"',
        "kindbox ::= " + " | ".join(_kind_then_box(k, images) for k in STEP_KINDS),
        *_STRING_RULES,
        *(_image_box_rules(images) if images else _box_rules(convention)),
    ]
    return "\n".join(rules) + "\n"


def synthesis_grammar_source(convention: BoxConvention, images: Images = ()) -> str:
    """EBNF (xgrammar dialect) for phase 4: {"answer": ..., "explanation": ..., "key_evidence": [...]}."""
    items = _list_of("item", 0, MAX_EVIDENCE_ITEMS)
    item_box = (f'(({_lit(_SEP)} ibox) | {_lit(_THEN_BOX + _NULL)})' if images
                else f'{_lit(_THEN_BOX)} (box | {_lit(_NULL)})')
    rules = [
        f"root ::= {_lit(_ANSWER_OPEN)} str {_lit(_EXPLANATION)} str {_lit(_EVIDENCE_OPEN)}"
        f' {items} {_lit("]}")}',
        f'item ::= {_lit(_ITEM_OPEN)} str {item_box} "}}"',
        *_STRING_RULES,
        *(_image_box_rules(images) if images else _box_rules(convention)),
    ]
    return "\n".join(rules) + "\n"


# -- worst-case lengths (bytes; an allowed token is >= 1 byte, so also a token bound) ---------

def _str_max_bytes(chars: int) -> int:
    return 2 + chars * _UTF8_MAX        # an escape: 2 counted characters, 2 bytes


def _box_max_bytes(convention: BoxConvention) -> int:
    return len("[, , , ]") + 2 * len(str(convention.x_range)) + 2 * len(str(convention.y_range))


def _box_or_null(convention: BoxConvention, images: Images = ()) -> int:
    if images:   # , "image": N before the box
        return max(len(_SEP + _key(IMAGE)) + len(str(n)) + _box_max_bytes(c) for n, c in images)
    return max(_box_max_bytes(convention), len(_NULL))


def reasoning_max_bytes(max_steps: int, convention: BoxConvention, max_thinking_chars: int,
                        images: Images = ()) -> int:
    """Upper bound on the UTF-8 length of any output the reasoning decoder allows."""
    longest_kind = max(len(json.dumps(k)) for k in STEP_KINDS)
    step = (len(_STEP_OPEN) + _str_max_bytes(MAX_STRING_CHARS) + len(_STEP_KIND) + longest_kind
            + len(_THEN_BOX) + _box_or_null(convention, images) + len("}"))
    return (len(THINK_OPEN) + max_thinking_chars * _UTF8_MAX + len(_STEPS_OPEN) + len("]}")
            + max_steps * step + (max_steps - 1) * len(_SEP))


def synthesis_max_bytes(convention: BoxConvention, images: Images = ()) -> int:
    """Upper bound on the UTF-8 length of any output the synthesis decoder allows."""
    item = (len(_ITEM_OPEN) + _str_max_bytes(MAX_STRING_CHARS) + len(_THEN_BOX)
            + _box_or_null(convention, images) + len("}"))
    return (len(_ANSWER_OPEN) + _str_max_bytes(MAX_STRING_CHARS) + len(_EXPLANATION)
            + _str_max_bytes(MAX_EXPLANATION_CHARS) + len(_EVIDENCE_OPEN) + len("]}")
            + MAX_EVIDENCE_ITEMS * item + (MAX_EVIDENCE_ITEMS - 1) * len(_SEP))


# -- a grammar plus its limits ----------------------------------------------------------------

@dataclass(frozen=True)
class GrammarSpec:
    """A grammar plus the length limits its decoder enforces.

    think_chars: None when the output has no <think> block, else its limit in characters.
    string_chars: limit for every JSON string; key_chars: per-key overrides for value strings.
    """
    source: str
    think_chars: int | None
    string_chars: int
    key_chars: tuple[tuple[str, int], ...]
    max_bytes: int


def reasoning_spec(max_steps: int, convention: BoxConvention, max_thinking_chars: int,
                   images: Images = ()) -> GrammarSpec:
    return GrammarSpec(reasoning_grammar_source(max_steps, convention, max_thinking_chars, images),
                       think_chars=max_thinking_chars, string_chars=MAX_STRING_CHARS, key_chars=(),
                       max_bytes=reasoning_max_bytes(max_steps, convention, max_thinking_chars, images))


def synthesis_spec(convention: BoxConvention, images: Images = ()) -> GrammarSpec:
    return GrammarSpec(synthesis_grammar_source(convention, images), think_chars=None,
                       string_chars=MAX_STRING_CHARS,
                       key_chars=((EXPLANATION, MAX_EXPLANATION_CHARS),),
                       max_bytes=synthesis_max_bytes(convention, images))
