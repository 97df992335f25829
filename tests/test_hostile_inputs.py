"""Hostile inputs (hardening, part 1): every case of tests/hostile/cases.yaml, through the CLI and
through the UI, ends in a finished answer or in one clear error, and the process keeps serving.

  * CLI: `python -m corgi run` as main(argv) in this process (a subprocess per case would cost a
    torch import each; test_cli.py covers the real process and its exit codes). Errors: exit 2
    and exactly one line `error: ...` on stderr, no traceback.
  * UI: a launched app driven through gradio_client, one browser session for the whole corpus:
    the image cases go through /set_image (the upload path of the image panel), the question
    cases through /ask; errors appear in the chat as one message.
  * Configs: the CLI and the UI launcher (`python -m chatbot --config`, its main() here) both
    exit 2 with one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from server import texts

REPO = Path(__file__).resolve().parent.parent
HOSTILE = REPO / "tests" / "hostile"
CASES = yaml.safe_load((HOSTILE / "cases.yaml").read_text(encoding="utf-8"))
IMAGE_CASES = CASES["images"]["cases"]
QUESTION_CASES = CASES["questions"]["cases"]
CONFIG_CASES = CASES["configs"]["cases"]
IMAGE_QUESTION = CASES["images"]["question"]
QUESTION_IMAGE = REPO / "assets" / CASES["questions"]["image"]

# Small token budgets: a turn in a fraction of a second.
FAST_CONFIG = """\
model: {id: tiny-qwen2.5-vl}
image: {min_pixels: 3136, max_pixels: 50176}
pipeline: {max_steps: 3, max_regions: 3, reasoning_max_new_tokens: 64, evidence_max_new_tokens: 6,
           synthesis_max_new_tokens: 48, max_thinking_chars: 30}
ui: {max_upload_mb: 0.1, idle_timeout_s: 600}
"""
CHAT, TIMINGS, DEBUG_JSON, TRACE = 0, 3, 5, 6


def question_text(case: dict) -> str:
    text = case["text"]
    if "repeat_to" in case:
        text = (text * (case["repeat_to"] // len(text) + 1))[:case["repeat_to"]]
    return text


def image_file(case: dict) -> Path:
    return HOSTILE / "images" / case["file"]


def test_the_corpus_is_committed_small_and_complete():
    names = {p.name for p in (HOSTILE / "images").iterdir()}
    assert names == {c["file"] for c in IMAGE_CASES}, "every file has a case and every case a file"
    for path in [*(HOSTILE / "images").iterdir(), *(HOSTILE / "configs").iterdir()]:
        assert path.stat().st_size <= 8 * 1024, f"{path.name} is not small"
    configs = {p.name for p in (HOSTILE / "configs").iterdir()}
    assert configs == {c["file"] for c in CONFIG_CASES} - {"does-not-exist.yaml"}
    assert (HOSTILE / "images" / "bomb.png").stat().st_size < 100     # declares 10^10 pixels
    for case in [*IMAGE_CASES, *QUESTION_CASES, *CONFIG_CASES]:
        assert case["outcome"] in ("answer", "error") and ("error" in case) == (case["outcome"] == "error")
    assert len(question_text(QUESTION_CASES[0])) == 100_000


# ---- the CLI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fast_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile-cli") / "fast.yaml"
    path.write_text(FAST_CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def loaded_once():
    """The corpus cases' CLI runs load the model once: every case runs the same FAST_CONFIG, and
    a load (tokenizer, weights, grammar tables) cost about 1.5 s of each ~2 s case. Engine.load
    still runs per case and builds its engine (and everything a run checks) on the real model,
    loaded by the real load_model on the first case; test_cli.py loads it in a real process."""
    from corgi.engine import engine
    real, models = engine.load_model, {}

    def load_model(model_cfg, image_cfg):
        key = (repr(model_cfg), repr(image_cfg))
        if key not in models:
            models[key] = real(model_cfg, image_cfg)
        return models[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "load_model", load_model)
        yield models


def cli(capsys, *args) -> tuple[int, str, str]:
    from corgi.__main__ import main
    capsys.readouterr()
    code = main(["run", *args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, err: str) -> str:
    """The one line a failed CLI run prints: exit 2, `error: ...`, no traceback."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def check_answer(turn: dict, question: str) -> None:
    """A finished, structured turn: the question recorded, steps parsed from the model's JSON
    (the grammar holds the format whatever the question says), an answer field."""
    assert turn["question"] == question
    assert 1 <= len(turn["steps"]) <= 3
    assert isinstance(turn["answer"], str) and set(turn["raw"]) >= {"reasoning", "synthesis"}
    assert not any("could be read" in w for w in turn.get("warnings", [])), turn["warnings"]
    json.loads(turn["raw"]["synthesis"])                         # the answer phase is valid JSON


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c["file"] for c in IMAGE_CASES])
def test_cli_images(case, capsys, fast_config, loaded_once):
    code, out, err = cli(capsys, "--image", str(image_file(case)), "--question", IMAGE_QUESTION,
                         "--config", fast_config, "--json")
    if case["outcome"] == "error":
        assert case["error"].lower() in error_line(code, err).lower()
        assert out == ""
    else:
        assert code == 0, err
        (turn,) = json.loads(out)["turns"]
        check_answer(turn, IMAGE_QUESTION)


@pytest.mark.parametrize("case", QUESTION_CASES, ids=[c["id"] for c in QUESTION_CASES])
def test_cli_questions(case, capsys, fast_config, loaded_once):
    question = question_text(case)
    code, out, err = cli(capsys, "--image", str(QUESTION_IMAGE), "--question", question,
                         "--config", fast_config, "--json")
    if case["outcome"] == "error":
        assert case["error"].lower() in error_line(code, err).lower()
    else:
        assert code == 0, err
        (turn,) = json.loads(out)["turns"]
        check_answer(turn, case.get("cleaned", question.strip()))


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c["file"] for c in CONFIG_CASES])
def test_cli_configs(case, capsys):
    code, out, err = cli(capsys, "--image", str(QUESTION_IMAGE), "--question", "What is this?",
                         "--config", str(HOSTILE / "configs" / case["file"]))
    assert case["error"].lower() in error_line(code, err).lower()
    assert out == ""


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c["file"] for c in CONFIG_CASES])
def test_ui_launcher_refuses_bad_configs_with_one_line(case, caplog, monkeypatch):
    """`python -m chatbot --config BAD` (its main(), in this process) exits 2 with one logged
    error line, before it builds or serves anything."""
    import logging

    import chatbot.__main__ as launcher

    def must_not_serve():
        raise AssertionError("a bad config got as far as serving")
    monkeypatch.setattr(launcher, "private_gradio_folder", must_not_serve)
    caplog.set_level(logging.INFO)
    code = launcher.main(["--config", str(HOSTILE / "configs" / case["file"])])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2
    assert len(errors) == 1 and case["error"].lower() in errors[0].lower(), errors
    assert "\n" not in errors[0]


def _launcher_error(caplog, monkeypatch, argv) -> str:
    import logging

    import chatbot.__main__ as launcher
    monkeypatch.setattr(launcher, "private_gradio_folder", lambda: pytest.fail("got as far as serving"))
    caplog.clear()
    caplog.set_level(logging.INFO)
    code = launcher.main(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0], (code, errors)
    return errors[0]


def test_cli_and_launcher_special_inputs(tmp_path, capsys, caplog, monkeypatch):
    """Inputs a corpus file cannot hold (issue 13, item 9): each one line and exit 2, in seconds:
    a FIFO or /dev/zero as config (would block / read forever), an image path over PATH_MAX, a
    CORGI_CACHE that cannot be used, a relative path to a file as model id (was 29 s of hub
    retries), all before any model is loaded."""
    import os
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    image = ["--image", str(QUESTION_IMAGE), "--question", "What is this?"]
    for config in (fifo, "/dev/zero"):
        code, _, err = cli(capsys, *image, "--config", str(config))
        assert "is not a regular file" in error_line(code, err)
        assert "is not a regular file" in _launcher_error(caplog, monkeypatch, ["--config", str(config)])
    code, _, err = cli(capsys, "--image", "/" + "d/" * 3000 + "x.png", "--question", "What is this?")
    line = error_line(code, err)
    assert "File name too long" in line and len(line) < 300
    monkeypatch.chdir(REPO)
    for model in ("tests/server.py", "README.md"):
        code, _, err = cli(capsys, *image, "--model", model)
        assert f"model {model} is not a folder" in error_line(code, err)
        assert f"model {model} is not a folder" in _launcher_error(caplog, monkeypatch, ["--model", model])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CORGI_CACHE", str(blocker / "cache"))
    code, _, err = cli(capsys, *image, "--model", "tiny-qwen3-vl")
    assert "the cache" in error_line(code, err) and "(CORGI_CACHE) is inside a file" in err
    assert "(CORGI_CACHE) is inside a file" in _launcher_error(caplog, monkeypatch, ["--model", "tiny-qwen3-vl"])


# ---- the UI -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(launch):
    # Its own server: its log must show no traceback after the whole corpus.
    server = launch(FAST_CONFIG, shared=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    client = server.client()     # one browser session for the whole corpus
    yield client
    client.close()


def last_turn(out) -> dict | None:
    turns = out[DEBUG_JSON] or {}
    return turns[list(turns)[-1]] if turns else None


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c["file"] for c in IMAGE_CASES])
def test_ui_images(case, client):
    from gradio_client import handle_file
    client.predict(api_name="/new_conversation")      # each case starts a conversation (else it joins)
    out = client.predict([handle_file(str(image_file(case)))], api_name="/set_image")
    shown = texts(out[CHAT])
    if case["outcome"] == "error":
        assert case["error"].lower() in shown[-1].lower(), shown[-1]
        assert shown[-1].count("annot be used") == 1, shown[-1]         # one message, said once
        assert not any("encoded and ready" in t for t in shown)
        # The bad file changed nothing: no image (and it says so), or the images it had before.
        out = client.predict({"text": IMAGE_QUESTION, "files": []}, api_name="/ask")
        if "There is no image yet" not in texts(out[CHAT])[-1]:
            trace = json.loads(Path(out[TRACE]["value"]).read_text(encoding="utf-8"))
            assert case["file"] not in trace["images"], trace["images"]
            check_answer(last_turn(out), IMAGE_QUESTION)
        return
    width, height = case["size"]
    assert f"**{case['file']}** ({width}x{height} pixels) is encoded and ready" in shown[-1], shown[-1]
    out = client.predict({"text": IMAGE_QUESTION, "files": []}, api_name="/ask")
    assert list(out[DEBUG_JSON]) == ["turn 1"], texts(out[CHAT])[-2:]
    turn = last_turn(out)
    check_answer(turn, IMAGE_QUESTION)
    answer = [m for m in out[CHAT] if m["role"] == "assistant" and not m.get("metadata")]
    from chatbot.render import escape_md            # the chat shows model text escaped
    assert answer and escape_md(turn["answer"]) in answer[-1]["content"][0]["text"]


@pytest.fixture(scope="module")
def question_session(client):
    """The question cases share one conversation on QUESTION_IMAGE, one ordinary turn in."""
    from gradio_client import handle_file
    client.predict([handle_file(str(QUESTION_IMAGE))], api_name="/set_image")
    client.predict(api_name="/new_conversation")
    out = client.predict({"text": "How many shapes are there?", "files": []}, api_name="/ask")
    assert list(out[DEBUG_JSON]) == ["turn 1"]
    return {"turns": 1}


@pytest.mark.parametrize("case", QUESTION_CASES, ids=[c["id"] for c in QUESTION_CASES])
def test_ui_questions(case, client, question_session):
    question = question_text(case)
    out = client.predict({"text": question, "files": []}, api_name="/ask")
    if case["outcome"] == "answer":
        question_session["turns"] += 1
    turns = [f"turn {n}" for n in range(1, question_session["turns"] + 1)]
    assert list(out[DEBUG_JSON]) == turns, texts(out[CHAT])[-2:]       # none added by an error, none lost
    if case["outcome"] == "error":
        assert texts(out[CHAT])[-1].startswith("This question cannot be asked: "), texts(out[CHAT])[-1]
        assert case["error"].lower() in texts(out[CHAT])[-1].lower()
        # The timings table arrives intact (the failed turn's column goes away cleanly).
        headers = out[TIMINGS]["headers"]
        assert headers[0] == "metric" and headers[-len(turns):] == turns, headers
        assert all(len(row) == len(headers) for row in out[TIMINGS]["data"])
    else:
        check_answer(last_turn(out), case.get("cleaned", question.strip()))


@pytest.mark.parametrize("name", ["bomb.png", "truncated.jpg", "text-file.jpg"])
def test_ui_images_attached_to_a_question(name, client):
    """The other way in: an image attached to the message (the textbox's clip) takes the same
    checks; the question is not asked about a picture that could not be used."""
    from gradio_client import handle_file
    case = next(c for c in IMAGE_CASES if c["file"] == name)
    client.predict(api_name="/new_conversation")
    out = client.predict({"text": IMAGE_QUESTION, "files": [handle_file(str(image_file(case)))]}, api_name="/ask")
    shown = texts(out[CHAT])
    assert case["error"].lower() in shown[-1].lower(), shown[-1]
    assert not out[DEBUG_JSON]


def test_ui_keeps_serving_after_the_corpus(client, server):
    """After every hostile case: the same session, and a new one, still get answers."""
    from gradio_client import Client, handle_file
    assert server.alive()
    for c in (client, Client(server.url, verbose=False)):
        c.predict(api_name="/new_conversation")
        out = c.predict([handle_file(str(REPO / "assets" / "street-scene.png"))], api_name="/set_image")
        assert "encoded and ready" in texts(out[CHAT])[-1]
        out = c.predict({"text": "What colour is the car?", "files": []}, api_name="/ask")
        check_answer(last_turn(out), "What colour is the car?")
    log = server.log_text()
    assert "Traceback" not in log, log[-3000:]      # every hostile case was handled, none crashed
