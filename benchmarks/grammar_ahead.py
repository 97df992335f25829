"""A first turn's phase 1 on a new image size: its grammar compiled before the prefill, or on
the engine's grammar thread while the prefill runs (`Engine.constraint_ahead`, what the
pipeline does).

    python3 benchmarks/grammar_ahead.py --shape qwen2.5-vl-3b        # CUDA: random weights, real tokenizer
    python -m benchmarks.grammar_ahead --model tiny-qwen2.5-vl       # CPU: the twin

The grammar is compiled per box range, so per image size for pixel boxes (Qwen2.5-VL). Each
measurement is a new conversation on an image of a size no earlier one had (new to the vision
cache and to the grammar cache): the time from the phase's prompt to its first token. The arms
alternate over the sizes, so both pay the same mix of sizes; `compile only` is the grammar's
compile alone on further new sizes, for scale.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.gpu_pipeline import IMAGE_SIZE, test_image  # noqa: E402
from corgi import boxes, prompts  # noqa: E402
from corgi.config import load_config  # noqa: E402
from corgi.engine.engine import Engine  # noqa: E402
from corgi.types import Sampling  # noqa: E402


def first_token_seconds(engine: Engine, image, ahead: bool) -> float:
    lm, settings = engine.lm, engine.config.pipeline
    conv = engine.start_conversation(image, prompts.conversation_head())
    convention = boxes.convention_for(lm.family.box_style, conv.sizes[0])
    engine.append(conv, prompts.reasoning_prompt("What does the sign say?", settings.max_steps, convention))
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    ask = engine.constraint_ahead if ahead else engine.constraint
    constraint = ask("reasoning", settings, convention)
    tokens = engine.generate(conv, 2, Sampling(), constraint)
    next(tokens)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    tokens.close()
    engine.end_conversation(conv)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=None, help="CUDA: a random model of this shape (benchmarks/shapes.py)")
    parser.add_argument("--model", default="tiny-qwen2.5-vl", help="without --shape: this model id (CPU twin)")
    parser.add_argument("--sizes", type=int, default=6, help="new image sizes per arm")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    w, h = IMAGE_SIZE
    overrides = {"pipeline.structured_output": True, "pipeline.max_steps": 6, "image.max_pixels": w * h}
    if args.shape:
        from benchmarks.shapes import loaded_random_model
        lm = loaded_random_model(args.shape, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32,
                                 max_pixels=w * h)
        # Prefill through HF as without model.compile: the decode step's buckets would compile
        # mid-run for the lengths of new sizes, and only the prefill matters here.
        overrides.update({"model.device": str(lm.device),
                          "model.dtype": str(lm.dtype).removeprefix("torch.")})
    else:
        from corgi.engine.loading import load_model
        cfg = load_config(None, dict(overrides, **{"model.id": args.model}))
        lm = load_model(cfg.model, cfg.image)
    engine = Engine(lm, load_config(None, dict(overrides, **{"model.id": args.shape or args.model})))
    # Sizes 28 px apart (one patch), all near the benchmark image: the same prefill cost, a new
    # grid and box range each. The first is a warm-up (first-call costs of both paths).
    sizes = [(w - 28 * i, h - 28 * (i % 3)) for i in range(2 * args.sizes + 4)]
    image = test_image(IMAGE_SIZE)
    first_token_seconds(engine, image.resize(sizes[0]), ahead=True)
    rows = {"before the prefill": [], "ahead (on the grammar thread)": []}
    for i, size in enumerate(sizes[1:1 + 2 * args.sizes]):
        ahead = i % 2 == 1
        rows["ahead (on the grammar thread)" if ahead else "before the prefill"].append(
            first_token_seconds(engine, image.resize(size), ahead))
    compile_only = []
    convention_sizes = sizes[1 + 2 * args.sizes:]
    for size in convention_sizes:
        grid = engine.image_grid(image.resize(size), engine.config.image.min_pixels, w * h)
        convention = boxes.convention_for(lm.family.box_style, (grid[2] * lm.patch_size, grid[1] * lm.patch_size))
        t = time.perf_counter()
        engine.constraint("reasoning", engine.config.pipeline, convention)
        compile_only.append(time.perf_counter() - t)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.shape or args.model} on {card}, {args.sizes} new image sizes per arm; "
          f"phase 1 prompt to first token, median (all):", flush=True)
    report = {"model": args.shape or args.model, "device": card, "rows_ms": {}}
    for name, values in rows.items():
        ms = [round(v * 1e3, 1) for v in values]
        report["rows_ms"][name] = ms
        print(f"  {name:>30}: {statistics.median(values) * 1e3:7.1f} ms  {ms}", flush=True)
    ms = [round(v * 1e3, 1) for v in compile_only]
    report["compile_only_ms"] = ms
    print(f"  {'compile only':>30}: {statistics.median(compile_only) * 1e3:7.1f} ms  {ms}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
