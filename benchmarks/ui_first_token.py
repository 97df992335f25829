"""Time to the first token of a turn: in the browser (from Enter to the first reasoning text
on screen) against the same turn in the CLI, on a big phone photo, side by side in one run.

    .venv/bin/python -m benchmarks.ui_first_token                 # tiny-qwen2.5-vl, 4000x3000 JPEG
    .venv/bin/python -m benchmarks.ui_first_token --model small-qwen2.5-vl --repeats 5

Three readings per repeat: the CLI's first token (`python -m corgi run --json`: the turn's first
prefill span ends, counted from the turn's start; the image is encoded in that prefill), the
browser's (Enter -> first reasoning text in the chat, measured in the page with performance.now;
the image was encoded at upload) and the server's own for that browser turn (its trace). The
browser minus the server is what the UI adds (queue, rendering, transport). Needs chromium.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import common

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is in the photo?"
# Armed before Enter is pressed: resolves with the ms from the keypress to the first reasoning text.
ARM_JS = """() => { window.__firstText = new Promise(resolve => {
  const chat = document.querySelector('#chat');
  const box = document.querySelector('#question textarea');
  let t0 = null;
  box.addEventListener('keydown', e => { if (e.key === 'Enter' && t0 === null) t0 = performance.now(); }, true);
  const seen = () => [...chat.querySelectorAll('[data-testid=bot]')].some(
      m => m.innerText.includes('Reasoning') && /[{\\[]|S1/.test(m.innerText));
  const obs = new MutationObserver(() => {
    if (t0 !== null && seen()) { obs.disconnect(); resolve(performance.now() - t0); } });
  obs.observe(chat, {subtree: true, childList: true, characterData: true});
}); }"""


def phone_photo(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), np.ones((10, 10, 1), np.uint8))
    noisy = np.clip(base.astype(np.int16) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    path = folder / "phone-photo.jpg"
    Image.fromarray(noisy).save(path, quality=85)
    return path


def first_token_s(turn: dict) -> float:
    prefill = next(s for s in turn["timeline"] if s["part"] == "prefill")
    return prefill["start"] + prefill["seconds"]


def cli_first_token(model: str, photo: Path) -> float:
    proc = subprocess.run([sys.executable, "-m", "corgi", "run", "--model", model, "--image", str(photo),
                           "--question", QUESTION, "--json"], capture_output=True, text=True, cwd=REPO, check=True)
    return first_token_s(json.loads(proc.stdout)["turns"][0])


def browser_first_token(url: str, photo: Path) -> tuple[float, float]:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--headless"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_test_id("Upload image(s)-upload-button").set_input_files(str(photo))
        page.locator("#chat").get_by_text("encoded and ready").wait_for()
        page.locator("#question textarea").fill(QUESTION)
        page.evaluate(ARM_JS)
        page.locator("#question textarea").press("Enter")
        seen_ms = page.evaluate("() => window.__firstText")
        page.locator("#trace").wait_for(state="visible")
        page.wait_for_function("() => !document.querySelector('#trace').disabled")
        with page.expect_download() as download:
            page.locator("#trace").click()
        trace = json.loads(Path(download.value.path()).read_text())
        browser.close()
    return seen_ms / 1000, first_token_s(trace["turns"][-1])


def main() -> None:
    args = common.ui_args(__doc__, "ui_first_token", "repeats", 3)
    sys.path.insert(0, str(REPO / "tests"))
    from server import UI_CONFIG, serve          # the tests' launcher: a real `python -m chatbot`
    folder = Path(tempfile.mkdtemp(prefix="corgi-ftt-"))
    photo = phone_photo(folder)
    server = serve(folder / "server", UI_CONFIG.replace("max_upload_mb: 8", "max_upload_mb: 16"), model=args.model)
    rows = []
    try:
        for r in range(args.repeats):       # interleaved: CLI then browser, every repeat
            cli = cli_first_token(args.model, photo)
            seen, served = browser_first_token(server.url, photo)
            rows.append({"repeat": r, "cli_s": round(cli, 3), "browser_s": round(seen, 3),
                         "server_s": round(served, 3), "browser_minus_cli_s": round(seen - cli, 3),
                         "ui_overhead_s": round(seen - served, 3)})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    summary = {k: common.median([row[k] for row in rows]) for k in rows[0] if k != "repeat"}
    print(common.table(rows, list(rows[0])))
    print("median:", summary)
    common.write_json(args.out, {"model": args.model, "photo": "4000x3000 JPEG", "rows": rows, "median": summary,
                                 "environment": common.environment()})


if __name__ == "__main__":
    main()
