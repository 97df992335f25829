"""The benchmarks run end to end in smoke mode (tiny model, few tokens, 1 repeat) and write the
keys RESULTS.md is built from. No timing assertions: timings on a shared CPU mean nothing here."""
from __future__ import annotations

import functools
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


# Built on the meta device (no memory, no init). Published sizes: Qwen2.5-VL-3B 3.75B, -7B 8.29B,
# Qwen3-VL-4B 4.44B, Qwen3-VL-30B-A3B 31.07B. Qwen3.5: transformers drops the checkpoints'
# multi-token-prediction layer (mtp.*), so these are the published sizes minus it.
REAL_COUNTS = [("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29), ("qwen3-vl-4b", 4.44),
               ("qwen3-vl-30b-a3b", 31.07), ("qwen3.5-4b", 4.54), ("qwen3.5-9b", 9.41)]
REAL_IMAGE_PAD = {"qwen2.5-vl": 151655, "qwen3-vl": 151655, "qwen3-vl-moe": 151655, "qwen3.5": 248056}


@functools.lru_cache(maxsize=None)
def _meta(name):
    return shapes.build_random_model(name, "meta", torch.bfloat16)


@pytest.mark.parametrize("name,billions", REAL_COUNTS)
def test_real_shapes_parameter_counts(name, billions):
    model, tokenizer, processor = _meta(name)
    family = shapes.family_of(name)
    assert round(shapes.parameter_count(model) / 1e9, 2) == billions
    assert type(model).__name__ == family.model_class
    # the real tokenizer's real ids
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") == REAL_IMAGE_PAD[family.name]
    assert len(tokenizer) > 150_000
    assert (processor.patch_size, processor.merge_size) == (family.patch_size, family.merge_size)


def test_qwen35_shape_structure():
    """The hybrid pattern, the rope of the checkpoints, and what a decode step must read."""
    from benchmarks.gpu_pipeline import decode_step_bytes
    model, _, _ = _meta("qwen3.5-4b")
    tc = model.config.text_config
    assert tc.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 8
    assert tc.rope_parameters["rope_theta"] == 1e7 and tc.rope_parameters["partial_rotary_factor"] == 0.25
    assert sum(tc.rope_parameters["mrope_section"]) == tc.head_dim * 0.25 / 2
    assert model.config.tie_word_embeddings and model.config.vision_config.out_hidden_size == 2560
    step = decode_step_bytes(model, context=1000)
    assert (step["linear_layers"], step["attention_layers"]) == (24, 8)
    # per linear layer: conv [8192, 4] bf16 + recurrent [32, 128, 128] fp32, read and written
    assert step["linear_state"] == 24 * 2 * (8192 * 4 * 2 + 32 * 128 * 128 * 4)
    assert step["kv"] == 8 * 2 * 4 * 256 * 2 * 1000
    assert step["total"] == step["weights"] + step["lm_head"] + step["kv"] + step["linear_state"]
    # cut depth keeps at least one full-attention layer
    assert shapes._layer_types(2, 4) == ["linear_attention", "full_attention"]


def test_gpu_pipeline_geometry_and_kernels():
    from benchmarks import gpu_pipeline
    geo = gpu_pipeline.Geometry()
    w, h = geo.image_size
    for box in geo.regions(6):             # exactly 448 x 448 pixels of the 1232 x 896 image
        assert (round((box.x2 - box.x1) * w), round((box.y2 - box.y1) * h)) == (448, 448)
    small = gpu_pipeline.Geometry(0.25)
    assert small.image_size == (308, 224) and small.crop == 112
    report = gpu_pipeline.linear_attention_kernels(shapes.family_of("qwen3.5-4b"))
    assert {"fla", "causal_conv1d", "torch_chunk_gated_delta_rule", "causal_conv1d_update"} <= set(report)
    assert gpu_pipeline.linear_attention_kernels(shapes.family_of("qwen2.5-vl-3b")) is None


@pytest.mark.parametrize("name", sorted(shapes.SMOKE_SHAPES))
def test_random_model_runs_in_the_engine(name, street_image):
    """loaded_random_model() is a LoadedModel the Engine and the naive turn run on unchanged."""
    from corgi import prompts
    from corgi.config import load_config
    from corgi.engine.engine import Engine
    from corgi.types import Box
    lm = shapes.loaded_random_model(name, "cpu", torch.float32, max_pixels=64 * 32 * 32)
    assert lm.vocab_size == shapes.SHAPES[name]["text"]["vocab_size"]
    assert lm.special.image_pad == REAL_IMAGE_PAD[lm.family.name]
    engine = Engine(lm, load_config(None, {"model.device": "cpu", "image.max_pixels": 64 * 32 * 32}))
    conv = engine.start_conversation(street_image, prompts.conversation_head())
    engine.append(conv, "Hello")
    assert len(list(engine.generate(conv, 3, constraint=common.NoStop(lm.special.stop_ids)))) == 3
    result = naive.naive_turn(lm, street_image, "Q?", reasoning_tokens=3, evidence_tokens=2, synthesis_tokens=2,
                              crop_boxes=[Box(0.1, 0.1, 0.5, 0.5)], max_pixels=64 * 32 * 32)
    assert set(result["seconds"]) == {"reasoning", "evidence", "synthesis", "total"}


def test_gpu_pipeline_engine_turn_through_chat_session():
    """The GPU script's engine arm: ChatSession on a ForcedEngine, exact token counts, the given
    regions parsed back from the scripted steps and captioned (smoke widths, real tokenizer)."""
    from benchmarks import gpu_pipeline
    from corgi.config import load_config
    from corgi.pipeline import ChatSession
    geo = gpu_pipeline.Geometry(0.25)
    lm = shapes.loaded_random_model("smoke-qwen2.5-vl", "cpu", torch.float32, max_pixels=geo.max_pixels)
    engine = gpu_pipeline.TimedEngine(lm, load_config(None, {
        "model.device": "cpu", "image.max_pixels": geo.max_pixels, "pipeline.structured_output": True,
        "pipeline.crop_padding": 0.0, "pipeline.crop_max_pixels": geo.crop ** 2}))
    image = gpu_pipeline.test_image(geo.image_size)
    session = ChatSession(engine, image)
    work = dict(reasoning=100, regions=2, evidence=3, synthesis=52)
    out = gpu_pipeline.engine_turn(engine, session, gpu_pipeline.QUESTION, work, geo)
    assert out["tokens"] == 100 + 2 * 3 + 52 and 0 < out["ttft"] < out["total"]
    assert out["cache"]["region_vision_misses"] == 2
    # A follow-up written under the real grammar: jump-forward appends what the grammar forces,
    # so the turn takes fewer model steps than it writes tokens, and the script is followed.
    follow = gpu_pipeline.grammar_turn(engine, session, gpu_pipeline.FOLLOW_UP, dict(work, reasoning=120, synthesis=60), geo)
    assert follow["forced"] > 0 and follow["model_steps"] < follow["output_tokens"]
    assert 0 < follow["ttft"] < follow["total"] and engine.texts == {}
