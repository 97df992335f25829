"""Where does a caption batch's first-use cost go? (CUDA; the grammar arm's run-0 phase-3 stall)

    python3 benchmarks/gpu_first_use.py --shape qwen2.5-vl-3b

gpu_pipeline's first turn under the real grammar paid 1.2-1.5 s more in phase 3 than its
warm runs, on every shape, while the forced arm's first turn did not: its statements are longer,
so the six caption rows are wider (a width no earlier batch had). This script runs the stages of
`Engine.generate_batch` one by one (vision tower, the HF prefill of the left-padded rows, the
copy into the static bucket, the decode loop) for row widths that are new, then again, and
prints each stage's seconds, so the stage that pays on a new width shows; rows of one length
first, then rows of different lengths (left padding), after the engine's own CUDA warm-ups.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.gpu_pipeline import Geometry, sync, test_image  # noqa: E402
from benchmarks.shapes import loaded_random_model  # noqa: E402
from corgi import boxes, prompts  # noqa: E402
from corgi.config import load_config  # noqa: E402
from corgi.engine import decode, state  # noqa: E402
from corgi.engine.engine import Engine, EncoderOutput  # noqa: E402
from corgi.types import Sampling, StepKind  # noqa: E402


def clock(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


@torch.inference_mode()
def caption_stages(engine: Engine, crops, statements: list[str], tokens: int, max_pixels: int) -> dict:
    lm, device = engine.lm, engine.lm.device
    before, after = prompts.crop_head()
    heads = [(before, after + prompts.crop_instruction(StepKind.OBJECT, s)) for s in statements]
    features, t_vision = clock(lambda: engine.vision.encode(crops, max_pixels, max_pixels))
    rows = [engine._image_block(h[0], f.n_tokens, h[1]) for h, f in zip(heads, features)]
    batch, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((batch, width), lm.special.end_of_text, dtype=torch.long)   # [B, L]
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    (positions, deltas), t_rope = clock(lambda: engine._image_positions(ids, [f.grid_thw for f in features], mask))
    ids, mask = ids.to(device), mask.to(device)
    cache = state.new_cache(lm.text_config, lm.family.hybrid)
    logits, t_prefill = clock(lambda: decode.forward(lm.model, ids, positions.to(device), cache, attention_mask=mask,
                                                     images=EncoderOutput(features)))
    next_pos = torch.tensor([len(r) for r in rows], device=device) + deltas.view(-1).to(device)
    bucket = engine.static.bucket(batch, width + tokens)
    _, t_load = clock(lambda: bucket.load(cache, width, next_pos, valid=mask))
    stepper = decode.StaticStepper(bucket)
    decode_rows = [decode.Row(engine._row_constraints(None, tokens)) for _ in rows]

    def run():
        for _ in decode.decode_rows(logits, decode_rows, stepper, tokens, engine._sampler(Sampling()),
                                    lm.special.stop_ids, lm.special.end_of_text, overlap=True):
            pass
    _, t_decode = clock(run)
    return {"width": width, "vision": t_vision, "rope": t_rope, "prefill": t_prefill, "load": t_load,
            "decode": t_decode, "bucket": (bucket.batch, bucket.capacity)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-vl-3b")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--regions", type=int, default=6)
    parser.add_argument("--layers", type=int, default=None, help="cpu check: fewer text layers")
    args = parser.parse_args(argv)
    geo = Geometry(1.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: a functional check only
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lm = loaded_random_model(args.shape, device, dtype, max_pixels=geo.max_pixels, layers_override=args.layers,
                             vision_depth_override=args.layers)
    config = load_config(None, {"model.device": device, "model.dtype": str(dtype).removeprefix("torch."),
                                "model.compile": True,
                                "model.warmup": False, "cache.enabled": False,
                                "image.max_pixels": geo.max_pixels})
    engine = Engine(lm, config)
    t = time.perf_counter()
    engine.static.warm_up([(1, 2048), (1, 512), (2, 512), (8, 512)], engine.warmup_widths())
    if lm.family.hybrid and device == "cuda":
        engine.warm_up_prefill()
    if device == "cuda":
        engine.warm_up_captions()
    print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)
    image = test_image(geo.image_size)
    crops = [boxes.crop(image, b, 0.0) for b in geo.regions(args.regions)]
    words = "the small red sign on the left of the blue car "
    # Rows of one length (no padding), then rows of different lengths (left padding): the
    # statement of row b has n + 3b words.
    for n_words, mixed in ((2, False), (2, False), (12, False), (12, True), (12, True), (30, True), (30, True)):
        lengths = [n_words + 3 * b * mixed for b in range(len(crops))]
        statements = [" ".join((words * 8).split()[:n]) for n in lengths]
        stages = caption_stages(engine, crops, statements, args.tokens, geo.crop ** 2)
        print(f"statements {lengths} words: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stages.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
