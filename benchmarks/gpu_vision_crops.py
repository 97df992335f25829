"""The vision tower eager against compiled blocks (CUDA): what phase 3's 6/1 caption ratio and
the first turn's image pay before the first token.

    python3 benchmarks/gpu_vision_crops.py --shape qwen2.5-vl-3b

Two arms side by side in one process, on region crops at `pipeline.crop_max_pixels` (1 and 6),
crops of other aspect ratios, and the W1 image:
- `eager`: the tower as the library runs it, with the batched-window attention
  (`vision_attention.varlen_sdpa`), what the engine ran before;
- `compiled`: every block `torch.compile`d in place with dynamic shapes
  (`vision.compile_tower_blocks`, what the engine runs with `model.compile` on CUDA).
Each row: median of `--repeats` tower calls after two untimed ones; the text stack is cut to one
layer (the tower does not touch it). The compiled arm also reports dynamo's graph count after
each input set (a new count after the first set would be a recompile mid-turn) and the largest
difference of its features from the eager arm's.
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

from benchmarks.gpu_pipeline import Geometry, test_image  # noqa: E402
from benchmarks.shapes import loaded_random_model  # noqa: E402
from corgi import boxes  # noqa: E402
from corgi.engine.vision import VisionEncoder, compile_tower_blocks  # noqa: E402


def tower(encoder: VisionEncoder, images, pixels: tuple[int, int], repeats: int, device: str):
    """(median seconds, the last call's features)."""
    times, features = [], None
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        features = encoder.encode(images, *pixels)      # cache off: every call runs the tower
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times), features


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-vl-3b")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--vision-depth", type=int, default=None, help="cpu check: fewer vision blocks")
    parser.add_argument("--image-scale", type=float, default=1.0, help="cpu check: smaller images")
    parser.add_argument("--backend", default="inductor", help="cpu check: aot_eager compiles faster")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: a functional check only
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    geo = Geometry(args.image_scale)
    lm = loaded_random_model(args.shape, device, dtype, max_pixels=geo.max_pixels, layers_override=1,
                             vision_depth_override=args.vision_depth)
    encoder = VisionEncoder(lm, cache_bytes=0, enabled=False)
    image = test_image(geo.image_size)
    crops = [boxes.crop(image, b, 0.0) for b in geo.regions(6)]
    w, h = geo.image_size
    c = geo.crop
    # other aspect ratios: a wide and a tall region, as boxes of real answers give
    odd = [image.crop((0, 0, min(w, 2 * c), c // 2)), image.crop((0, 0, c // 2, min(h, 2 * c)))]
    crop_px = (c * c, c * c)
    sets = {"1 crop": (crops[:1], crop_px), "6 crops": (crops, crop_px),
            "2 other crops": (odd, crop_px), "W1 image": ([image], (3136, geo.max_pixels))}
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{args.shape} on {card}; crops {[im.size for im in crops]} at most {c * c} px; "
          f"other crops {[im.size for im in odd]}; image {image.size}", flush=True)
    rows: dict[str, dict] = {name: {} for name in sets}
    eager_features = {}
    for name, (images, pixels) in sets.items():
        seconds, eager_features[name] = tower(encoder, images, pixels, args.repeats, device)
        rows[name]["eager_ms"] = seconds * 1e3
        print(f"   eager {name:>13}: {seconds * 1e3:7.1f} ms", flush=True)

    from torch._dynamo.utils import counters
    t = time.perf_counter()
    assert compile_tower_blocks(lm.model, backend=args.backend), "the batched-window attention is not in use"
    first = None
    for name, (images, pixels) in sets.items():
        if first is None:       # the compile itself: what the engine's warm-up pays at load
            t = time.perf_counter()
            encoder.encode(images, *pixels)
            if device == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t
            print(f"compiled, first call (the compile): {first:.1f} s", flush=True)
        seconds, features = tower(encoder, images, pixels, args.repeats, device)
        diff = max((a.embeds.float() - b.embeds.float()).abs().max().item()
                   for a, b in zip(features, eager_features[name]))
        scale = max(b.embeds.float().abs().max().item() for b in eager_features[name])
        graphs = counters["stats"]["unique_graphs"]
        rows[name].update(compiled_ms=seconds * 1e3, max_abs_diff=diff, max_abs_eager=scale, graphs_after=graphs)
        print(f"compiled {name:>13}: {seconds * 1e3:7.1f} ms (eager {rows[name]['eager_ms']:.1f}), "
              f"max |diff| {diff:.3g} of values up to {scale:.3g}, dynamo graphs so far {graphs}", flush=True)
    one, six = rows["1 crop"], rows["6 crops"]
    print(f"6 - 1 crops: eager {six['eager_ms'] - one['eager_ms']:.1f} ms, "
          f"compiled {six['compiled_ms'] - one['compiled_ms']:.1f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "device": card, "torch": torch.__version__,
                                         "compile_seconds": first, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
