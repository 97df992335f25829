"""The CLI contract (issue 2): JSON shape, follow-ups, and bad input -> exit 2, one line, no traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import FAST, ROOT

IMAGE = str(ROOT / "assets" / "street-scene.png")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "corgi", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fast_config_file(tmp_path_factory):
    import yaml
    data = {}
    for dotted, value in FAST.items():
        section, key = dotted.split(".")
        data.setdefault(section, {})[key] = value
    path = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


TWO_TURNS = ("--image", IMAGE, "--question", "What does the sign say?", "--followup", "And the car?")
_two_turn_runs: dict = {}


def two_turn_run(model: str, config_file: str, *extra: str):
    """One CLI process per (model, flags) for the whole module: the warm run is shared by the
    contract test and the --no-cache comparison."""
    key = (model, extra)
    if key not in _two_turn_runs:
        _two_turn_runs[key] = cli(*TWO_TURNS, "--config", config_file, "--model", model, "--json", *extra)
    return _two_turn_runs[key]


# One twin per code path of the loader and the engine: dense M-RoPE, the hybrid stack, MoE. Every
# family's twin runs two turns in-process (test_cache_equality.py) and a served UI turn
# (test_ui_client.py); a CLI process per family cost ~60 s of the suite's 10 minutes.
CLI_TWINS = ["tiny-qwen2.5-vl", "tiny-qwen3.5", "tiny-qwen3-vl-moe"]
# The MoE twin's run also takes a second --image (one multi-view first turn), --plain-answer and
# --verbose (test_two_images_plain_answer_and_live_output): one CLI process for both tests, as a
# process start (imports, model load) costs ~8 s of a core. tiny-qwen2.5-vl's plain run stays
# the one that --no-cache is compared with.
MULTI_VIEW = ("--image", str(ROOT / "assets" / "receipt.png"), "--plain-answer", "--verbose")
RUN_FLAGS = {"tiny-qwen3-vl-moe": MULTI_VIEW}


@pytest.mark.parametrize("model", CLI_TWINS)
def test_json_output_with_followup(model, fast_config_file):
    proc = two_turn_run(model, fast_config_file, *RUN_FLAGS.get(model, ()))
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)                      # exactly one JSON object on stdout
    assert payload["model"]["id"] == model
    assert payload["model"]["family"] == model.removeprefix("tiny-")
    assert payload["model"]["device"] == "cpu" and payload["model"]["dtype"] == "float32"
    assert [t["question"] for t in payload["turns"]] == ["What does the sign say?", "And the car?"]
    for turn in payload["turns"]:
        assert set(turn) >= {"question", "answer", "explanation", "steps", "evidence", "key_evidence",
                             "timings", "raw", "cache"}
        assert set(turn["timings"]) >= {"reasoning", "evidence", "synthesis", "total"}
        assert set(turn["raw"]) >= {"reasoning", "synthesis"}
        assert 1 <= len(turn["steps"]) <= FAST["pipeline.max_steps"]
        for step in turn["steps"]:
            assert step["kind"] in ("object", "text", "reasoning")
            if step["bbox"] is not None:
                x1, y1, x2, y2 = step["bbox"]
                assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        grounded = [s["index"] for s in turn["steps"] if s["bbox"] is not None]
        assert [e["step_index"] for e in turn["evidence"]] == grounded[:FAST["pipeline.max_regions"]]
        assert len(turn["key_evidence"]) <= 3
    follow_up = payload["turns"][1]["cache"]
    assert follow_up["vision_misses"] == 0 and follow_up["prefix_tokens_reused"] > 0


def test_no_cache_flag_gives_the_same_answers(fast_config_file):
    warm = two_turn_run("tiny-qwen2.5-vl", fast_config_file)
    cold = two_turn_run("tiny-qwen2.5-vl", fast_config_file, "--no-cache")
    assert warm.returncode == 0 and cold.returncode == 0, warm.stderr + cold.stderr
    warm_turns, cold_turns = json.loads(warm.stdout)["turns"], json.loads(cold.stdout)["turns"]
    assert [t["raw"] for t in warm_turns] == [t["raw"] for t in cold_turns]
    assert cold_turns[1]["cache"]["vision_misses"] == 2


def test_two_images_plain_answer_and_live_output(fast_config_file):
    """Two --image (one multi-view first turn), --plain-answer, and --json --verbose: one JSON
    object on stdout, the phases streamed live on stderr (the same printer writes to stdout
    without --json). One process for the three flags, shared with the MoE twin's contract test:
    each CLI start costs seconds."""
    proc = two_turn_run("tiny-qwen3-vl-moe", fast_config_file, *MULTI_VIEW)
    assert proc.returncode == 0, proc.stderr
    turns = json.loads(proc.stdout)["turns"]
    assert [t["images"] for t in turns] == [[0, 1], [0, 1]]
    for turn in turns:
        assert isinstance(turn["plain_answer"], str) and "plain" in turn["timings"] and "plain" in turn["raw"]
        for box in [*turn["steps"], *turn["evidence"], *turn["key_evidence"]]:
            assert "image" in box
            assert box["image"] in (0, 1) if box["bbox"] is not None else box["image"] is None
    for marker in ("== plain ==", "== reasoning ==", "== evidence ==", "== synthesis ==", "Answer:"):
        assert marker in proc.stderr
    _bad(cli("--image", IMAGE, "--image", str(ROOT / "no-such.png"), "--question", "q"), "image")


def _bad(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0].lower(), lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    text_as_jpg = tmp_path / "photo.jpg"
    text_as_jpg.write_text("this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("pipeline:\n  max_stepz: 3\n")
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("pipeline:\n  max_steps: many\n")
    _bad(cli("--image", str(tmp_path / "missing.png"), "--question", "q"), "no image file")
    _bad(cli("--image", str(text_as_jpg), "--question", "q"), "image")
    _bad(cli("--image", str(empty), "--question", "q"), "image")
    _bad(cli("--image", IMAGE, "--question", "   "), "empty")
    _bad(cli("--image", IMAGE, "--question", "q", "--followup", ""), "empty")
    _bad(cli("--image", IMAGE, "--question", "q", "--config", str(bad_yaml)), "yaml")
    _bad(cli("--image", IMAGE, "--question", "q", "--config", str(unknown_key)), "max_stepz")
    _bad(cli("--image", IMAGE, "--question", "q", "--config", str(wrong_type)), "max_steps")
    _bad(cli("--image", IMAGE, "--question", "q", "--config", str(tmp_path / "nope.yaml")), "not found")


def test_unknown_model_exits_2(tmp_path):
    _bad(cli("--image", IMAGE, "--question", "q", "--model", str(tmp_path / "no-such-model")), "model")
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    _bad(cli("--image", IMAGE, "--question", "q", "--model", str(not_a_model)), "model")
