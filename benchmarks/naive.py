"""The naive CoRGI turn, as the earlier implementation ran it: every phase is a fresh HF
`model.generate()` from token 0 with `pixel_values` (the image is encoded again each phase),
and the phase-3 crops are captioned one after another, each with its own generate().

Same prompt texts (corgi.prompts) and the same image-pad expansion as the engine, so the
sequences match the engine's token for token in length. Token counts are forced
(min_new_tokens == max_new_tokens, greedy). This is the baseline the engine is measured against:

    .venv/bin/python -m benchmarks.naive --model small-qwen2.5-vl                  # CPU
    .venv/bin/python -m benchmarks.naive --shape qwen2.5-vl-3b --device cuda         # GPU, random weights
"""
from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from corgi import boxes, prompts
from corgi.engine.loading import LoadedModel
from corgi.types import Box, Evidence, StepKind

from . import common


def _encode(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer.encode(text, add_special_tokens=False)


def _image_inputs(lm: LoadedModel, image: Image.Image, min_pixels: int, max_pixels: int):
    """pixel_values, image_grid_thw and the number of image-pad tokens, as the engine's vision path."""
    out = lm.image_processor(images=[image], return_tensors="pt",
                             size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    grid = out["image_grid_thw"]                                       # [1, 3]
    n_pad = int(grid.prod()) // lm.merge_size ** 2
    return out["pixel_values"].to(lm.device, lm.dtype), grid.to(lm.device), n_pad


def _image_block(lm: LoadedModel, before: str, n_pad: int, after: str) -> list[int]:
    """Engine._image_block: text, <|vision_start|>, n_pad x <|image_pad|>, text."""
    ids = _encode(lm, before)
    if not ids or ids[-1] != lm.special.vision_start:
        ids.append(lm.special.vision_start)
    return ids + [lm.special.image_pad] * n_pad + _encode(lm, after)


@torch.inference_mode()
def _generate(lm: LoadedModel, ids: list[int], pixel_values, grid, n_tokens: int, **generate_kwargs) -> list[int]:
    """One fresh generate(): full prefill (vision tower included), then exactly n_tokens.
    generate_kwargs go to model.generate() as they are (e.g. stopping_criteria)."""
    input_ids = torch.tensor([ids], device=lm.device)
    out = lm.model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        # M-RoPE needs the token types; without them Qwen2.5-VL silently uses 1-D positions.
        mm_token_type_ids=(input_ids == lm.special.image_pad).int(),
        pixel_values=pixel_values, image_grid_thw=grid,
        max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None,
        eos_token_id=list(lm.special.stop_ids), pad_token_id=lm.special.end_of_text, **generate_kwargs)
    new = out[0, input_ids.shape[1]:].tolist()
    assert len(new) == n_tokens, f"asked for {n_tokens} tokens, got {len(new)}"
    return new


def naive_turn(lm: LoadedModel, image: Image.Image, question: str, *, reasoning_tokens: int,
               evidence_tokens: int, synthesis_tokens: int, crop_boxes: list[Box],
               min_pixels: int = 56 * 56, max_pixels: int = 1280 * 28 * 28,
               crop_max_pixels: int = 448 * 448, crop_padding: float = 0.25, max_steps: int = 6) -> dict:
    """Run one naive turn; per-phase seconds (GPU-synchronised) and the token counts."""
    dev = lm.device
    seconds, tokens = {}, {}
    head_before, head_after = prompts.conversation_head()
    t_turn = time.perf_counter()

    # Phase 1+2: the conversation so far + the reasoning prompt, image encoded from pixels.
    def phase1():
        pixel_values, grid, n_pad = _image_inputs(lm, image, min_pixels, max_pixels)
        resized = (int(grid[0, 2]) * lm.patch_size, int(grid[0, 1]) * lm.patch_size)
        convention = boxes.convention_for(lm.family.box_style, resized)
        ids = _image_block(lm, head_before, n_pad, head_after)
        ids += _encode(lm, prompts.reasoning_prompt(question, max_steps, convention))
        return ids, convention, _generate(lm, ids, pixel_values, grid, reasoning_tokens)
    seconds["reasoning"], (ids, convention, reasoning_ids) = common.timed(phase1, dev)
    tokens["reasoning_prompt"] = len(ids)

    # Phase 3: each crop alone, one generate() per region.
    def phase3():
        crop_before, crop_after = prompts.crop_head()
        texts = []
        for i, box in enumerate(crop_boxes):
            crop = boxes.crop(image, box, crop_padding)
            pv, grid, n_pad = _image_inputs(lm, crop, min(min_pixels, crop_max_pixels), crop_max_pixels)
            row = _image_block(lm, crop_before, n_pad,
                               crop_after + prompts.crop_instruction(StepKind.OBJECT, f"Look at region {i + 1}."))
            texts.append(lm.tokenizer.decode(_generate(lm, row, pv, grid, evidence_tokens), skip_special_tokens=True))
        return texts
    seconds["evidence"], captions = common.timed(phase3, dev)

    # Phase 4: everything again (steps in context), image re-encoded from pixels.
    def phase4():
        pixel_values, grid, _ = _image_inputs(lm, image, min_pixels, max_pixels)
        evidence = [Evidence(i + 1, b, StepKind.OBJECT, c) for i, (b, c) in enumerate(zip(crop_boxes, captions))]
        ids4 = ids + reasoning_ids + _encode(lm, prompts.END_OF_MESSAGE)
        ids4 += _encode(lm, prompts.synthesis_prompt(question, evidence, convention))
        return ids4, _generate(lm, ids4, pixel_values, grid, synthesis_tokens)
    seconds["synthesis"], (ids4, _) = common.timed(phase4, dev)
    tokens["synthesis_prompt"] = len(ids4)
    seconds["total"] = time.perf_counter() - t_turn
    tokens.update(reasoning=reasoning_tokens, evidence=evidence_tokens * len(crop_boxes),
                  synthesis=synthesis_tokens, regions=len(crop_boxes))
    return {"seconds": seconds, "tokens": tokens}


# ---- side by side with the engine ---------------------------------------------------------

def engine_turn(lm: LoadedModel, config, image: Image.Image, question: str, args) -> dict:
    """The same turn through ChatSession on a fresh engine (caches on, starting empty), with the
    same forced token counts (benchmarks.common.ForcedEngine)."""
    from corgi.pipeline import ChatSession
    engine = common.ForcedEngine(lm, config)
    session = ChatSession(engine, image)
    engine.scripts = {
        "reasoning": common.reasoning_script(engine, session.convention, args.reasoning_tokens, args.regions),
        "synthesis": common.synthesis_script(engine, session.convention, args.synthesis_tokens)}
    seconds, events = common.timed(lambda: list(session.ask(question)), lm.device)
    result = events[-1].result
    assert len(result.evidence) == args.regions, result.warnings
    session.close()
    phases = {k: result.timings[k] for k in ("reasoning", "evidence", "synthesis")}
    return {"seconds": dict(phases, total=seconds), "generated_tokens": engine.generated,
            "cache": result.cache.to_json()}


def setup(args):
    from corgi.config import load_config
    if args.shape:
        from .shapes import loaded_random_model
        config = load_config(None, {"model.device": args.device, **_pipeline(args)})
        dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
        lm = loaded_random_model(args.shape, args.device, dtype,
                                 min_pixels=config.image.min_pixels, max_pixels=config.image.max_pixels)
    else:
        from corgi.engine.loading import load_model
        config = load_config(None, {"model.id": args.model, "model.device": args.device, **_pipeline(args)})
        lm = load_model(config.model, config.image)
    return lm, config


def _pipeline(args) -> dict:
    return {"pipeline.structured_output": True, "pipeline.temperature": 0.0,
            "pipeline.max_steps": args.regions, "pipeline.max_regions": args.regions,
            "pipeline.reasoning_max_new_tokens": args.reasoning_tokens,
            "pipeline.evidence_max_new_tokens": args.evidence_tokens,
            "pipeline.synthesis_max_new_tokens": args.synthesis_tokens}


def run(args) -> dict:
    from corgi.images import load_image
    lm, config = setup(args)
    image = load_image(args.image, 10**8)
    if args.image_scale != 1.0:
        image = image.resize((round(image.width * args.image_scale), round(image.height * args.image_scale)),
                             Image.BICUBIC)
    crop_boxes = [Box(*b) for b in common.region_boxes(args.regions)]
    question = "What does the sign above the shop say?"

    def naive():
        return naive_turn(lm, image, question, reasoning_tokens=args.reasoning_tokens,
                          evidence_tokens=args.evidence_tokens, synthesis_tokens=args.synthesis_tokens,
                          crop_boxes=crop_boxes, min_pixels=config.image.min_pixels,
                          max_pixels=config.image.max_pixels, crop_max_pixels=config.pipeline.crop_max_pixels,
                          crop_padding=config.pipeline.crop_padding, max_steps=args.regions)

    arms = {"naive": naive}
    if args.compare:
        arms["engine"] = lambda: engine_turn(lm, config, image, question, args)
    for fn in arms.values():            # untimed warm-up: first-call costs (and CUDA init)
        fn()
    samples = {name: [] for name in arms}
    for _ in range(args.repeats):       # interleaved, so drift hits every arm alike
        for name, fn in arms.items():
            samples[name].append(fn())
    rows = []
    for name, recs in samples.items():
        row = {"arm": name}
        for phase in ("reasoning", "evidence", "synthesis", "total"):
            row[phase] = common.median([r["seconds"][phase] for r in recs])
        row["samples_total_s"] = [r["seconds"]["total"] for r in recs]
        rows.append(row)
    data = {"benchmark": "naive", "environment": common.environment(args.device),
            "settings": {"model": args.shape or args.model, "image_size": list(image.size),
                         "image_max_pixels": config.image.max_pixels, "regions": args.regions,
                         "reasoning_tokens": args.reasoning_tokens, "evidence_tokens_per_region": args.evidence_tokens,
                         "synthesis_tokens": args.synthesis_tokens, "repeats": args.repeats,
                         "naive_prompt_tokens": samples["naive"][0]["tokens"]},
            "rows": rows}
    if args.compare:
        data["engine_cache_stats"] = samples["engine"][0]["cache"]
        data["ratio_naive_over_engine"] = {p: rows[0][p] / rows[1][p]
                                           for p in ("reasoning", "evidence", "synthesis", "total")}
    return data


def print_report(data: dict) -> None:
    s = data["settings"]
    print(f"\nnaive turn: {s['model']}, image {s['image_size'][0]}x{s['image_size'][1]}, {s['regions']} regions, "
          f"tokens {s['reasoning_tokens']}/{s['evidence_tokens_per_region']} per region/{s['synthesis_tokens']}, "
          f"median of {s['repeats']}")
    print(common.table(data["rows"], ["arm", "reasoning", "evidence", "synthesis", "total"]))
    for phase, ratio in data.get("ratio_naive_over_engine", {}).items():
        print(f"{phase}: naive / engine {ratio:.2f}x")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="the naive CoRGI turn (fresh generate() per phase)")
    ap.add_argument("--model", default="small-qwen2.5-vl", help="tiny-builder name or checkpoint folder")
    ap.add_argument("--shape", default=None, help="random weights of a real shape (benchmarks.shapes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads (1: steadier on a shared machine, see common.threads)")
    ap.add_argument("--image", default=str(common.ROOT / "assets" / "street-scene.png"))
    ap.add_argument("--image-scale", type=float, default=1.5, help="resize the image first")
    ap.add_argument("--regions", type=int, default=2)
    ap.add_argument("--reasoning-tokens", type=int, default=128)
    ap.add_argument("--evidence-tokens", type=int, default=16)
    ap.add_argument("--synthesis-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="also run the engine's turn, side by side")
    ap.add_argument("--out", default=str(common.OUT_DIR / "naive.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens, 1 repeat (for the tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.shape, args.repeats, args.compare = "tiny-qwen2.5-vl", None, 1, True
        args.image_scale = 0.5
        args.reasoning_tokens, args.evidence_tokens, args.synthesis_tokens, args.regions = 110, 4, 60, 2
    return args


def main(argv=None) -> dict:
    return common.run_script(parse_args, run, print_report, argv)


if __name__ == "__main__":
    main()
