"""The openai backend against a real OpenAI-compatible server that runs here: `transformers serve`
(transformers 5.23) serving the tiny Qwen2.5-VL twin on the CPU, started once for the module
(tests/twin_server.py says why through a small launcher). It ignores `response_format`, so the
fallback to the tolerant parser is what runs. The CLI's two-turn contract, the region captions
as concurrent requests, Stop, a server that goes away and comes back, one UI turn through
gradio_client, and the errors a user can make (unreachable server, wrong model, unknown family,
time-out, a key the server refuses, a server whose model takes no images): one line each, and the
conversation keeps working once the cause is fixed. The key is checked by a small reverse proxy
in this process in front of the twin's server; the server without vision is a second, plain
`transformers serve` of a tiny text-only checkpoint built here."""
from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from PIL import Image

from conftest import ROOT
from server import ASSETS, free_port, texts

IMAGE = str(ROOT / "assets" / "street-scene.png")
START_TIMEOUT_S = 120.0
SETTINGS = """\
image: {min_pixels: 3136, max_pixels: 50176}
pipeline: {max_steps: 3, max_regions: 3, reasoning_max_new_tokens: 32, evidence_max_new_tokens: 6,
           synthesis_max_new_tokens: 24, max_thinking_chars: 40}
ui: {remote_concurrency: 3}
"""
FALLBACK = "not the JSON its schema asks for"
KEY = "sk-corgi-test"           # the key the proxy wants


@contextlib.contextmanager
def serving(command: list[str], port: int, log_path):
    """A server process on `port`, up once its /health answers; ended (terminate, then kill) after."""
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            assert proc.poll() is None, open(log_path).read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{command[:4]} did not start"
            time.sleep(0.25)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def twin_server(tmp_path_factory):
    """(base_url, served model name): `transformers serve` pinned to the twin's folder."""
    from corgi.engine.tiny import ensure_tiny_checkpoint
    from twin_server import serve_folder
    folder = serve_folder(ensure_tiny_checkpoint("tiny-qwen2.5-vl"), tmp_path_factory.mktemp("served") / "twin")
    port = free_port()
    with serving([sys.executable, str(ROOT / "tests" / "twin_server.py"), str(folder), "--device", "cpu",
                  "--host", "127.0.0.1", "--port", str(port)], port, folder.parent / "serve.log"):
        yield f"http://127.0.0.1:{port}/v1", str(folder)


class KeyChecker(http.server.BaseHTTPRequestHandler):
    """An API gateway's key check: a request without `Authorization: Bearer KEY` gets OpenAI's
    401 answer; any other goes on to the server, whose answer comes back chunk by chunk (so a
    streamed reply still streams). HTTP/1.0: the answer ends when the connection closes."""

    def do_GET(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self._refuse()
            return
        import httpx
        headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
        try:
            with httpx.stream(self.command, self.server.upstream + self.path, headers=headers, content=body,
                              timeout=60) as answer:
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
                self.end_headers()
                for chunk in answer.iter_bytes():
                    self.wfile.write(chunk)
                    self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass                       # the client went away (Stop)

    do_POST = do_GET

    def _refuse(self):
        error = json.dumps({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                      "param": None, "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(error)))
        self.end_headers()
        self.wfile.write(error)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def keyed_server(twin_server):
    """(base_url, served model name): the twin's server behind KeyChecker, in a thread here."""
    base_url, model = twin_server
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeyChecker)
    proxy.daemon_threads = True
    proxy.upstream = base_url.removesuffix("/v1")
    thread = threading.Thread(target=proxy.serve_forever, name="key-checker", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}/v1", model
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)


def text_only_checkpoint(folder):
    """A tiny random-weight Qwen2ForCausalLM (no vision) with the twin's real Qwen tokenizer and
    chat template: `transformers serve` loads it as an LLM, its processor a plain tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from corgi.engine.tiny import ensure_tiny_checkpoint
    twin = ensure_tiny_checkpoint("tiny-qwen2.5-vl")
    folder.mkdir(parents=True)
    # Copies, not links: save_pretrained below writes generation_config.json, and through a link
    # it overwrote the shared twin's (its eos list became one id for every later test).
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copyfile(twin / name, folder / name)
    config = Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_only_server(tmp_path_factory):
    """(base_url, served model name): plain `transformers serve` of the text-only checkpoint (no
    video processor to stand in for: the launcher is not needed)."""
    folder = text_only_checkpoint(tmp_path_factory.mktemp("text-only") / "model")
    port = free_port()
    with serving([sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--device", "cpu",
                  "--host", "127.0.0.1", "--port", str(port)], port, folder.parent / "serve.log"):
        yield f"http://127.0.0.1:{port}/v1", str(folder)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "remote.yaml"
    path.write_text(SETTINGS)
    return str(path)


def remote_config(base_url: str, model: str, **overrides):
    import yaml
    from corgi.config import from_dict
    data = yaml.safe_load(SETTINGS)
    data["model"] = {"backend": "openai", "base_url": base_url, "id": model, "family": "qwen2.5-vl", **overrides}
    return from_dict(data)


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "corgi", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_two_turns_through_the_server(twin_server, config_file):
    base_url, model = twin_server
    proc = cli("--image", IMAGE, "--question", "What does the sign say?", "--followup", "And the car?",
               "--config", config_file, "--backend", "openai", "--base-url", base_url, "--model", model,
               "--family", "qwen2.5-vl", "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)                      # exactly one JSON object on stdout
    assert payload["model"] == {"id": model, "family": "qwen2.5-vl", "dtype": "server", "device": base_url,
                                "backend": "openai", "server": base_url}
    assert [t["question"] for t in payload["turns"]] == ["What does the sign say?", "And the car?"]
    for turn in payload["turns"]:
        assert set(turn) >= {"question", "answer", "explanation", "steps", "evidence", "key_evidence",
                             "timings", "raw", "cache", "timeline", "warnings"}
        assert set(turn["timings"]) >= {"reasoning", "evidence", "synthesis", "total"}
        assert turn["raw"]["reasoning"] and turn["raw"]["synthesis"]      # the server's streamed text
        assert turn["answer"].strip()
        for step in turn["steps"]:
            assert step["kind"] in ("object", "text", "reasoning")
        grounded = [s["index"] for s in turn["steps"] if s["bbox"] is not None]
        assert [e["step_index"] for e in turn["evidence"]] == grounded[:3]
        assert len(turn["key_evidence"]) <= 3
        # transformers serve ignores response_format: detected, and the tolerant parser read it.
        assert sum(FALLBACK in w for w in turn["warnings"]) == 2, turn["warnings"]
        # Timings and token counts from the server's usage fields; the phases tile the turn.
        parts = {(s["phase"], s["part"]) for s in turn["timeline"]}
        assert {("reasoning", "prefill"), ("reasoning", "decode"), ("synthesis", "decode")} <= parts
        assert turn["cache"]["prompt_tokens"] > 0 and turn["cache"]["decode_output_tokens"] > 0
        assert turn["cache"]["vision_misses"] == 0        # no image work here: it is the server's
    first, second = (t["cache"]["prompt_tokens"] for t in payload["turns"])
    assert second > first          # the follow-up carries the whole conversation


def test_region_captions_are_concurrent_requests(twin_server):
    from corgi.pipeline import TurnClock
    from corgi.remote import RemoteBackend
    from corgi.types import CacheStats, Phase, RegionDone, Sampling, SpanTimed, TextDelta
    backend = RemoteBackend(remote_config(*twin_server))
    image = Image.open(IMAGE).convert("RGB")
    crops = [image.crop((0, 0, 120, 90)), image.crop((50, 40, 200, 160)), image.crop((10, 10, 60, 200))]
    stats, clock = CacheStats(), TurnClock(backend)
    events = list(backend.captions(crops, ["Describe it.", "Read it.", "Describe it."], 6, 200_000, Sampling(),
                                   stats, clock))
    done = [e for e in events if isinstance(e, RegionDone)]
    assert sorted(e.region for e in done) == [0, 1, 2]
    for e in done:
        assert e.text == "".join(d.text for d in events if isinstance(d, TextDelta) and d.region == e.region)
        assert e.text
    spans = [e.span.part for e in events if isinstance(e, SpanTimed)]
    assert spans[0] == "prefill" and sorted(spans[1:]) == ["region 1", "region 2", "region 3"]
    assert all(e.span.phase == Phase.EVIDENCE for e in events if isinstance(e, SpanTimed))
    assert stats.prompt_tokens > 0 and stats.decode_output_tokens == 3 * 6


def test_stop_and_a_server_that_comes_back_keep_the_conversation(twin_server):
    from corgi.pipeline import ChatSession
    from corgi.remote import RemoteBackend, RemoteError
    from corgi.types import TextDelta, TurnFinished
    base_url, model = twin_server
    backend = RemoteBackend(remote_config(base_url, model))
    session = ChatSession(backend, Image.open(IMAGE))
    head = list(session.conv.messages)
    events = session.ask("What is here?")
    for event in events:
        if isinstance(event, TextDelta):
            break
    events.close()                                       # Stop, mid-reply
    assert session.conv.messages == head and not session.turns
    # The server "goes away": the same session on a closed port.
    live = backend.client
    backend.client = live.with_options(base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(RemoteError, match="cannot reach the model server"):
        list(session.ask("What is here?"))
    assert session.conv.messages == head
    backend.client = live                                 # ... and comes back
    finished = [e for e in session.ask("What is here?") if isinstance(e, TurnFinished)]
    assert len(finished) == 1 and len(session.conv.messages) == len(head) + 4   # two phases: question + reply each
    assert session.conv.messages[-1]["role"] == "assistant"
    session.undo_last_turn()                              # Regenerate drops the turn's messages
    assert session.conv.messages == head


def test_one_ui_turn_through_gradio_client(twin_server):
    from gradio_client import handle_file
    from corgi.remote import RemoteBackend
    from server import InProcessServer
    config = remote_config(*twin_server)
    server = InProcessServer(RemoteBackend(config), config)
    try:
        # Several users at once: the model queue's limit is ui.remote_concurrency, not 1.
        limits = {fn.concurrency_limit for fn in server.demo.fns.values() if fn.concurrency_id == "model"}
        assert limits == {3}
        page = urllib.request.urlopen(server.url, timeout=10).read().decode()
        assert f"(qwen2.5-vl) on the openai server {config.model.base_url}" in page
        client = server.client()
        out = client.predict([handle_file(str(ASSETS / "street-scene.png"))], api_name="/set_image")
        assert any("street-scene.png" in t for t in texts(out[0]))
        job = client.submit({"text": "What colour is the car?", "files": []}, api_name="/ask")
        updates = list(job)
        chat = job.outputs()[-1][0]
        assert len(updates) >= 3
        assert "What colour is the car?" in texts(chat)
        titles = [(m["metadata"]["title"], m["metadata"]["status"]) for m in chat if m.get("metadata")]
        assert [t for t, _ in titles][:3] == ["Reasoning: steps and regions", "Evidence: reading the regions",
                                             "Synthesis: writing the answer"]
        assert all(status == "done" for _, status in titles)
        answer = [m for m in chat if m["role"] == "assistant" and not m.get("metadata")]
        assert answer and answer[-1]["content"][0]["text"].strip()
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["unreachable", "wrong model", "unknown family", "time-out"])
def test_bad_server_settings_are_one_line_and_exit_2(case, twin_server, config_file, tmp_path, capsys):
    """The CLI's own entry point in this process (the launch itself is test_cli_two_turns...)."""
    from corgi.__main__ import main
    base_url, model = twin_server
    args = {"unreachable": ("--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", model,
                            "--family", "qwen2.5-vl"),
            "wrong model": ("--base-url", base_url, "--model", "Qwen/Qwen2.5-VL-7B-Instruct"),
            "unknown family": ("--base-url", base_url, "--model", "some-llm"),
            "time-out": ("--base-url", base_url, "--model", model, "--family", "qwen2.5-vl")}[case]
    config = config_file
    if case == "time-out":
        config = tmp_path / "slow.yaml"
        config.write_text(SETTINGS + "model: {timeout_s: 0.001}\n")
    code = main(["run", "--image", IMAGE, "--question", "hi", "--config", str(config), "--backend", "openai", *args])
    out = capsys.readouterr()
    assert code == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and out.out == "", out.err
    expected = {"unreachable": "cannot reach the model server", "wrong model": "Server is pinned to",
                "unknown family": "set model.family", "time-out": "did not answer within 0.001 s"}[case]
    assert lines[0].startswith("error: ") and expected in lines[0]


def run_main(*args) -> int:
    from corgi.__main__ import main
    return main(["run", "--image", IMAGE, "--question", "hi", "--backend", "openai", *args])


def one_error_line(out) -> str:
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and out.out == "", out.err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def test_a_refused_key_is_one_line_and_exit_2_until_it_is_set(keyed_server, config_file, monkeypatch, capsys):
    base_url, model = keyed_server
    env = remote_config(base_url, model).model.api_key_env          # the config's default name
    args = ("--config", config_file, "--base-url", base_url, "--model", model, "--family", "qwen2.5-vl", "--json")
    for key in (None, "sk-wrong"):
        if key is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, key)
        code = run_main(*args)
        out = capsys.readouterr()
        assert code == 2, out.err
        line = one_error_line(out)
        assert "refused the API key (HTTP 401)" in line and f"${env}" in line
    monkeypatch.setenv(env, KEY)
    code = run_main(*args)
    out = capsys.readouterr()
    assert code == 0, out.err
    turns = json.loads(out.out)["turns"]
    assert len(turns) == 1 and turns[0]["answer"].strip()


def test_a_refused_key_keeps_the_conversation_until_it_is_fixed(keyed_server, monkeypatch):
    from corgi.pipeline import ChatSession
    from corgi.remote import RemoteBackend, RemoteError
    from corgi.types import TurnFinished
    config = remote_config(*keyed_server)
    monkeypatch.setenv(config.model.api_key_env, "sk-wrong")
    backend = RemoteBackend(config)
    session = ChatSession(backend, Image.open(IMAGE))
    head = list(session.conv.messages)
    with pytest.raises(RemoteError, match=r"refused the API key \(HTTP 401\); set \$OPENAI_API_KEY"):
        list(session.ask("What is here?"))
    assert session.conv.messages == head and not session.turns
    backend.client = backend.client.with_options(api_key=KEY)      # the key fixed
    finished = [e for e in session.ask("What is here?") if isinstance(e, TurnFinished)]
    assert len(finished) == 1 and len(session.conv.messages) == len(head) + 4


def test_a_server_without_vision_is_one_line_and_exit_2(text_only_server, config_file, capsys):
    """transformers serve answers a text-only model's request with an image HTTP 200, the image
    dropped: check() tells by the prompt's length."""
    base_url, model = text_only_server
    code = run_main("--config", config_file, "--base-url", base_url, "--model", model, "--family", "qwen2.5-vl")
    out = capsys.readouterr()
    assert code == 2, out.err
    line = one_error_line(out)
    assert f"the model {model!r} at {base_url} does not take images" in line and "serve a vision model" in line


def test_a_server_without_vision_fails_the_turn_and_keeps_the_conversation(text_only_server):
    """Without check(): the first reply with images asks the same question first."""
    from corgi.pipeline import ChatSession
    from corgi.remote import RemoteBackend, RemoteError
    session = ChatSession(RemoteBackend(remote_config(*text_only_server)), Image.open(IMAGE))
    head = list(session.conv.messages)
    with pytest.raises(RemoteError, match="does not take images"):
        list(session.ask("What is here?"))
    assert session.conv.messages == head and not session.turns and not session.pending


def test_smart_resize_is_the_processors_and_the_family_follows_the_name():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs
    from corgi.remote import family_for, smart_resize
    for height, width in ((480, 640), (17, 900), (3000, 4000), (28, 28), (1001, 333)):
        assert smart_resize(height, width, 28, 3136, 50176) == theirs(height, width, 28, 3136, 50176)
    assert family_for("auto", "Qwen/Qwen2.5-VL-7B-Instruct").name == "qwen2.5-vl"
    assert family_for("auto", "Qwen/Qwen3-VL-30B-A3B-Instruct").name == "qwen3-vl"
    assert family_for("auto", "qwen3.5-9b").name == "qwen3.5"
    assert family_for("qwen3-vl", "my-model").name == "qwen3-vl"


def test_json_schemas_say_what_the_grammar_allows():
    """The response_format schemas: the step and item shapes of formats.py, a box range per image."""
    from corgi.boxes import REL1000, pixel_convention
    from corgi.json_schemas import reasoning_schema, synthesis_schema
    one = reasoning_schema(3, pixel_convention(448, 336))
    steps = one["properties"]["steps"]
    assert steps["maxItems"] == 3 and steps["minItems"] == 1
    grounded, reasoning = steps["items"]["anyOf"]
    assert list(grounded["properties"]) == ["statement", "kind", "bbox_2d"]
    assert [p["maximum"] for p in grounded["properties"]["bbox_2d"]["prefixItems"]] == [448, 336, 448, 336]
    assert reasoning["properties"]["bbox_2d"] == {"type": "null"}
    two = synthesis_schema(REL1000, ((1, REL1000), (2, pixel_convention(56, 28))))
    items = two["properties"]["key_evidence"]["items"]["anyOf"]
    assert [i["properties"].get("image") for i in items] == [{"const": 1}, {"const": 2}, None]
    assert items[1]["properties"]["bbox_2d"]["prefixItems"][0]["maximum"] == 56
    assert two["properties"]["key_evidence"]["maxItems"] == 3
    assert two["required"] == ["answer", "explanation", "key_evidence"]
