"""The vision tower on region crops, 1 against 6 (CUDA): what phase 3's 6/1 caption ratio pays
before the first caption token.

    python3 benchmarks/gpu_vision_crops.py --shape qwen2.5-vl-3b

Two arms side by side in one process, crops at `pipeline.crop_max_pixels`:
- `kept`: the batched-window attention reads the window segments back to the host once per
  `cu_seqlens` tensor (`vision_attention.window_groups`, what the engine runs);
- `per block`: the same attention with the read-back in every block (what it did before: one
  host wait for the GPU per block, so no block's launches overlap the previous block's work).
Each arm: median of `--repeats` tower calls after two untimed ones; the text stack is cut to one
layer (the tower does not touch it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.gpu_pipeline import Geometry, test_image  # noqa: E402
from benchmarks.shapes import loaded_random_model  # noqa: E402
from corgi import boxes  # noqa: E402
from corgi.engine import vision_attention  # noqa: E402
from corgi.engine.vision import VisionEncoder  # noqa: E402


def read_back_in_every_block(cu_seqlens: torch.Tensor):
    if hasattr(cu_seqlens, "_corgi_window_groups"):
        del cu_seqlens._corgi_window_groups
    return KEPT(cu_seqlens)


KEPT = vision_attention.window_groups


def tower_seconds(encoder: VisionEncoder, crops, pixels: int, repeats: int, device: str) -> float:
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        encoder.encode(crops, pixels, pixels)       # cache off: every call runs the tower
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-vl-3b")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--vision-depth", type=int, default=None, help="cpu check: fewer vision blocks")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: a functional check only
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    geo = Geometry(1.0)
    lm = loaded_random_model(args.shape, device, dtype, max_pixels=geo.max_pixels, layers_override=1,
                             vision_depth_override=args.vision_depth)
    encoder = VisionEncoder(lm, cache_bytes=0, enabled=False)
    image = test_image(geo.image_size)
    crops = [boxes.crop(image, b, 0.0) for b in geo.regions(6)]
    pixels = geo.crop ** 2
    print(f"{args.shape} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
          f"crops {[c.size for c in crops]} at most {pixels} px", flush=True)
    rows = {}
    for arm, groups in (("kept", KEPT), ("per block", read_back_in_every_block), ("kept again", KEPT)):
        vision_attention.window_groups = groups
        one = tower_seconds(encoder, crops[:1], pixels, args.repeats, device)
        six = tower_seconds(encoder, crops, pixels, args.repeats, device)
        rows[arm] = (one, six)
        print(f"{arm:>10}: 1 crop {one * 1e3:.1f} ms, 6 crops {six * 1e3:.1f} ms, "
              f"6 - 1 = {(six - one) * 1e3:.1f} ms", flush=True)
    vision_attention.window_groups = KEPT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
