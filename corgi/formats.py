"""The output formats of the two structured phases, as facts in one place.

The prompts (`prompts.py`) ask for these formats, the grammar (`engine/grammar/`) enforces them
and the parser (`parsing.py`) reads them; all three import the spellings from here.

  phase 1+2:  <think>free text</think>\\n{"steps": [STEP, ...]}
      STEP    {"statement": str, "kind": "object" | "text" | "reasoning", "bbox_2d": BOX | null}
  phase 4:    {"answer": str, "explanation": str, "key_evidence": [ITEM, ...]}
      ITEM    {"description": str, "bbox_2d": BOX | null}, at most MAX_KEY_EVIDENCE items
  BOX         [x1, y1, x2, y2] in the family's `boxes.BoxConvention`
  several images in the turn: every box is preceded by "image": N (the prompt's "Image N"),
      STEP    {"statement": str, "kind": ..., "image": N, "bbox_2d": BOX} (reasoning: no image)
"""
from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# JSON keys, in the order the grammar writes them.
STEPS = "steps"
STATEMENT = "statement"
KIND = "kind"
BBOX = "bbox_2d"
IMAGE = "image"          # several images in a turn: which one a box is on (N of "Image N", 1-based)
ANSWER = "answer"
EXPLANATION = "explanation"
KEY_EVIDENCE = "key_evidence"
DESCRIPTION = "description"

STEP_KEYS = (STATEMENT, KIND, BBOX)
SYNTHESIS_KEYS = (ANSWER, EXPLANATION, KEY_EVIDENCE)
EVIDENCE_KEYS = (DESCRIPTION, BBOX)

# Step kinds as written in the JSON (`types.StepKind` has the same values; tests check it).
KIND_OBJECT, KIND_TEXT, KIND_REASONING = "object", "text", "reasoning"
GROUNDED_KINDS = (KIND_OBJECT, KIND_TEXT)           # these carry a box
STEP_KINDS = (*GROUNDED_KINDS, KIND_REASONING)      # reasoning: "bbox_2d": null

MAX_KEY_EVIDENCE = 3          # synthesis key_evidence items
MAX_STRING_CHARS = 200        # statement, answer, description (a JSON escape counts 2)
MAX_EXPLANATION_CHARS = 400   # synthesis explanation
