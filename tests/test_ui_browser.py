"""The web UI in a real browser: Debian's chromium driven by Playwright (never `playwright install`:
there is no browser download here). Uploads an image, asks, watches the phases stream in, checks
the answer, the boxes panel and the timings, asks a follow-up, saves test-artifacts/ui.png.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_ui_client import ASSETS, REPO, start_server, stop_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000     # generous: a 2-core machine running the model, the server and the browser

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-browser")
    url, proc = start_server(folder)
    yield SimpleNamespace(url=url, log=folder / "server.log")
    stop_server(proc)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def timings_column(page, header: str) -> dict[str, str]:
    table = page.locator("#timings")
    headers = table.get_by_role("columnheader").all_inner_texts()
    index = [h.strip() for h in headers].index(header)
    out = {}
    for row in table.get_by_role("row").all()[1:]:
        cells = [c.strip() for c in row.get_by_role("gridcell").all_inner_texts()]
        if len(cells) > index:
            out[cells[0]] = cells[index]
    return out


def ask(page, question: str) -> None:
    box = page.locator("#question textarea")
    box.fill(question)
    box.press("Enter")


def test_a_conversation_in_the_browser(server, browser):
    from playwright.sync_api import expect
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(server.url)
    chat = page.locator("#chat")

    page.locator("#image-input input[type=file]").set_input_files(str(ASSETS / "street-scene.png"))
    expect(chat.get_by_text("encoded and ready")).to_be_visible()
    expect(page.locator("#boxes img").first).to_be_visible()            # the image in the side panel
    expect(page.locator("#timings")).to_contain_text("image")

    ask(page, "What colour is the car?")
    expect(chat.get_by_text("What colour is the car?")).to_be_visible()   # echoed at once
    expect(page.locator("#question textarea")).to_have_value("")
    for title in ("Reasoning: steps and regions", "Evidence: reading the regions", "Synthesis: writing the answer"):
        expect(chat.get_by_text(title).first).to_be_visible()
    # The turn is over when its column is in the timings and the trace can be downloaded.
    expect(page.locator("#timings")).to_contain_text("turn 1")
    expect(page.locator("#trace")).to_be_enabled()
    expect(chat.locator(".pending")).to_have_count(0)
    bot = chat.get_by_test_id("bot")
    assert bot.count() >= 5      # image note, three phases, the answer
    assert bot.last.inner_text().strip()
    expect(page.locator("#boxes img").first).to_have_attribute("src", re.compile(r"\S"))

    ask(page, "Describe the house.")
    expect(chat.get_by_text("Describe the house.")).to_be_visible()
    expect(page.locator("#timings")).to_contain_text("turn 2")
    expect(page.locator("#trace")).to_be_enabled()
    turn2 = timings_column(page, "turn 2")
    assert turn2["vision misses"] == "0", turn2
    assert int(turn2["prefix reused"]) > 0, turn2

    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "ui.png"), full_page=True)

    # Debugging is one click away: the exact prompts and raw outputs of each turn.
    page.get_by_text("Debug: prompts, raw output and parsed result per turn").click()
    expect(page.get_by_text("######## turn 2: Describe the house.")).to_be_visible()

    # Closing the tab frees its session at once (demo.unload), not only after the idle time-out.
    page.close()
    deadline = time.monotonic() + 30
    while "a tab was closed: its session is freed" not in server.log.read_text():
        assert time.monotonic() < deadline, "closing the tab did not free its session"
        time.sleep(0.2)
