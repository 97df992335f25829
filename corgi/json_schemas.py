"""The two structured phases' outputs as JSON Schemas, for a server's `response_format`.

The local backend enforces the formats with xgrammar EBNF (`engine/grammar/schemas.py`); a
vLLM or SGLang server takes a JSON Schema instead. Both are written from the same facts
(`formats.py`: keys, kinds, limits; the family's `BoxConvention`: box ranges), so a reply that
satisfies this schema is one the local grammar also allows, minus two things a JSON Schema
cannot say: the `<think>` block before phase 1+2's JSON (a server with a reasoning parser
returns the thinking apart from the content), and the one whitespace style. `parsing.py`
reads either.

`Structure` names what a phase is constrained to; each backend turns it into its own form
(the engine: a ConstrainedDecoder; a server: `response_format`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .boxes import BoxConvention
from .formats import (ANSWER, BBOX, DESCRIPTION, EXPLANATION, GROUNDED_KINDS, IMAGE, KEY_EVIDENCE, KIND,
                      KIND_REASONING, MAX_EXPLANATION_CHARS, MAX_KEY_EVIDENCE, MAX_STRING_CHARS, STATEMENT,
                      STEPS)

Images = tuple[tuple[int, BoxConvention], ...]   # several images: (N of "Image N", its convention)


@dataclass(frozen=True)
class Structure:
    """A structured phase: "reasoning" or "synthesis", the pipeline settings (max_steps,
    max_thinking_chars), the turn's box convention and, when the turn has several images,
    each image's number and convention."""
    phase: str
    settings: Any
    convention: BoxConvention
    images: Images = ()

    def json_schema(self) -> dict[str, Any]:
        if self.phase == "reasoning":
            return reasoning_schema(self.settings.max_steps, self.convention, self.images)
        return synthesis_schema(self.convention, self.images)


def _string(max_chars: int = MAX_STRING_CHARS) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_chars}


def _box(convention: BoxConvention) -> dict[str, Any]:
    x = {"type": "integer", "minimum": 0, "maximum": convention.x_range}
    y = {"type": "integer", "minimum": 0, "maximum": convention.y_range}
    return {"type": "array", "prefixItems": [x, y, x, y], "items": False, "minItems": 4, "maxItems": 4}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def _boxed(fields: dict[str, Any], convention: BoxConvention, images: Images) -> list[dict[str, Any]]:
    """`fields` then the box: one alternative, or one per image ("image": N, its own range)."""
    if not images:
        return [_object({**fields, BBOX: _box(convention)})]
    return [_object({**fields, IMAGE: {"const": number}, BBOX: _box(conv)}) for number, conv in images]


def reasoning_schema(max_steps: int, convention: BoxConvention, images: Images = ()) -> dict[str, Any]:
    """{"steps": [STEP, ...]}: 1..max_steps steps; a grounded step has a box, a reasoning step null."""
    grounded = _boxed({STATEMENT: _string(), KIND: {"enum": list(GROUNDED_KINDS)}}, convention, images)
    reasoning = _object({STATEMENT: _string(), KIND: {"const": KIND_REASONING}, BBOX: {"type": "null"}})
    step = {"anyOf": [*grounded, reasoning]}
    return _object({STEPS: {"type": "array", "items": step, "minItems": 1, "maxItems": max_steps}})


def synthesis_schema(convention: BoxConvention, images: Images = ()) -> dict[str, Any]:
    """{"answer", "explanation", "key_evidence": [ITEM, ...]}: at most MAX_KEY_EVIDENCE items."""
    unboxed = _object({DESCRIPTION: _string(), BBOX: {"type": "null"}})
    item = {"anyOf": [*_boxed({DESCRIPTION: _string()}, convention, images), unboxed]}
    return _object({ANSWER: _string(), EXPLANATION: _string(MAX_EXPLANATION_CHARS),
                    KEY_EVIDENCE: {"type": "array", "items": item, "maxItems": MAX_KEY_EVIDENCE}})
