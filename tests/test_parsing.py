"""Model text -> steps and answers: well-formed, malformed, partial and hostile outputs."""
from __future__ import annotations

import json
import random

import pytest

from corgi.boxes import REL1000, pixel_convention
from corgi.parsing import _MAX_CANDIDATES, StepStream, Work, extract_json, parse_reasoning, parse_synthesis
from corgi.types import StepKind

O, T, R = "object", "text", "reasoning"

GOOD_STEPS = [
    {"statement": "The car on the left is red.", "kind": "object", "bbox_2d": [100, 200, 300, 400]},
    {"statement": "The sign reads STOP.", "kind": "text", "bbox_2d": [500, 100, 600, 200]},
    {"statement": "So the car must stop.", "kind": "reasoning", "bbox_2d": None},
]
GOOD = "<think>I look at the car and the sign.</think>\n" + json.dumps({"steps": GOOD_STEPS})
GOOD_SUMMARY = [(O, "The car on the left is red.", [0.1, 0.2, 0.3, 0.4]),
                (T, "The sign reads STOP.", [0.5, 0.1, 0.6, 0.2]),
                (R, "So the car must stop.", None)]


def summary(result) -> list[tuple[str, str, list[float] | None]]:
    assert [s.index for s in result.steps] == list(range(1, len(result.steps) + 1))
    return [(s.kind.value, s.statement, s.bbox.to_list() if s.bbox else None) for s in result.steps]


def reason(text: str, max_steps: int = 8):
    return parse_reasoning(text, REL1000, max_steps)


def has_warning(result, part: str) -> bool:
    return any(part.lower() in w.lower() for w in result.warnings)


# ---- reasoning: table of outputs -> steps ------------------------------------------

STEP = '{"statement": "A red car.", "kind": "object", "bbox_2d": [100, 200, 300, 400]}'
RED = (O, "A red car.", [0.1, 0.2, 0.3, 0.4])

REASONING_CASES = [
    ("well formed", GOOD, GOOD_SUMMARY),
    ("no think tags", "Let me look.\n" + json.dumps({"steps": GOOD_STEPS}), GOOD_SUMMARY),
    ("unclosed think", "<think>Let me look.\n" + json.dumps({"steps": GOOD_STEPS}), GOOD_SUMMARY),
    ("closing tag only", "Let me look.</think>" + json.dumps({"steps": GOOD_STEPS}), GOOD_SUMMARY),
    ("markdown fence", "<think>x</think>\n```json\n" + json.dumps({"steps": GOOD_STEPS}, indent=2) + "\n```",
     GOOD_SUMMARY),
    ("bare list", json.dumps(GOOD_STEPS), GOOD_SUMMARY),
    ("prose after", json.dumps({"steps": GOOD_STEPS}) + "\nI hope this helps! {not json}", GOOD_SUMMARY),
    ("chat end token", json.dumps({"steps": GOOD_STEPS}) + "<|im_end|>", GOOD_SUMMARY),
    ("capitalised key", '{"Steps": [' + STEP + "]}", [RED]),
    ("single quotes", "{'steps': [{'statement': 'A red car.', 'kind': 'object', 'bbox_2d': [100, 200, 300, 400]}]}",
     [RED]),
    ("trailing commas",
     '{"steps": [{"statement": "A red car.", "kind": "object", "bbox_2d": [100, 200, 300, 400],},],}',
     [RED]),
    ("python literals", "{'steps': [{'statement': 'So yes.', 'kind': 'reasoning', 'bbox_2d': None, 'ok': True}]}",
     [(R, "So yes.", None)]),
    ("unquoted keys", '{steps: [{statement: "A red car.", kind: "object", bbox_2d: [100, 200, 300, 400]}]}', [RED]),
    ("missing commas", '{"steps": [{"statement": "A red car." "kind": "object" "bbox_2d": [100 200 300 400]}'
                       ' {"statement": "So.", "kind": "reasoning"}]}', [RED, (R, "So.", None)]),
    ("missing closing bracket", '{"steps": [' + STEP + ", " + STEP + "}", [RED, RED]),
    ("json lines", STEP + "\n" + STEP + "\n", [RED, RED]),
    ("bracketed prose before", 'Boxes look like [x1, y1] or {this}. ["red", "blue"]\n{"steps": [' + STEP + "]}",
     [RED]),
    ("escaped quotes and braces", r'{"steps": [{"statement": "It says \"{STOP}\" [sic]", "kind": "reasoning"}]}',
     [(R, 'It says "{STOP}" [sic]', None)]),
    ("bad escape", r'{"steps": [{"statement": "C:\data \d", "kind": "reasoning"}]}', [(R, r"C:data d", None)]),
    ("key bbox", '[{"statement": "A red car.", "kind": "object", "bbox": [100, 200, 300, 400]}]', [RED]),
    ("key box", '[{"statement": "A red car.", "kind": "object", "box": [100, 200, 300, 400]}]', [RED]),
    ("corner pairs", '[{"statement": "A red car.", "kind": "object", "bbox_2d": [[100, 200], [300, 400]]}]', [RED]),
    ("number strings", '[{"statement": "A red car.", "kind": "object", "bbox_2d": ["100", "200", "300px", "400"]}]',
     [RED]),
    ("box as one string", '[{"statement": "A red car.", "kind": "object", "bbox_2d": "[100, 200, 300, 400]"}]', [RED]),
    ("box as dict", '[{"statement": "A red car.", "kind": "object", "bbox_2d": {"x1": 100, "y1": 200, "x2": 300, '
                    '"y2": 400}}]', [RED]),
    ("normalised floats", '[{"statement": "A red car.", "kind": "object", "bbox_2d": [0.1, 0.2, 0.3, 0.4]}]', [RED]),
    ("qwen2-vl tokens", '[{"statement": "The <|object_ref_start|>red car<|object_ref_end|><|box_start|>(100,200),'
                        '(300,400)<|box_end|> is parked.", "kind": "object", "bbox_2d": null}]',
     [(O, "The red car is parked.", [0.1, 0.2, 0.3, 0.4])]),
    ("json box wins over tokens", '[{"statement": "A car <|box_start|>(0,0),(10,10)<|box_end|>", "kind": "object", '
                                  '"bbox_2d": [100, 200, 300, 400]}]', [(O, "A car", [0.1, 0.2, 0.3, 0.4])]),
    ("kind OCR", '[{"statement": "Sign.", "kind": "OCR", "bbox_2d": [100, 200, 300, 400]}]',
     [(T, "Sign.", [0.1, 0.2, 0.3, 0.4])]),
    ("kind Text", '[{"statement": "Sign.", "kind": "Text", "bbox_2d": [100, 200, 300, 400]}]',
     [(T, "Sign.", [0.1, 0.2, 0.3, 0.4])]),
    ("kind obj", '[{"statement": "A red car.", "kind": "obj", "bbox_2d": [100, 200, 300, 400]}]', [RED]),
    ("kind visual", '[{"statement": "A red car.", "kind": " Visual ", "bbox_2d": [100, 200, 300, 400]}]', [RED]),
    ("type key", '[{"statement": "A red car.", "type": "object", "bbox_2d": [100, 200, 300, 400]}]', [RED]),
    ("no kind with box", '[{"statement": "A red car.", "bbox_2d": [100, 200, 300, 400]}]', [RED]),
    ("no kind no box", '[{"statement": "So."}]', [(R, "So.", None)]),
    ("kind null", '[{"statement": "So.", "kind": null, "bbox_2d": null}]', [(R, "So.", None)]),
    ("reasoning box dropped", '[{"statement": "So.", "kind": "reasoning", "bbox_2d": [1, 2, 300, 400]}]',
     [(R, "So.", None)]),
    ("empty box list", '[{"statement": "So.", "kind": "reasoning", "bbox_2d": []}]', [(R, "So.", None)]),
    ("statement number", '[{"statement": 42, "kind": "reasoning"}]', [(R, "42", None)]),
    ("statement list", '[{"statement": ["red", "car"], "kind": "reasoning"}]', [(R, "red, car", None)]),
    ("statement whitespace", '[{"statement": "  A   red\\n car. ", "kind": "reasoning"}]', [(R, "A red car.", None)]),
    ("string entry", '{"steps": ["So the car must stop."]}', [(R, "So the car must stop.", None)]),
    ("control characters", '{"steps": [{"statement": "A red\x00 car.\x07", "kind": "object", '
                           '"bbox_2d": [100, 200, 300, 400]}]}\x1b', [RED]),
    ("raw newline in string", '[{"statement": "A red\ncar.", "kind": "reasoning"}]', [(R, "A red car.", None)]),
    ("pixel floats", '[{"statement": "A red car.", "kind": "object", "bbox_2d": [100.0, 200.0, 300.0, 400.0]}]', [RED]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in REASONING_CASES], ids=[c[0] for c in REASONING_CASES])
def test_reasoning_table(text, expected):
    result = reason(text)
    assert result.ok
    assert summary(result) == expected


@pytest.mark.parametrize("text, thinking", [
    (GOOD, "I look at the car and the sign."),
    ("Let me look.\n```json\n" + json.dumps(GOOD_STEPS) + "\n```", "Let me look."),
    ("<think>Let me look.\n" + json.dumps(GOOD_STEPS), "Let me look."),
    ("Let me look.</think>\n" + json.dumps(GOOD_STEPS), "Let me look."),
    (json.dumps(GOOD_STEPS), ""),
])
def test_reasoning_thinking(text, thinking):
    assert reason(text).thinking == thinking


def test_json_inside_the_think_block_is_still_found():
    result = reason("<think>Plan: " + json.dumps(GOOD_STEPS) + "</think>\nDone.")
    assert result.ok and summary(result) == GOOD_SUMMARY


@pytest.mark.parametrize("text, expected, warning", [
    # an object step without a usable box cannot be checked: it becomes reasoning
    ('[{"statement": "A car.", "kind": "object"}]', [(R, "A car.", None)], "missing box"),
    ('[{"statement": "A car.", "kind": "object", "bbox_2d": null}]', [(R, "A car.", None)], "missing box"),
    ('[{"statement": "A car.", "kind": "text", "bbox_2d": "n/a"}]', [(R, "A car.", None)], "missing box"),
    ('[{"statement": "A car.", "kind": "object", "bbox_2d": [1, 2, 3]}]', [(R, "A car.", None)], "unreadable box"),
    ('[{"statement": "A car.", "kind": "object", "bbox_2d": [1, "x", 3, 4]}]', [(R, "A car.", None)], "not numeric"),
    ('[{"statement": "A car.", "kind": "object", "bbox_2d": {"w": 3}}]', [(R, "A car.", None)], "unreadable box"),
    # unknown kinds follow the box
    ('[{"statement": "A car.", "kind": "foo", "bbox_2d": [100, 200, 300, 400]}]',
     [(O, "A car.", [0.1, 0.2, 0.3, 0.4])], "unknown kind 'foo'"),
    ('[{"statement": "A car.", "kind": "foo"}]', [(R, "A car.", None)], "unknown kind"),
    # to_canonical's repairs are reported
    ('[{"statement": "A car.", "kind": "object", "bbox_2d": [300, 400, 100, 200]}]',
     [(O, "A car.", [0.1, 0.2, 0.3, 0.4])], "reversed"),
    ('[{"statement": "A car.", "kind": "object", "bbox_2d": [100, 200, 1300, 400]}]',
     [(O, "A car.", [0.1, 0.2, 1.0, 0.4])], "outside"),
    # steps without a statement, or that are not objects, are dropped and the rest renumbered
    ('[{"kind": "object", "bbox_2d": [1, 2, 3, 4]}, {"statement": "So.", "kind": "reasoning"}]',
     [(R, "So.", None)], "no readable statement"),
    ('[{"statement": "   ", "kind": "reasoning"}, {"statement": "So."}]', [(R, "So.", None)], "empty"),
    ('[{"statement": {"a": 1}}, {"statement": "So."}]', [(R, "So.", None)], "no readable statement"),
    ('[42, null, ["x"], {"statement": "So."}]', [(R, "So.", None)], "not an object"),
    ('{"steps": [' + STEP + ", " + STEP + ",]", [RED, RED], "cut off"),
    ("{'steps': [" + STEP + "]}", [RED], "repaired"),
])
def test_reasoning_repairs_warn(text, expected, warning):
    result = reason(text)
    assert result.ok
    assert summary(result) == expected
    assert has_warning(result, warning), result.warnings


def test_every_object_and_text_step_has_a_box():
    text = json.dumps([{"statement": f"s{i}", "kind": kind, "bbox_2d": box}
                       for i, (kind, box) in enumerate([("object", None), ("text", [1, 2, 300, 400]),
                                                        ("text", "?"), ("reasoning", [1, 2, 3, 4]),
                                                        ("Object", [10, 10, 20, 20])])])
    result = reason(text)
    assert [s.statement for s in result.steps] == ["s0", "s1", "s2", "s3", "s4"]
    for step in result.steps:
        assert (step.bbox is not None) == (step.kind != StepKind.REASONING)


def test_max_steps_cuts_and_warns():
    text = json.dumps({"steps": [{"statement": f"Step {i}.", "kind": "reasoning"} for i in range(7)]})
    result = reason(text, max_steps=3)
    assert [s.statement for s in result.steps] == ["Step 0.", "Step 1.", "Step 2."]
    assert [s.index for s in result.steps] == [1, 2, 3]
    assert has_warning(result, "kept the first 3")
    assert not has_warning(reason(text, max_steps=7), "kept the first")


def test_pixel_convention_boxes():
    text = '[{"statement": "Car.", "kind": "object", "bbox_2d": [322, 119, 644, 476]}]'
    result = parse_reasoning(text, pixel_convention(644, 476), 8)
    assert result.steps[0].bbox is not None
    assert result.steps[0].bbox.to_list() == [0.5, 0.25, 1.0, 1.0]


@pytest.mark.parametrize("text", [
    "", "   ", "I cannot see an image.", '["red", "blue"]', "<think>hmm", "<think>a</think>", "{}", "[]",
    '{"steps": []}',
    '{"steps": "none"}', "[1, 2, 3]", '{"steps": [', '{"steps": [{"statement": "A car.", "kind": "obj',
    '[{"kind": "object"}]', '[null, 1, "   "]', "```json\n```", "}{][", "<|im_end|>",
])
def test_reasoning_nothing_readable(text):
    result = reason(text)
    assert not result.ok
    assert result.steps == []
    assert result.warnings


def test_reasoning_without_json_keeps_thinking():
    assert reason("<think>I see a cat.</think>\nSorry.").thinking == "I see a cat."
    assert reason("Just some prose.").thinking == "Just some prose."


def test_truncation_keeps_only_complete_steps():
    # cut the good output at every position: never raises, and never yields a half step
    full = summary(reason(GOOD))
    previous = 0
    for cut in range(len(GOOD) + 1):
        result = reason(GOOD[:cut])
        got = summary(result)
        assert got == full[:len(got)], (cut, got)
        assert len(got) >= previous, cut        # more text never loses a step
        previous = len(got)
        assert result.ok == bool(got)
    assert previous == 3


def test_truncation_in_single_quoted_json_lines():
    text = "\n".join([STEP.replace('"', "'")] * 3)
    for cut in range(len(text) + 1):
        got = summary(reason(text[:cut]))
        assert got == [RED] * len(got)


def test_random_mutations_never_raise():
    rng = random.Random(1234)
    alphabet = list('{}[]",:\'\\ \n0123456789abcnulltrue') + ["<think>", "</think>", "```", "<|box_start|>"]
    for _ in range(1500):
        chars = list(GOOD)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(chars) + 1)
            action = rng.random()
            if action < 0.4 and chars:
                del chars[min(pos, len(chars) - 1)]
            elif action < 0.8:
                chars.insert(pos, rng.choice(alphabet))
            else:
                chars = chars[:pos]
        text = "".join(chars)
        result = reason(text)
        for step in result.steps:
            assert step.statement and isinstance(step.statement, str)
            assert (step.bbox is not None) == (step.kind != StepKind.REASONING)
        parse_synthesis(text, REL1000)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        reason(text)
        parse_synthesis(text, REL1000)


HOSTILE = [
    "[" * 100_000,
    "{" * 100_000,
    '{"a":' * 50_000,
    "x" * 100_000,
    '"' * 100_000,
    "'" * 100_000,
    '"\\' * 50_000,
    "[{" * 50_000,
    "[" * 30 + "1," * 50_000 + "x",
    "<think>" * 20_000,
    "<|box_start|>" * 10_000,
    "{'a': " * 20_000,
    '{"steps": [' + ('{"statement": "s", "kind": "object", "bbox_2d": [1, 2, 3, 4]},' * 1_500),
    "[1, " * 30_000,
    "\x00" * 100_000,
    "a [b] {c} " * 10_000,
]


# Without the character budget each of these costs ~200 candidate starts x the whole text.
EXPENSIVE = [
    "[" * 240 + "1," * 50_000,                      # strict JSON scans far, the reader stops at depth 33
    ("[1," * 10 + "[") * 3_000,
    '{"statement": "s"}\n' * 5_000,                # JSON lines: one search per line
]


def _checked_work(parse, text: str) -> Work:
    work = Work(len(text))
    parse(text, work)
    assert work.searches >= 1
    assert work.candidates <= work.searches * _MAX_CANDIDATES
    assert work.tokens <= work.max_tokens
    assert work.chars <= work.max_chars + 2 * len(text), work
    assert work.max_tokens <= 10_000 + 2 * len(text) and work.max_chars <= 100_000 + 4 * len(text)
    return work


@pytest.mark.parametrize("text", HOSTILE + EXPENSIVE, ids=[f"hostile{i}" for i in range(len(HOSTILE + EXPENSIVE))])
def test_hostile_inputs_cost_linear_work(text):
    """Speed without a clock: the work counted by the parser stays linear in the input."""
    results = []
    _checked_work(lambda t, w: results.append(parse_reasoning(t, REL1000, 8, work=w)), text)
    _checked_work(lambda t, w: results.append(parse_synthesis(t, REL1000, work=w)), text)
    result, answer = results
    assert len(result.steps) <= 8
    assert isinstance(answer.answer, str)
    assert all(len(w) <= 300 for w in result.warnings + answer.warnings)


def test_json_lines_are_read_in_one_pass():
    text = '{"statement": "s", "kind": "reasoning"}\n' * 2_000
    work = _checked_work(lambda t, w: parse_reasoning(t, REL1000, 8, work=w), text)
    assert work.searches == 2_001 and work.candidates == 2_000
    assert work.chars == len(text) - 2_000        # every step decoded once, newlines skipped


def test_large_valid_output_parses_completely():
    steps = [{"statement": f"Step {i} " + "word " * 20, "kind": "reasoning"} for i in range(500)]
    body = json.dumps({"steps": steps}).replace('"', "'")
    text = "<think>" + "hmm " * 10_000 + "</think>" + body
    assert len(text) > 100_000
    work = Work(len(text))
    result = parse_reasoning(text, REL1000, max_steps=1000, work=work)
    assert len(result.steps) == 500 and result.steps[-1].statement.startswith("Step 499")
    # one candidate, read once by the tolerant reader (strict JSON fails at the first quote)
    assert work.searches == 1 and work.candidates == 1
    assert work.chars <= len(body) + 2


def test_non_string_input_does_not_raise():
    assert not parse_reasoning(None, REL1000, 8).ok     # type: ignore[arg-type]
    assert not parse_synthesis(None, REL1000).ok        # type: ignore[arg-type]


# ---- synthesis ---------------------------------------------------------------------

GOOD_ANSWER = json.dumps({
    "answer": "Red.",
    "explanation": "The car in region 1 is red.",
    "key_evidence": [{"description": "a red car", "bbox_2d": [100, 200, 300, 400]},
                     {"description": "the sky", "bbox_2d": None}],
})


def synth(text: str):
    return parse_synthesis(text, REL1000)


def evidence(result) -> list[tuple[str, list[float] | None]]:
    return [(k.text, k.bbox.to_list() if k.bbox else None) for k in result.key_evidence]


GOOD_EVIDENCE = [("a red car", [0.1, 0.2, 0.3, 0.4]), ("the sky", None)]

SYNTHESIS_CASES = [
    ("well formed", GOOD_ANSWER, "Red.", "The car in region 1 is red.", GOOD_EVIDENCE),
    ("think first", "<think>It is red.</think>\n" + GOOD_ANSWER, "Red.", "The car in region 1 is red.",
     GOOD_EVIDENCE),
    ("fenced with prose", "Here you go:\n```json\n" + GOOD_ANSWER + "\n```\nAnything else?<|im_end|>", "Red.",
     "The car in region 1 is red.", GOOD_EVIDENCE),
    ("single quotes trailing commas", "{'answer': 'Red.', 'explanation': 'It is.', 'key_evidence': [],}", "Red.",
     "It is.", []),
    ("no explanation", '{"answer": "Red."}', "Red.", "", []),
    ("answer number", '{"answer": 3, "explanation": "Three cars."}', "3", "Three cars.", []),
    ("answer bool", '{"answer": true}', "yes", "", []),
    ("answer list", '{"answer": ["red", "blue"]}', "red, blue", "", []),
    ("capitalised keys", '{"Answer": "Red.", "Explanation": "x", "Key_Evidence": [{"Description": "car", '
                         '"BBox": [100, 200, 300, 400]}]}', "Red.", "x", [("car", [0.1, 0.2, 0.3, 0.4])]),
    ("evidence as strings", '{"answer": "Red.", "key_evidence": ["the car", "the light"]}', "Red.", "",
     [("the car", None), ("the light", None)]),
    ("evidence as one object", '{"answer": "Red.", "key_evidence": {"description": "car", "box": [100, 200, 300, '
                               '400]}}', "Red.", "", [("car", [0.1, 0.2, 0.3, 0.4])]),
    ("evidence box only", '{"answer": "Red.", "key_evidence": [{"bbox_2d": [100, 200, 300, 400]}]}', "Red.", "",
     [("", [0.1, 0.2, 0.3, 0.4])]),
    ("evidence qwen2 tokens", '{"answer": "Red.", "key_evidence": [{"description": "the <|box_start|>(100,200),'
                              '(300,400)<|box_end|> car"}]}', "Red.", "", [("the car", [0.1, 0.2, 0.3, 0.4])]),
    ("other json first", '{"note": 1} [1, 2] {"answer": "Red."}', "Red.", "", []),
    ("whitespace in answer", '{"answer": "  Red.\\n "}', "Red.", "", []),
]


@pytest.mark.parametrize("text, answer, explanation, key_evidence", [c[1:] for c in SYNTHESIS_CASES],
                         ids=[c[0] for c in SYNTHESIS_CASES])
def test_synthesis_table(text, answer, explanation, key_evidence):
    result = synth(text)
    assert result.ok
    assert (result.answer, result.explanation, evidence(result)) == (answer, explanation, key_evidence)


def test_synthesis_key_evidence_cut_to_three():
    items = [{"description": f"e{i}", "bbox_2d": [100, 100, 200, 200]} for i in range(5)]
    result = synth(json.dumps({"answer": "Red.", "key_evidence": items}))
    assert [k.text for k in result.key_evidence] == ["e0", "e1", "e2"]
    assert has_warning(result, "kept the first 3")


def test_synthesis_drops_bad_evidence_and_keeps_box_warnings():
    result = synth('{"answer": "Red.", "key_evidence": [42, {"foo": 1}, {"description": "car", '
                   '"bbox_2d": [300, 400, 100, 200]}]}')
    assert evidence(result) == [("car", [0.1, 0.2, 0.3, 0.4])]
    assert has_warning(result, "not an object") and has_warning(result, "no description")
    assert has_warning(result, "reversed")


@pytest.mark.parametrize("text, answer", [
    ("The car is red.", "The car is red."),
    ("<think>Looking closely.</think>\nThe car is red.<|im_end|>", "The car is red."),
    ("```\nThe car is red.\n```", "The car is red."),
    ("<think>The car is red.", "The car is red."),
    ("", ""),
    ("The answer is [red].", "The answer is [red]."),
    ('{"foo": "bar"}', '{"foo": "bar"}'),
])
def test_synthesis_without_json_falls_back_to_raw_text(text, answer):
    result = synth(text)
    assert not result.ok
    assert result.answer == answer
    assert result.explanation == "" and result.key_evidence == []
    assert has_warning(result, "no answer json")


@pytest.mark.parametrize("text", [
    '{"answer": "", "explanation": "Unclear."}',
    '{"answer": null, "explanation": "Unclear."}',
    '{"explanation": "Unclear."}',
    '<think>x</think>{"answer": {"a": 1}, "explanation": "Unclear."}',
])
def test_synthesis_missing_answer_falls_back(text):
    result = synth(text)
    assert not result.ok
    assert result.answer == text.split("</think>")[-1]
    assert result.explanation == "Unclear."
    assert has_warning(result, "no answer")


def test_synthesis_truncated_keeps_what_was_written():
    result = synth('{"answer": "Red.", "explanation": "The car in region 1 is re')
    assert result.ok and result.answer == "Red."
    assert result.explanation == "The car in region 1 is re"
    assert has_warning(result, "cut off")
    result = synth('{"answer": "Red.", "explanation": "x", "key_evidence": [{"description": "car", '
                   '"bbox_2d": [100, 200, 300, 400]}, {"description": "light", "bbox_2d": [1')
    assert evidence(result) == [("car", [0.1, 0.2, 0.3, 0.4])]


def test_synthesis_truncation_never_raises():
    for cut in range(len(GOOD_ANSWER) + 1):
        result = synth(GOOD_ANSWER[:cut])
        assert isinstance(result.answer, str)
        assert len(result.key_evidence) <= 2
        assert evidence(result) == GOOD_EVIDENCE[:len(result.key_evidence)]


# ---- the shared helper ---------------------------------------------------------------

def test_extract_json_skips_unwanted_values():
    text = 'see [1, 2] and {"a": 1} then {"answer": "x"} and {"answer": "y"}'
    found = extract_json(text, lambda v: isinstance(v, dict) and "answer" in v)
    assert found is not None and found.value == {"answer": "x"}
    assert text[found.start:found.end] == '{"answer": "x"}'
    assert not found.repaired and not found.truncated


def test_extract_json_flags_repairs_and_truncation():
    found = extract_json("{'a': [1, 2,], }", lambda v: True)
    assert found is not None and found.value == {"a": [1, 2]} and found.repaired and not found.truncated
    # a number at the very end may be cut short ("3" of "30"), so it is left out
    found = extract_json('{"a": [1, 2], "b": {"c": 3, "d": 30', lambda v: True)
    assert found is not None and found.value == {"a": [1, 2], "b": {"c": 3}}
    assert found.truncated
    assert extract_json("no json here", lambda v: True) is None


# ---- steps while phase 1+2 streams (StepStream) -----------------------------------------

_STREAMED = [
    '<think>look {"statement": "not a step"} first</think>\n{"steps": [{"statement": "a } b", '
    '"kind": "object", "bbox_2d": [1, 2, 300, 400]}, {"statement": "the sign", "kind": "text", '
    '"bbox_2d": [10, 20, 30, 40]}, {"statement": "so", "kind": "reasoning", "bbox_2d": null}]}',
    '<think></think>\n{"steps": [{"statement": "one", "kind": "object", "bbox_2d": [0, 0, 999, 999]}]}',
    '{"steps": [{"statement": "no think", "kind": "reasoning", "bbox_2d": null}, '
    '{"statement": "cut mid', # truncated: only the closed step streams, as the final parse keeps
]


@pytest.mark.parametrize("text", _STREAMED)
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_streamed_steps_equal_the_final_parse(text, chunk):
    stream, streamed, first_at = StepStream(REL1000, 5), [], {}
    for i in range(0, len(text), chunk):
        for step in stream.feed(text[i:i + chunk]):
            streamed.append(step)
            first_at[step.index] = i + chunk
    final = parse_reasoning(text, REL1000, 5).steps
    assert streamed == final and final
    # Each step came as soon as its object closed, not at the end (the last may close last).
    if len(final) > 1 and chunk < len(text):
        assert first_at[1] < len(text)


def test_no_steps_stream_from_inside_an_open_think_block():
    stream = StepStream(REL1000, 5)
    assert stream.feed('<think>{"statement": "x", "kind": "reasoning", "bbox_2d": null}') == []
    assert stream.feed(" more}") == []


def test_streamed_steps_respect_max_steps():
    text = '{"steps": [' + ", ".join(f'{{"statement": "s{i}", "kind": "reasoning", "bbox_2d": null}}'
                                     for i in range(6)) + "]}"
    stream = StepStream(REL1000, 2)
    streamed = [s for ch in text for s in stream.feed(ch)]
    assert [s.statement for s in streamed] == ["s0", "s1"] == [s.statement for s in parse_reasoning(text, REL1000, 2).steps]
