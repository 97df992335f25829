"""The shareable HTML report (chatbot/report.py): structure, escaping of model text, and one
real twin turn rendered end to end."""
from __future__ import annotations

import dataclasses
from html.parser import HTMLParser

from PIL import Image

from chatbot import render
from chatbot.report import report_html
from corgi.types import Box, CacheStats, Evidence, KeyEvidence, Step, StepKind, TurnResult

MODEL = {"id": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2.5-vl", "dtype": "bfloat16", "device": "cpu"}
SETTINGS = {"max_steps": 6, "max_regions": 6, "crop_padding": 0.25, "structured_output": True}
OUR_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "b", "i", "div",
            "table", "tr", "th", "td", "section", "figure", "figcaption", "img", "ol", "ul", "li", "span"}


class Page(HTMLParser):
    """Tags, image sources, every attribute value and all text of a document."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.text: list[str] = []
        self.li: list[str] = []
        self._in_li = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(k, v or "") for k, v in attrs]
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        if tag == "li":
            self._in_li += 1
            self.li.append("")

    def handle_endtag(self, tag):
        if tag == "li":
            self._in_li -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self._in_li:
            self.li[-1] += data

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def assert_self_contained(page: Page) -> None:
    assert set(page.tags) <= OUR_TAGS, set(page.tags) - OUR_TAGS
    assert page.srcs and all(s.startswith("data:image/jpeg;base64,") for s in page.srcs)
    for name, value in page.attrs:
        if name == "src":
            assert value.startswith("data:image/jpeg;base64,"), value[:60]
        else:
            assert name not in ("href", "action", "srcset", "style") and "//" not in value, (name, value)
        assert not name.startswith("on"), name


def two_images():
    street = Image.new("RGB", (3200, 1800), (120, 160, 200))     # over display size: scaled down
    sign = Image.new("RGB", (400, 300), (240, 240, 240))
    return [("street <1>.png", street), ("sign.jpg", sign)]


def hand_built(question, statement, caption, answer, plain=None):
    car, text = Box(0.1, 0.2, 0.5, 0.8, image=0), Box(0.2, 0.2, 0.8, 0.6, image=1)
    steps = [Step(1, statement, StepKind.OBJECT, car), Step(2, "The sign reads STOP.", StepKind.TEXT, text),
             Step(3, "So the car must stop.", StepKind.REASONING, None)]
    evidence = [Evidence(1, car, StepKind.OBJECT, caption), Evidence(2, text, StepKind.TEXT, "")]
    return TurnResult(question=question, answer=answer, explanation="Line one.\nLine <two>.", steps=steps,
                      evidence=evidence, key_evidence=[KeyEvidence("the <b>sign</b>", text), KeyEvidence("no box")],
                      timings={"reasoning": 1.234, "evidence": 0.5, "synthesis": 0.75, "total": 2.5},
                      raw={}, cache=CacheStats(vision_misses=2, prompt_tokens=900, prefill_tokens_computed=900),
                      warnings=["box [1, 2]: <clamped>"], images=[0, 1], plain_answer=plain)


def test_structure_of_a_hand_built_conversation():
    images = two_images()
    first = hand_built("What is on the road?", "A car is in the middle.", "a blue car", "a car", plain="A car.")
    second = hand_built("And the sign?", "The car again.", "still blue", "STOP")
    out = report_html(MODEL, SETTINGS, images, [first, second])
    page = Page(out)
    assert_self_contained(page)
    # One picture per conversation image, per image a turn is about, per region crop.
    assert len(page.srcs) == 2 + 2 * (2 + 2)
    text = page.all_text
    for value in MODEL.values():
        assert value in text
    assert "crop_padding" in text and "0.25" in text
    assert "Image 1: street <1>.png" in text and "Image 2: sign.jpg" in text
    assert "random weights" not in text                      # a real model: no noise statement
    for n, result in enumerate([first, second], 1):
        assert f"Turn {n}" in text and result.question in text and result.answer in text
    for step in first.steps:
        assert any(li.startswith(f"S{step.index} {step.kind.value}: {step.statement}") for li in page.li)
    assert any("box [0.100, 0.200, 0.500, 0.800] on image 1" in li for li in page.li)
    assert "S1 sees: a blue car" in text and "S2 reads: (nothing found)" in text
    assert "K1 the <b>sign</b>" in "".join(page.li) and "Plain answer" in text and "A car." in text
    assert text.count("Plain answer") == 1                   # the second turn asked for none
    assert "box [1, 2]: <clamped>" in text
    for shown in ("1.23 s", "0.50 s", "0.75 s", "2.50 s", "prefill tokens computed"):
        assert shown in text
    # Display-sized: the 3200 px photo is at most 1600 px wide, its crops at most 480 px.
    widths = [int(v) for k, v in page.attrs if k == "width"]
    assert max(widths) == render.DISPLAY_LONG_SIDE
    assert out.count("<section") == 2


def test_kept_sections_give_the_same_report_and_follow_a_changed_turn():
    """The UI keeps each turn's section across its per-turn rewrites of the report: the document
    must equal one rendered from scratch, also after a turn is regenerated or the padding changes."""
    images = two_images()
    first = hand_built("What is on the road?", "A car is in the middle.", "a blue car", "a car")
    second = hand_built("And the sign?", "The car again.", "still blue", "STOP")
    sections: dict = {}
    assert report_html(MODEL, SETTINGS, images, [first], sections) == report_html(MODEL, SETTINGS, images, [first])
    kept = sections[1][3]
    both = report_html(MODEL, SETTINGS, images, [first, second], sections)
    assert both == report_html(MODEL, SETTINGS, images, [first, second]) and sections[1][3] is kept
    redone = hand_built("And the sign?", "Another statement.", "red", "GO")      # Regenerate
    assert report_html(MODEL, SETTINGS, images, [first, redone], sections) == \
        report_html(MODEL, SETTINGS, images, [first, redone])
    assert "Another statement." in sections[2][3] and "The car again." not in sections[2][3]
    wider = {**SETTINGS, "crop_padding": 0.5}
    assert report_html(MODEL, wider, images, [first], sections) == report_html(MODEL, wider, images, [first])
    twin = {**MODEL, "twin": True}
    assert report_html(twin, SETTINGS, images, [first], sections) == report_html(twin, SETTINGS, images, [first])
    joined = images + [("third.png", Image.new("RGB", (640, 480), (10, 200, 10)))]     # an image joins
    assert report_html(MODEL, SETTINGS, joined, [first], sections) == report_html(MODEL, SETTINGS, joined, [first])
    swapped = [("street <1>.png", Image.new("RGB", (320, 240), "black"))] + joined[1:]  # New conversation
    assert report_html(MODEL, SETTINGS, swapped, [], sections) == report_html(MODEL, SETTINGS, swapped, [])


def test_hostile_model_text_renders_inert():
    images = [("<img src=x onerror=alert(1)>.png", Image.new("RGB", (200, 150), "white"))]
    hostile = {
        "question": "<script>alert('q')</script>",
        "statement": "<img src=http://evil.example/x.png onerror=alert(1)>",
        "caption": "<form action=https://evil.example><input name=p></form>",
        "answer": "</p><iframe src=//evil.example></iframe>\"'<style>body{display:none}</style>",
    }
    result = hand_built(hostile["question"], hostile["statement"], hostile["caption"], hostile["answer"],
                        plain="<script>document.cookie</script>")
    result.steps[1] = dataclasses.replace(result.steps[1], bbox=Box(0.2, 0.2, 0.8, 0.6, image=0))
    result.evidence[1] = dataclasses.replace(result.evidence[1], bbox=Box(0.2, 0.2, 0.8, 0.6, image=0))
    result.key_evidence = [KeyEvidence("<a href=https://evil.example>k</a>", Box(0.1, 0.1, 0.3, 0.3))]
    result.images = [0]
    out = report_html({**MODEL, "id": "<b>id</b>"}, {"crop_padding": 0.1, "<i>k</i>": "<i>x</i>"}, images, [result])
    page = Page(out)
    assert_self_contained(page)
    lowered = out.lower()
    assert lowered.count("<img") == len(page.srcs) == 1 + 1 + 2     # all ours: image, boxed image, 2 crops
    for tag in ("<script", "<form", "<iframe", "<input", "<a ", "<b>id", "<i>k", "<i>x"):
        assert tag not in lowered
    assert lowered.count("<style") == 1                           # our one style block
    assert "evil.example" not in "".join(v for _, v in page.attrs)
    text = page.all_text                                          # the hostile text is shown, as text
    for value in hostile.values():
        assert value in text
    assert "&lt;img src=http://evil.example/x.png onerror=alert(1)&gt;" in out


def test_twin_statement_and_empty_turns():
    image = [("a.png", Image.new("RGB", (64, 48), "red"))]
    out = report_html({**MODEL, "twin": "1"}, {}, image, [])
    text = Page(out).all_text
    assert "This model has random weights: its words are noise." in text
    assert "No questions were asked" in text


def test_real_twin_turn(street_image, tmp_path):
    from conftest import make_engine, run_turn
    from corgi.pipeline import ChatSession

    engine = make_engine("tiny-qwen2.5-vl")
    session = ChatSession(engine, street_image)
    result, _ = run_turn(session, "What is <left> of the car & why?")
    lm = engine.lm
    model = {"id": lm.model_id, "family": lm.family.name, "dtype": str(lm.dtype).removeprefix("torch."),
             "device": str(lm.device), "twin": True}
    settings = dataclasses.asdict(engine.config.pipeline)
    out = report_html(model, settings, [("street-scene.png", street_image)], [result])
    (tmp_path / "report.html").write_text(out, encoding="utf-8")
    page = Page(out)
    assert_self_contained(page)
    on = set(result.images) | {s.bbox.image for s in result.steps if s.bbox}
    assert len(page.srcs) == 1 + len(on) + len(result.evidence)
    assert "What is &lt;left&gt; of the car &amp; why?" in out
    assert "its words are noise" in page.all_text
    assert any(s.bbox for s in result.steps) and result.evidence and result.answer
    for step in result.steps:
        assert any(li.startswith(f"S{step.index} {step.kind.value}: {step.statement}") for li in page.li)
    for phase in result.timings:
        assert f"{result.timings[phase]:.2f} s" in page.all_text
