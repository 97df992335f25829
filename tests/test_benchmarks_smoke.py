"""The benchmarks run end to end in smoke mode (tiny model, few tokens, 1 repeat) and write the
keys RESULTS.md is built from. No timing assertions: timings on a shared CPU mean nothing here."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common, cpu_cache, grammar_cost, naive, shapes


def _load(path):
    return json.loads(path.read_text())


def test_cpu_cache_smoke(tmp_path):
    out = tmp_path / "cpu_cache.json"
    cpu_cache.main(["--smoke", "--out", str(out)])
    data = _load(out)
    assert {"benchmark", "environment", "settings", "rows", "ratios"} <= set(data)
    assert {(r["arm"], r["turn"]) for r in data["rows"]} == {
        (arm, turn) for arm in ("cache on", "cache off") for turn in ("first turn", "follow-up")}
    for row in data["rows"]:
        assert {"seconds", "cpu_seconds", "reasoning", "evidence", "synthesis", "generated",
                "prefill_computed", "cache"} <= set(row)
    by = {(r["arm"], r["turn"]): r for r in data["rows"]}
    # The caches do what they claim: less prefill, the image encoded once, crops found again.
    assert by[("cache on", "follow-up")]["prefill_computed"] < by[("cache off", "follow-up")]["prefill_computed"]
    assert by[("cache on", "follow-up")]["vision_misses"] == 0
    assert by[("cache on", "follow-up")]["region_hits"] == data["settings"]["regions"]
    assert by[("cache off", "first turn")]["prefix_reused"] == 0
    assert "follow-up: cache off / cache on" in data["ratios"]


def test_grammar_cost_smoke(tmp_path):
    out = tmp_path / "grammar_cost.json"
    grammar_cost.main(["--smoke", "--out", str(out)])
    data = _load(out)
    assert {"rows", "mask_costs", "overhead_ms_per_token", "ratio_constrained_over_free",
            "grammar_compile_s", "settings", "environment"} <= set(data)
    assert [r["arm"] for r in data["rows"]] == ["free", "constrained"]
    assert data["mask_costs"]["tokens"] == data["settings"]["tokens"]
    assert {"fill_ms", "apply_ms", "mask_ms", "accept_ms"} <= set(data["mask_costs"])
    assert data["constrained_text_sample"].startswith("<think>")


def test_naive_smoke(tmp_path):
    out = tmp_path / "naive.json"
    naive.main(["--smoke", "--out", str(out)])
    data = _load(out)
    assert [r["arm"] for r in data["rows"]] == ["naive", "engine"]
    assert {"reasoning", "evidence", "synthesis", "total"} <= set(data["rows"][0])
    assert set(data["ratio_naive_over_engine"]) == {"reasoning", "evidence", "synthesis", "total"}


def test_naive_inputs_match_the_engine(street_image):
    """Same ids, same positions: the naive generate() and the engine write the same greedy tokens."""
    from conftest import loaded_model, make_engine
    from corgi import boxes, prompts
    lm, engine = loaded_model("tiny-qwen2.5-vl"), make_engine("tiny-qwen2.5-vl")
    cfg = engine.config.image
    conv = engine.start_conversation(street_image, prompts.conversation_head())
    convention = boxes.pixel_convention(*conv.resized)
    engine.append(conv, prompts.reasoning_prompt("Q?", 6, convention))
    got = list(engine.generate(conv, 12, constraint=common.NoStop(lm.special.stop_ids)))
    pixel_values, grid, n_pad = naive._image_inputs(lm, street_image, cfg.min_pixels, cfg.max_pixels)
    before, after = prompts.conversation_head()
    ids = naive._image_block(lm, before, n_pad, after) + naive._encode(lm, prompts.reasoning_prompt("Q?", 6, convention))
    assert ids == conv.token_ids[:len(ids)]
    assert naive._generate(lm, ids, pixel_values, grid, 12) == got


@pytest.mark.parametrize("name,billions", [("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29), ("qwen3-vl-4b", 4.44)])
def test_real_shapes_parameter_counts(name, billions):
    """Built on the meta device (no memory, no init): the published sizes of the checkpoints."""
    model, tokenizer, processor = shapes.build_random_model(name, "meta", torch.bfloat16)
    assert round(shapes.parameter_count(model) / 1e9, 2) == billions
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") < 2048
    assert processor.patch_size == (16 if "qwen3" in name else 14)


@pytest.mark.parametrize("name", sorted(shapes.SMOKE_SHAPES))
def test_random_model_runs_in_the_engine(name, street_image):
    """loaded_random_model() is a LoadedModel the Engine and the naive turn run on unchanged."""
    from corgi import prompts
    from corgi.config import load_config
    from corgi.engine.engine import Engine
    from corgi.types import Box
    lm = shapes.loaded_random_model(name, "cpu", torch.float32, max_pixels=64 * 32 * 32)
    assert lm.vocab_size == 151936
    engine = Engine(lm, load_config(None, {"model.device": "cpu", "image.max_pixels": 64 * 32 * 32}))
    conv = engine.start_conversation(street_image, prompts.conversation_head())
    engine.append(conv, "Hello")
    assert len(list(engine.generate(conv, 3, constraint=common.NoStop(lm.special.stop_ids)))) == 3
    result = naive.naive_turn(lm, street_image, "Q?", reasoning_tokens=3, evidence_tokens=2, synthesis_tokens=2,
                              crop_boxes=[Box(0.1, 0.1, 0.5, 0.5)], max_pixels=64 * 32 * 32)
    assert set(result["seconds"]) == {"reasoning", "evidence", "synthesis", "total"}
