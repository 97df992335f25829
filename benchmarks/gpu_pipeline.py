"""Issue 6: the naive CoRGI pipeline vs this project's engine, on one GPU, in one run.

    python benchmarks/gpu_pipeline.py --shape qwen2.5-vl-3b --out gpu.json

Random bf16 weights of the real checkpoint's shape (same compute as the real model).
Token counts are forced (min_new_tokens == max_new_tokens), so both sides do the same work:
  W1, first turn: 1232x896 image, ~20-token question; phase 1+2 512 tokens; phase 3 six
      448x448 regions x 48 tokens; phase 4 128 tokens.
  W2, follow-up on the same image: phase 1+2 256 tokens; two regions; phase 4 128 tokens.
The engine side runs the pipeline's own operations (engine.start_conversation / append /
generate / generate_batch with the prompts of corgi.prompts) in the pipeline's order; random
weights cannot produce parseable steps, so the regions are given instead of parsed.
Also measured in the same run: the memory-bandwidth floor (device-to-device copy), decode
ms/token (eager HF loop vs static+CUDA graphs), and six region captions vs one.
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
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.naive import naive_turn  # noqa: E402
from benchmarks.shapes import loaded_random_model  # noqa: E402
from corgi import boxes, prompts  # noqa: E402
from corgi.config import load_config  # noqa: E402
from corgi.engine.engine import Engine  # noqa: E402
from corgi.types import Box, Evidence, StepKind  # noqa: E402

W1 = dict(reasoning=512, regions=6, evidence=48, synthesis=128)
W2 = dict(reasoning=256, regions=2, evidence=48, synthesis=128)
QUESTION = "What is written on the red sign next to the small blue car?"   # ~20 tokens
FOLLOW_UP = "And what colour is the roof of the house on the left?"
IMAGE_SIZE = (1232, 896)
MAX_PIXELS = 1232 * 896          # the whole image: 1408 visual tokens for Qwen2.5-VL


DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bandwidth_floor_gbps() -> float:
    """Device-to-device copy of 2 GiB; bytes read + written over time (median of 10)."""
    src = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        sync()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    seconds = statistics.median(times)
    del src, dst
    return 2 * (1 << 30) * 2 / seconds / 1e9


def lm_decode_bytes(model) -> int:
    """Bytes a decode step must read at least: the text layers, final norm and lm_head
    (the embedding table is read one row per token)."""
    text = model.model.language_model
    n = sum(p.numel() * p.element_size() for name, p in text.named_parameters() if "embed_tokens" not in name)
    return n + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def test_image() -> Image.Image:
    image = Image.new("RGB", IMAGE_SIZE, (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 600, 1232, 896), fill=(90, 90, 95))
    draw.rectangle((100, 300, 450, 600), fill=(170, 60, 50))
    draw.regular_polygon((850, 250, 90), 8, fill=(200, 20, 20))
    draw.rectangle((550, 480, 750, 580), fill=(30, 80, 200))
    return image


def region_boxes(n: int) -> list[Box]:
    """n boxes of exactly 448x448 pixels of the 1232x896 image (crop padding 0)."""
    w, h = IMAGE_SIZE
    corners = [(0, 0), (392, 0), (784, 0), (0, 448), (392, 448), (784, 448)]
    return [Box(x / w, y / h, (x + 448) / w, (y + 448) / h) for x, y in corners[:n]]


def engine_turn(engine: Engine, conv, question: str, work: dict, image: Image.Image) -> dict:
    """One CoRGI turn through the engine, in the pipeline's order; seconds per phase + TTFT."""
    lm = engine.lm
    convention = boxes.convention_for(lm.family.box_style, conv.resized)
    out = {}
    t0 = time.perf_counter()
    engine.append(conv, prompts.reasoning_prompt(question, 6, convention))
    for i, _ in enumerate(engine.generate(conv, work["reasoning"], min_new_tokens=work["reasoning"])):
        if i == 0:
            out["ttft"] = time.perf_counter() - t0
    engine.append(conv, prompts.END_OF_MESSAGE)
    t1 = time.perf_counter()
    regions = region_boxes(work["regions"])
    crops = [boxes.crop(image, b, 0.0) for b in regions]
    before, after = prompts.crop_head()
    heads = [(before, after + prompts.crop_instruction(StepKind.OBJECT, f"Region {i + 1}.")) for i in range(len(crops))]
    texts = {i: [] for i in range(len(crops))}
    for row, token in engine.generate_batch(crops, heads, work["evidence"], 448 * 448,
                                            min_new_tokens=work["evidence"]):
        texts[row].append(token)
    t2 = time.perf_counter()
    evidence = [Evidence(i + 1, b, StepKind.OBJECT, engine.decode_text(texts[i], skip_special=True))
                for i, b in enumerate(regions)]
    engine.append(conv, prompts.synthesis_prompt(question, evidence, convention))
    for _ in engine.generate(conv, work["synthesis"], min_new_tokens=work["synthesis"]):
        pass
    engine.append(conv, prompts.END_OF_MESSAGE)
    t3 = time.perf_counter()
    out.update(reasoning=t1 - t0, evidence=t2 - t1, synthesis=t3 - t2, total=t3 - t0)
    return out


def decode_ms_per_token(engine: Engine, image: Image.Image, tokens: int = 256) -> float:
    """Steady-state decode of one conversation after a ~1.5k-token prefix."""
    conv = engine.start_conversation(image, prompts.conversation_head())
    engine.append(conv, prompts.reasoning_prompt(QUESTION, 6, boxes.REL1000))
    stream = engine.generate(conv, tokens + 16, min_new_tokens=tokens + 16)
    for _ in range(16):          # prefill and the first steps are not decode throughput
        next(stream)
    sync()
    t0 = time.perf_counter()
    for _ in stream:
        pass
    sync()
    engine.end_conversation(conv)
    return (time.perf_counter() - t0) / tokens * 1e3


@torch.inference_mode()
def graph_replay_ms(engine: Engine, replays: int = 200) -> float:
    """GPU time of one captured decode step (batch 1, 4096 columns), no host work between."""
    bucket = engine.static.bucket(1, 4096)
    bucket.write.fill_(1600)
    bucket.positions.fill_(1600)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    bucket.graph.replay()
    start.record()
    for _ in range(replays):
        bucket.graph.replay()
        bucket.write.fill_(1600)       # stay inside the buffer
    end.record()
    sync()
    return start.elapsed_time(end) / replays


@torch.inference_mode()
def profile_step(engine: Engine, top: int = 14) -> str:
    """Kernel time breakdown of one decode step (compiled layers, not replayed as a graph)."""
    from torch.profiler import ProfilerActivity, profile
    bucket = engine.static.bucket(1, 4096)
    bucket.write.fill_(1600)
    bucket._step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            bucket.write.fill_(1600)
            bucket._step()
        sync()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def captions_seconds(engine: Engine, image: Image.Image, n: int, tokens: int = 48) -> float:
    crops = [boxes.crop(image, b, 0.0) for b in region_boxes(n)]
    before, after = prompts.crop_head()
    heads = [(before, after + prompts.crop_instruction(StepKind.OBJECT, "x"))] * n
    sync()
    t0 = time.perf_counter()
    for _ in engine.generate_batch(crops, heads, tokens, 448 * 448, min_new_tokens=tokens):
        pass
    sync()
    return time.perf_counter() - t0


def median_of(fn, repeats: int):
    values = [fn() for _ in range(repeats)]
    return statistics.median(values), values


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2.5-vl-3b")
    parser.add_argument("--out", default="benchmarks/out/gpu_pipeline.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the kernel breakdown of a decode step")
    parser.add_argument("--device", default="cuda", help="cpu: a functional check of this script only")
    parser.add_argument("--tokens-scale", type=float, default=1.0, help="scale token counts (cpu check)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.tokens_scale != 1.0:
        for work in (W1, W2):
            for k in ("reasoning", "evidence", "synthesis"):
                work[k] = max(2, int(work[k] * args.tokens_scale))
    result = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "shape": args.shape,
              "workloads": {"W1": W1, "W2": W2}, "image": IMAGE_SIZE}
    result["bandwidth_gbps"] = bandwidth_floor_gbps() if DEVICE == "cuda" else 10.0

    t = time.perf_counter()
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    lm = loaded_random_model(args.shape, DEVICE, dtype, max_pixels=MAX_PIXELS)
    result["build_seconds"] = time.perf_counter() - t
    result["lm_decode_bytes"] = lm_decode_bytes(lm.model)
    result["floor_ms_per_token"] = result["lm_decode_bytes"] / (result["bandwidth_gbps"] * 1e9) * 1e3
    image = test_image()
    base = {"model.device": DEVICE, "model.dtype": str(dtype).removeprefix("torch."), "image.max_pixels": MAX_PIXELS,
            "cache.kv_cache_mb": 16384.0, "cache.vision_cache_mb": 4096.0}
    eager = Engine(lm, load_config(None, dict(base, **{"model.compile": False})))
    fast = Engine(lm, load_config(None, dict(base, **{"model.compile": True, "model.warmup": False})))
    t = time.perf_counter()
    fast.static.warm_up([(1, 2048), (1, 3072), (1, 4096), (1, 512), (2, 512), (8, 512)])
    result["warmup_seconds"] = time.perf_counter() - t
    print(f"built in {result['build_seconds']:.1f}s, warm-up {result['warmup_seconds']:.1f}s, "
          f"floor {result['floor_ms_per_token']:.2f} ms/token at {result['bandwidth_gbps']:.0f} GB/s", flush=True)

    # Decode speed, side by side.
    result["decode_ms_eager"] = decode_ms_per_token(eager, image, 64)
    result["decode_ms_static"], _ = median_of(lambda: decode_ms_per_token(fast, image, 256), args.repeats)
    print(f"decode ms/token: eager {result['decode_ms_eager']:.2f}, static+graphs {result['decode_ms_static']:.2f}",
          flush=True)
    if DEVICE == "cuda":
        result["graph_replay_ms"] = graph_replay_ms(fast)
        print(f"graph replay alone: {result['graph_replay_ms']:.2f} ms/step", flush=True)
        if args.profile:
            table = profile_step(fast)
            print(table, flush=True)
            result["profile"] = table

    # Six captions vs one, batched; the vision cache is off so every crop is encoded, as new
    # regions are in a real turn.
    fast.vision.enabled = False
    captions_seconds(fast, image, 6)          # warm
    result["captions_1_s"], _ = median_of(lambda: captions_seconds(fast, image, 1), args.repeats)
    result["captions_6_s"], _ = median_of(lambda: captions_seconds(fast, image, 6), args.repeats)
    fast.vision.enabled = True

    # The engine: W1 cold (new image content each repeat: nothing cached), then W2 warm.
    runs = []
    for r in range(args.repeats):
        img = image.copy()
        img.putpixel((r, 0), (r, r, r))      # new content -> vision cache miss, fresh prefill
        fast.vision.clear()                  # every crop and the image are encoded afresh
        conv = fast.start_conversation(img, prompts.conversation_head())
        w1 = engine_turn(fast, conv, QUESTION, W1, img)
        fast.vision.clear()                  # W2's regions count as new crops too
        w2 = engine_turn(fast, conv, FOLLOW_UP, W2, img)
        fast.end_conversation(conv)
        runs.append({"W1": w1, "W2": w2})
        print(f"engine run {r}: W1 {w1['total']:.2f}s (ttft {w1['ttft'] * 1e3:.0f} ms), "
              f"W2 {w2['total']:.2f}s (ttft {w2['ttft'] * 1e3:.0f} ms)", flush=True)
    result["engine_runs"] = runs
    for w in ("W1", "W2"):
        result[f"engine_{w}"] = {k: statistics.median(run[w][k] for run in runs) for k in runs[0][w]}

    if not args.skip_naive:
        crop_boxes = region_boxes(6)
        naive = {}
        for w, work in (("W1", W1), ("W2", W2)):
            t = naive_turn(lm, image, QUESTION if w == "W1" else FOLLOW_UP, reasoning_tokens=work["reasoning"],
                           evidence_tokens=work["evidence"], synthesis_tokens=work["synthesis"],
                           crop_boxes=crop_boxes[:work["regions"]], max_pixels=MAX_PIXELS, crop_padding=0.0)
            naive[w] = t["seconds"]
            print(f"naive {w}: {t['seconds']}", flush=True)
        result["naive"] = naive

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    floor = result["floor_ms_per_token"]
    print("\n| measure | value |\n|---|---|")
    print(f"| device | {result['device']} |")
    print(f"| bandwidth (copy) | {result['bandwidth_gbps']:.0f} GB/s |")
    print(f"| floor | {floor:.2f} ms/token |")
    print(f"| decode eager | {result['decode_ms_eager']:.2f} ms/token ({result['decode_ms_eager'] / floor:.1f}x floor) |")
    print(f"| decode static+graphs | {result['decode_ms_static']:.2f} ms/token ({result['decode_ms_static'] / floor:.2f}x floor) |")
    if "graph_replay_ms" in result:
        print(f"| graph replay alone | {result['graph_replay_ms']:.2f} ms/step ({result['graph_replay_ms'] / floor:.2f}x floor) |")
    print(f"| 6 captions / 1 caption | {result['captions_6_s']:.3f} / {result['captions_1_s']:.3f} s "
          f"= {result['captions_6_s'] / result['captions_1_s']:.2f}x |")
    for w in ("W1", "W2"):
        e = result[f"engine_{w}"]
        line = f"| engine {w} | {e['total']:.2f} s (1+2 {e['reasoning']:.2f}, 3 {e['evidence']:.2f}, 4 {e['synthesis']:.2f}; ttft {e['ttft'] * 1e3:.0f} ms)"
        if "naive" in result:
            n = result["naive"][w]
            line += f"; naive {n['total']:.2f} s ({n['total'] / e['total']:.1f}x slower)"
        print(line + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
