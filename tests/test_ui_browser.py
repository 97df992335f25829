"""The web UI in a real browser: Debian's chromium driven by Playwright (never `playwright install`:
there is no browser download here). Uploads an image, stops a turn, asks, watches the phases
stream in, checks the answer, the boxes panel and the timeline, asks a follow-up, saves
test-artifacts/ui.png, opens the debug view and closes the tab; a second image joins a
conversation and a step is picked; a big phone photo stays small on the wire. Screenshots in
tests/artifacts/ (look at them).
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from chatbot.app import HELD_QUESTION, STOPPED_QUEUED
from server import ASSETS, REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000     # generous: a 2-core machine running the model, the server and the browser

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(ui_server):
    return ui_server          # the UI tests' shared server (conftest.py)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def timeline_row(page, label: str) -> str | None:
    """The text of the timeline row whose head starts with `label` (None while absent)."""
    # One read of every row: the timeline is re-rendered while a turn streams or stops, so a row
    # listed first and read later may be gone by then.
    for text in page.locator("#timeline .tl-row").all_inner_texts():
        if text.strip().startswith(label):
            return text
    return None


def upload(page, *paths) -> None:
    page.get_by_test_id("Upload image(s)-upload-button").set_input_files([str(p) for p in paths])


def wait_for(probe, timeout: float = WAIT_MS / 1000):
    """Poll `probe` until it returns something truthy (reading a table that is still updating)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except ValueError:        # e.g. the column is not there yet
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def ask(page, question: str) -> None:
    box = page.locator("#question textarea")
    box.fill(question)
    box.press("Enter")


def test_a_conversation_in_the_browser(server, browser):
    from playwright.sync_api import expect
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    # expect() has its own 5 s default, which set_default_timeout does not change; a Stop
    # followed by the first grammar compile can take longer on a loaded 2-core machine.
    expect.set_options(timeout=WAIT_MS)
    page.goto(server.url)
    chat = page.locator("#chat")
    expect(page.locator("#stop")).to_be_disabled()                     # nothing to stop yet
    expect(page.locator("#regenerate")).to_be_disabled()               # nothing to redo yet

    upload(page, ASSETS / "street-scene.png")
    expect(chat.get_by_text("encoded and ready")).to_be_visible()
    expect(page.locator("#boxes img").first).to_be_visible()            # the image in the side panel
    expect(page.locator("#images")).to_contain_text("street-scene.png (current)")
    expect(page.locator("#timeline")).to_contain_text("image, at upload")

    # A question waiting in the model queue (another tab's long turn runs): Stop cancels it
    # before it starts, and the chat keeps it with a note instead of dropping it.
    from gradio_client import handle_file
    busy = server.client()
    busy.predict([handle_file(str(ASSETS / "shapes.png"))], api_name="/set_image")
    long_turn = busy.submit({"text": "Describe everything.", "files": []}, 20, 20, 4096, 8, 16, api_name="/ask")
    next(iter(long_turn))               # its first update: it holds the model queue now
    ask(page, "Is there a bus?")
    expect(page.locator("#stop")).to_be_enabled()
    expect(chat.get_by_text("Is there a bus?")).to_be_visible()         # echoed, waiting
    # Another question while this tab's one waits: the browser does not send it (one event of a
    # listener at a time), so it is not echoed as waiting and stays in the box.
    ask(page, "Is there a taxi?")
    page.wait_for_timeout(500)
    expect(chat.get_by_text("Is there a taxi?")).to_have_count(0)
    page.locator("#stop").click()
    expect(chat.get_by_text(STOPPED_QUEUED)).to_be_visible()
    assert not long_turn.done(), "the other tab's turn ended first: this question was not queued"
    expect(chat.get_by_text("Is there a bus?")).to_be_visible()
    expect(chat.get_by_text(HELD_QUESTION.format(what="“Is there a taxi?”"))).to_be_visible()
    expect(chat.get_by_text(STOPPED_QUEUED)).to_have_count(1)
    expect(chat.locator(".loading-spinner")).to_have_count(0)
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#question textarea")).to_have_value("Is there a taxi?")  # one Enter to ask it
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "ui-stopped-in-queue.png"))
    long_turn.cancel()
    busy.predict(api_name="/stop")
    busy.close()

    # Stop at once (the echo enables it; a twin's turn can be over in a second): the turn is
    # cancelled queued or running, the chat says so, nothing keeps spinning.
    ask(page, "What does the sign say?")
    expect(page.locator("#stop")).to_be_enabled()
    page.locator("#stop").click()
    # A warm twin's turn can end before the click lands (then there is nothing to stop, and the
    # turn stands); Stop is also tested over the API and in-process (test_ui_client, test_faults).
    stopped = chat.get_by_text("Stopped. The conversation goes on from before this question.")
    queued = chat.get_by_text(STOPPED_QUEUED)
    wait_for(lambda: stopped.count() or queued.count() > 1
             or (timeline_row(page, "turn 1") or "").find("from the cache") >= 0)
    expect(chat.locator(".loading-spinner")).to_have_count(0)
    expect(page.locator("#stop")).to_be_disabled()
    first = 2 if (timeline_row(page, "turn 1") or "").find("from the cache") >= 0 else 1   # the next turn's number

    # An example question fills the box; asking it streams the phases.
    page.locator("#example-questions").get_by_text("What colour is the car?").click()
    expect(page.locator("#question textarea")).to_have_value("What colour is the car?")
    page.locator("#question textarea").press("Enter")
    expect(chat.locator(".loading-spinner").first).to_be_visible()       # a pending phase, at once
    expect(chat.get_by_text("What colour is the car?")).to_be_visible()   # echoed at once
    expect(page.locator("#question textarea")).to_have_value("")
    for title in ("Reasoning: steps and regions", "Evidence: reading the regions", "Synthesis: writing the answer"):
        expect(chat.get_by_text(title).first).to_be_visible()
    # The turn is over when its row is in the timeline and the trace can be downloaded.
    wait_for(lambda: (timeline_row(page, f"turn {first}") or "").find("running") < 0
             and timeline_row(page, f"turn {first}"))
    expect(page.locator("#trace")).to_be_enabled()
    expect(page.locator("#report")).to_be_enabled()
    expect(page.locator("#regenerate")).to_be_enabled()
    expect(chat.locator(".loading-spinner")).to_have_count(0)          # every phase is done
    bot = chat.get_by_test_id("bot")
    assert bot.count() >= 5      # image note, three phases, the answer
    assert bot.last.inner_text().strip()
    expect(page.locator("#boxes img").first).to_have_attribute("src", re.compile(r"\S"))

    ask(page, "Describe the house.")
    expect(chat.get_by_text("Describe the house.")).to_be_visible()
    # The turn's row appears at once and fills in span by span; cache figures come at its end.
    turn2 = wait_for(lambda: (row := timeline_row(page, f"turn {first + 1}")) and "from the cache" in row and row)
    assert "no image re-encoded" in turn2 and "prefill" in turn2 and "decode" in turn2, turn2
    expect(chat.locator(".loading-spinner")).to_have_count(0)

    page.screenshot(path=str(artifacts / "ui.png"), full_page=True)

    # Debugging is one click away: the exact prompts and raw outputs of each turn.
    page.get_by_text("Debug: timings table, prompts, raw output and parsed result per turn").click()
    expect(page.get_by_text(f"######## turn {first + 1}: Describe the house.")).to_be_visible()
    expect(page.locator("#timings")).to_contain_text(f"turn {first + 1}")

    # Presenter mode: larger text for a meeting-room screen.
    size = lambda: page.locator("#chat").evaluate("e => parseFloat(getComputedStyle(e).fontSize)")  # noqa: E731
    before = size()
    page.locator("#presenter input").check()
    wait_for(lambda: size() > before)

    # New conversation keeps the image; an example image then starts a conversation about it.
    page.locator("#new-conversation").click()
    expect(chat.get_by_text("still loaded")).to_be_visible()
    page.locator("#example-images").locator("img[src*='receipt']").first.click()
    expect(chat.get_by_text("receipt.png")).to_be_visible()
    expect(chat.get_by_text("Describe the house.")).to_have_count(0)

    # Closing the tab frees its session at once (demo.unload), not only after the idle time-out.
    closed = "a tab was closed: its session is freed"
    before = server.log_text().count(closed)      # a shared server: other tests closed sessions too
    page.close()
    wait_for(lambda: server.log_text().count(closed) > before, timeout=30)


def test_images_join_and_steps_pick_their_boxes_in_the_browser(server, browser):
    """A second image attached with the clip joins the conversation (the first turn keeps its
    image, the panel marks the new one current); steps are listed as they are written; picking
    a step highlights its box (a new picture), selects its crop and shows its caption."""
    from playwright.sync_api import expect
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    page.goto(server.url)
    chat = page.locator("#chat")
    upload(page, ASSETS / "street-scene.png")
    expect(chat.get_by_text("encoded and ready")).to_be_visible()
    # Steps as they are written: a step's readable line shows while its phase still writes
    # ("writing ..." under the lines), not only once the phase is over.
    page.evaluate("""() => { window.__liveStep = false;
      new MutationObserver(() => { if (document.querySelector('#chat').innerText.includes('writing ...'))
        window.__liveStep = true; }).observe(document.querySelector('#chat'),
        {subtree: true, childList: true, characterData: true}); }""")
    ask(page, "What colour is the car?")
    wait_for(lambda: (row := timeline_row(page, "turn 1")) and "from the cache" in row)
    if page.locator("#step-pick label").count():          # the twin wrote steps: one showed live
        assert page.evaluate("() => window.__liveStep")

    page.locator("#question input[type=file]").set_input_files(str(ASSETS / "receipt.png"))
    ask(page, "What is the total?")
    expect(chat.get_by_text("joined the conversation")).to_be_visible()
    expect(page.locator("#images")).to_contain_text("receipt.png (current)")
    expect(page.locator("#images")).not_to_contain_text("street-scene.png (current)")
    wait_for(lambda: (row := timeline_row(page, "turn 2")) and "from the cache" in row)
    expect(chat.get_by_text("What colour is the car?")).to_be_visible()      # the first turn stays
    page.screenshot(path=str(REPO / "tests" / "artifacts" / "two-images-1280x800.png"))

    choices = page.locator("#step-pick label")
    if choices.count() == 0:
        pytest.skip("the twin wrote no steps this time")      # random weights: nothing to pick
    before = page.locator("#boxes img").first.get_attribute("src")
    choices.first.click()
    expect(page.locator("#picked")).to_contain_text("S1")
    if page.locator("#picked").inner_text().find("Its region") >= 0:      # a grounded step: its crop is marked
        expect(page.locator("#regions")).to_contain_text("▶ S1")
    if " box" in page.locator("#picked").inner_text():        # a step with a box: it is shaded now
        wait_for(lambda: page.locator("#boxes img").first.get_attribute("src") != before)
    page.screenshot(path=str(REPO / "tests" / "artifacts" / "picked-step-1280x800.png"))
    page.close()


def test_a_big_photo_turn_stays_small_in_the_browser(server, browser, tmp_path):
    """A 4000x3000 phone photo (~4 MB JPEG of noise): the page receives under 3 MB in the upload
    and one turn (every image it is sent is display-sized), steps show as lines and their boxes
    appear on the image, the twin is labelled as noise. Screenshots at 1280x800 and 1920x1080."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), np.ones((10, 10, 1), np.uint8))
    noisy = np.clip(base.astype(np.int16) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    photo = tmp_path / "phone-photo.jpg"
    Image.fromarray(noisy).save(photo, quality=85)
    assert photo.stat().st_size > 3 * 1024 * 1024, photo.stat().st_size

    artifacts = REPO / "tests" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {artifacts}")
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    page.goto(server.url)
    chat = page.locator("#chat")
    expect(page.locator("#noise-warning")).to_contain_text("noise")
    received: list[tuple[str, int]] = []

    def count(response):
        try:
            received.append((response.url, len(response.body())))
        except Exception:      # a stream still open (server-sent events): not an image
            pass
    # The upload and one turn: from the file to the finished answer (every picture the page
    # gets is a display-size JPEG or a thumbnail, never the upload itself).
    page.on("response", count)
    upload(page, photo)
    expect(chat.get_by_text("encoded and ready")).to_be_visible()
    ask(page, "What is in the photo?")
    wait_for(lambda: (row := timeline_row(page, "turn 1")) and "from the cache" in row)
    expect(page.locator("#trace")).to_be_enabled()
    expect(chat.locator(".loading-spinner")).to_have_count(0)
    page.screenshot(path=str(artifacts / "big-photo-1280x800.png"))
    for button in ("#stop", "#regenerate", "#new-conversation"):     # no scrolling at 1280x800
        expect(page.locator(button)).to_be_in_viewport()
    expect(chat.get_by_text("Steps").first).to_be_visible()          # steps stay in view at the end
    expect(chat.get_by_text("this answer is noise").first).to_be_visible()
    page.set_viewport_size({"width": 1920, "height": 1080})
    page.screenshot(path=str(artifacts / "big-photo-1920x1080.png"))
    page.remove_listener("response", count)
    images = [(u, n) for u, n in received if "/file=" in u or "gradio_api/file" in u]
    total = sum(n for _, n in received)
    print(f"page received {total} bytes in {len(received)} responses; files: {images}")
    assert total < 3 * 1024 * 1024, (total, sorted(received, key=lambda r: -r[1])[:5])
    page.close()


def test_model_text_that_carries_markup_stays_inert_in_the_browser(browser, tmp_path):
    """A twin scripted (under the real grammar, benchmarks.common.GrammarScriptEngine) to write
    steps, an answer and key evidence that carry a remote image, a link, a login form and a
    script: the page shows them as text; nothing loads, no form or link appears."""
    import json

    from playwright.sync_api import expect

    from benchmarks.common import GrammarScriptEngine
    from conftest import loaded_model
    from corgi import prompts
    from corgi.config import load_config
    from corgi.formats import MAX_EXPLANATION_CHARS as EXPLANATION, MAX_STRING_CHARS as STRING
    from server import UI_CONFIG, InProcessServer, config_for
    path = tmp_path / "app.yaml"
    path.write_text(config_for(UI_CONFIG.replace("reasoning_max_new_tokens: 96", "reasoning_max_new_tokens: 400")
                               .replace("synthesis_max_new_tokens: 64", "synthesis_max_new_tokens: 300"),
                               "tiny-qwen2.5-vl"))
    config = load_config(str(path))
    engine = GrammarScriptEngine(loaded_model("tiny-qwen2.5-vl"), config)
    server = InProcessServer(engine, config)
    leak = f"{server.url}/leak"
    payload = (f"![x]({leak}?secret=1) <img src={leak}/i> <form action={leak}/f><input type=password></form> "
               f"[login]({leak}/a) <script>fetch('{leak}/j')</script>")
    requests: list[str] = []
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(server.url)
        upload(page, ASSETS / "street-scene.png")
        expect(page.locator("#chat").get_by_text("encoded and ready")).to_be_visible()
        steps = [{"statement": payload[:STRING], "kind": "reasoning", "bbox_2d": None}]
        engine.texts = {
            "reasoning": prompts.THINK_OPEN + "x" + prompts.THINK_CLOSE + "\n" + json.dumps({"steps": steps}),
            "synthesis": json.dumps({"answer": payload[:STRING], "explanation": payload[:EXPLANATION],
                                     "key_evidence": [{"description": payload[:STRING], "bbox_2d": None}]}),
        }
        ask(page, "What does the sign say?")
        wait_for(lambda: (row := timeline_row(page, "turn 1")) and "from the cache" in row)
        chat = page.locator("#chat")
        expect(chat).to_contain_text("secret=1")                      # the text is shown, as text
        for selector in ("#chat form", "#chat input[type=password]", f"#chat a[href^='{leak}']",
                         f"#chat img[src^='{leak}']", "#chat script", "#picked a", "#picked img"):
            assert page.locator(selector).count() == 0, selector
        assert not [u for u in requests if "/leak" in u], requests
        page.screenshot(path=str(REPO / "tests" / "artifacts" / "hostile-text-1280x800.png"))
        page.close()
    finally:
        server.stop()
