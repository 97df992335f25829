"""Issue 4: what the caches buy on CPU, measured side by side in one run.

Four measurements through ChatSession on the same image, the same two questions, the same
tokens: a first turn and a follow-up turn with the caches on (a fresh engine each repeat, so
the first turn starts cold), and the same two turns with `cache.enabled: false` (every phase
re-encodes the image and re-reads the whole conversation). Every phase writes a fixed number
of tokens (benchmarks.common.ForcedEngine: scripted, parseable phase-1+2 / phase-4 outputs, so
phase 3 really runs on `--regions` crops; phase-3 rows never stop early). Each measurement is
the median of `--repeats`, the arms interleaved so drift hits both alike.

    .venv/bin/python -m benchmarks.cpu_cache                 # ~2-3 min on 2 cores
    .venv/bin/python -m benchmarks.cpu_cache --smoke         # seconds, tiny model
"""
from __future__ import annotations

import argparse

from PIL import Image

from corgi.config import load_config
from corgi.engine.loading import load_model
from corgi.images import load_image
from corgi.pipeline import ChatSession
from corgi.types import TurnFinished

from . import common

QUESTIONS = ("What does the sign above the shop say?", "And what colour is the car next to it?")
ARMS = {"cache on": True, "cache off": False}
TURNS = ("first turn", "follow-up")


def make_config(args, cache_enabled: bool):
    return load_config(None, {
        "model.id": args.model, "model.device": args.device,
        "image.max_pixels": args.image_tokens * 28 * 28 if "qwen2.5" in args.model else args.image_tokens * 32 * 32,
        "pipeline.structured_output": True,          # makes ChatSession ask ForcedEngine for its script
        "pipeline.reasoning_max_new_tokens": args.reasoning_tokens,
        "pipeline.evidence_max_new_tokens": args.evidence_tokens,
        "pipeline.synthesis_max_new_tokens": args.synthesis_tokens,
        "pipeline.max_steps": max(args.regions, 1), "pipeline.max_regions": max(args.regions, 1),
        "pipeline.temperature": 0.0,
        "cache.enabled": cache_enabled,
    })


def run_turns(lm, config, image: Image.Image, args) -> list[dict]:
    """A fresh engine (empty caches), one session, both questions; one record per turn."""
    engine = common.ForcedEngine(lm, config)
    session = ChatSession(engine, image)
    engine.scripts = {
        "reasoning": common.reasoning_script(engine, session.convention, args.reasoning_tokens, args.regions),
        "synthesis": common.synthesis_script(engine, session.convention, args.synthesis_tokens)}
    records = []
    for question in QUESTIONS:
        before = engine.generated
        seconds, cpu, events = common.timed_cpu(lambda: list(session.ask(question)), args.device)
        assert isinstance(events[-1], TurnFinished)
        result = events[-1].result
        assert len(result.evidence) == args.regions, result.warnings   # phase 3 really ran
        records.append({"seconds": seconds, "cpu_seconds": cpu, "phases": dict(result.timings),
                        "generated_tokens": engine.generated - before, "cache": result.cache.to_json(),
                        "conversation_tokens": len(session.conv.token_ids)})
    session.close()
    return records


def warm_up(lm, config, image) -> None:
    """Untimed: the process's first forward passes (allocator, lazy init) cost extra."""
    engine = common.ForcedEngine(lm, config)
    session = ChatSession(engine, image)
    session.warm_up()
    engine.append(session.conv, "Hello")
    list(engine.generate(session.conv, 4, constraint=common.NoStop([])))
    session.close()


def run(args) -> dict:
    config_on = make_config(args, True)
    lm = load_model(config_on.model, config_on.image)
    image = load_image(args.image, 10**8)
    if args.image_scale != 1.0:
        image = image.resize((round(image.width * args.image_scale), round(image.height * args.image_scale)),
                             Image.BICUBIC)
    configs = {arm: make_config(args, enabled) for arm, enabled in ARMS.items()}
    warm_up(lm, configs["cache on"], image)
    samples = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            samples[arm].append(run_turns(lm, configs[arm], image, args))

    rows = []
    for arm in ARMS:
        for t, turn in enumerate(TURNS):
            recs = [rep[t] for rep in samples[arm]]
            first = recs[0]
            # Same tokens in every repeat (greedy, forced): the work is identical, only time varies.
            assert all(r["cache"] == first["cache"] and r["generated_tokens"] == first["generated_tokens"]
                       for r in recs)
            row = {"arm": arm, "turn": turn, "seconds": common.median([r["seconds"] for r in recs]),
                   "min_seconds": min(r["seconds"] for r in recs),
                   "cpu_seconds": common.median([r["cpu_seconds"] for r in recs])}
            for phase in ("reasoning", "evidence", "synthesis"):
                row[phase] = common.median([r["phases"][phase] for r in recs])
            row.update(generated=first["generated_tokens"], prefill_computed=first["cache"]["prefill_tokens_computed"],
                       prefix_reused=first["cache"]["prefix_tokens_reused"],
                       vision_hits=first["cache"]["vision_hits"], vision_misses=first["cache"]["vision_misses"],
                       region_hits=first["cache"]["region_vision_hits"],
                       region_misses=first["cache"]["region_vision_misses"],
                       samples=[r["seconds"] for r in recs], cache=first["cache"],
                       conversation_tokens=first["conversation_tokens"])
            rows.append(row)
    by = {(r["arm"], r["turn"]): r for r in rows}
    for turn in TURNS:    # identical tokens in both arms, or the comparison means nothing
        assert by[("cache on", turn)]["generated"] == by[("cache off", turn)]["generated"]
    ratios = {f"{turn}: cache off / cache on": by[("cache off", turn)]["seconds"] / by[("cache on", turn)]["seconds"]
              for turn in TURNS}
    ratios.update({f"{turn}: cache off / cache on (CPU seconds)":
                   by[("cache off", turn)]["cpu_seconds"] / by[("cache on", turn)]["cpu_seconds"] for turn in TURNS})
    ratios["follow-up / first turn, cache on"] = by[("cache on", "follow-up")]["seconds"] / by[("cache on", "first turn")]["seconds"]
    grid = configs["cache on"]
    return {"benchmark": "cpu_cache", "environment": common.environment(args.device),
            "settings": {"model": args.model, "image": str(args.image), "image_size": list(image.size),
                         "image_max_pixels": grid.image.max_pixels, "regions": args.regions,
                         "reasoning_tokens": args.reasoning_tokens, "evidence_tokens_per_region": args.evidence_tokens,
                         "synthesis_tokens": args.synthesis_tokens, "repeats": args.repeats, "questions": QUESTIONS},
            "rows": rows, "ratios": ratios}


def print_report(data: dict) -> None:
    s = data["settings"]
    print(f"\ncpu_cache: {s['model']}, image {s['image_size'][0]}x{s['image_size'][1]}, "
          f"{s['regions']} regions, tokens {s['reasoning_tokens']}/{s['evidence_tokens_per_region']} per region/"
          f"{s['synthesis_tokens']}, median of {s['repeats']}")
    print(common.table(data["rows"], ["arm", "turn", "seconds", "min_seconds", "cpu_seconds", "reasoning", "evidence", "synthesis", "generated",
                                      "prefill_computed", "prefix_reused", "vision_hits", "vision_misses",
                                      "region_hits", "region_misses"]))
    for name, value in data["ratios"].items():
        print(f"{name}: {value:.2f}x")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-qwen2.5-vl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads (1: steadier on a shared machine, see common.threads)")
    ap.add_argument("--image", default=str(common.ROOT / "assets" / "street-scene.png"))
    ap.add_argument("--image-scale", type=float, default=1.5,
                    help="resize the image first (1.5: 960x672 px, 816 image tokens at patch 14)")
    ap.add_argument("--image-tokens", type=int, default=1280, help="max image tokens (image.max_pixels)")
    ap.add_argument("--regions", type=int, default=2)
    ap.add_argument("--reasoning-tokens", type=int, default=128)
    ap.add_argument("--evidence-tokens", type=int, default=16)
    ap.add_argument("--synthesis-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(common.OUT_DIR / "cpu_cache.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens, 1 repeat (for the tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.image_tokens, args.repeats = "tiny-qwen2.5-vl", 64, 1
        args.reasoning_tokens, args.evidence_tokens, args.synthesis_tokens, args.regions = 100, 4, 48, 2
    return args


def main(argv=None) -> dict:
    return common.run_script(parse_args, run, print_report, argv)


if __name__ == "__main__":
    main()
