"""Issue 14 item 5: bitsandbytes 8-bit / 4-bit against bf16, and whether a weight-only int8 GEMV
could beat bf16 inside the compiled step. One process per shape, arms side by side.

    python3 benchmarks/gpu_quant.py --shape qwen2.5-vl-3b --out q3b.json
    python3 benchmarks/gpu_quant.py --shape qwen2.5-vl-7b --out q7b.json

The random-weight model of the real shape (bf16, the family's real tokenizer) is saved as a
checkpoint folder once, then every arm loads it the way a user's `--model FOLDER` does
(`corgi.engine.loading.load_model`, `model.quantization: none | 8bit | 4bit`):
  bf16 compiled   the engine's static step (compiled, CUDA graphs): what bf16 users get
  bf16 eager      the engine's HF decode loop (the path quantized models take)
  8bit / 4bit     bitsandbytes LLM.int8 / NF4 (compute in bf16), HF decode loop
Per arm: weight memory after load, peak memory of a W1 turn, decode ms/token after the ~1.5k
token prefix (as benchmarks/gpu_pipeline.py), W1 through ChatSession with scripted phase outputs.
A W1 that would take over --max-w1-s at the arm's measured decode speed is skipped (said so).

Weight-only int8 GEMV (the candidate for the compiled step): per linear shape of the model, bf16
cuBLAS, the dequantise-then-F.linear under torch.compile, and an int8 Triton GEMV
(benchmarks/gemv_kernel.gemv_w8, best of a small block-size sweep), each as a CUDA graph over
rotating weight copies (benchmarks/gpu_gemv.graph_ms).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import gpu_pipeline as gp  # noqa: E402
from benchmarks.gpu_gemv import graph_ms  # noqa: E402
from benchmarks.shapes import build_random_model, family_of  # noqa: E402
from corgi.config import load_config  # noqa: E402
from corgi.engine.loading import load_model  # noqa: E402
from corgi.pipeline import ChatSession  # noqa: E402

LINEARS = {   # (N, K) of the static step's fused weights
    "qwen2.5-vl-3b": {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (22016, 2048), "down": (2048, 11008)},
    "qwen3.5-4b": {"in_proj": (12352, 2560), "o": (2560, 4096), "gate_up": (18432, 2560), "down": (2560, 9216)},
    "qwen2.5-vl-7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
}


@torch.inference_mode()
def int8_gemv_arms(shape: str, calls: int = 32) -> dict:
    from benchmarks import gemv_kernel
    import triton
    linear_bf16 = torch.compile(lambda x, w: F.linear(x, w))
    linear_dequant = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s.to(x.dtype))
    rows = {}
    for name, (n, k) in LINEARS[shape].items():
        copies = max(2, min(8, int(400e6 // (n * k * 2)) or 2))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        qs = [gemv_kernel.quantize_int8(w) for w in ws]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ ws[0].float().T
        row = {"N": n, "K": k, "bf16_MB": n * k * 2 / 1e6}
        row["cublas_bf16_ms"] = graph_ms(lambda i: F.linear(x, ws[i % copies]), calls)
        row["compiled_bf16_ms"] = graph_ms(lambda i: linear_bf16(x, ws[i % copies]), calls)
        try:
            row["compiled_dequant_int8_ms"] = graph_ms(lambda i: linear_dequant(x, *qs[i % copies]), calls)
        except Exception as exc:        # noqa: BLE001 - report, keep the other arms
            row["compiled_dequant_int8_error"] = f"{type(exc).__name__}: {exc}"[:300]
        best = None
        for bn, bk, warps in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8)):
            if bk > triton.next_power_of_2(k):
                continue
            fn = lambda i: gemv_kernel.gemv_w8(x, *qs[i % copies], block_n=bn, block_k=bk, warps=warps)  # noqa: E731
            try:
                ms = graph_ms(fn, calls)
            except Exception as exc:    # noqa: BLE001 - a config the compiler refuses
                print(f"  skip {bn},{bk},{warps}: {type(exc).__name__}", flush=True)
                continue
            if best is None or ms < best[0]:
                best = (ms, bn, bk, warps)
        row["triton_int8_ms"], row["triton_int8_config"] = best[0], best[1:]
        got = gemv_kernel.gemv_w8(x, *qs[0], block_n=best[1], block_k=best[2], warps=best[3])
        row["triton_int8_rel_err"] = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        row["triton_int8_vs_cublas_bf16"] = row["cublas_bf16_ms"] / row["triton_int8_ms"]
        rows[name] = row
        print(f"{name:8s} {n:6d}x{k:5d}  cuBLAS bf16 {row['cublas_bf16_ms'] * 1e3:6.1f} us  compiled bf16 "
              f"{row['compiled_bf16_ms'] * 1e3:6.1f}  compiled dequant int8 "
              f"{row.get('compiled_dequant_int8_ms', float('nan')) * 1e3:6.1f}  Triton int8 "
              f"{row['triton_int8_ms'] * 1e3:6.1f} {best[1:]} ({row['triton_int8_vs_cublas_bf16']:.2f}x, "
              f"err {row['triton_int8_rel_err']:.1e})", flush=True)

    return rows


@torch.inference_mode()
def int8_rows_arms(shape: str, calls: int = 16, ms=(2, 6, 16, 32)) -> dict:
    """Several rows at once (phase-3 batches, jump-forward chunks): cuBLAS bf16 against the
    engine's `_int8_gemm_rows` over a sweep of its tile settings (int8_kernel.ROWS_CONFIG)."""
    from corgi.engine import int8_kernel
    from corgi.engine.int8_weights import quantize
    configs = [dict(block_n=bn, block_k=bk, warps=4, stages=st)
               for bn, bk, st in itertools.product((16, 32, 64), (64, 128, 256), (3, 4))]
    table = {}
    try:
        for name, (n, k) in LINEARS[shape].items():
            copies = max(2, min(8, int(400e6 // (n * k * 2)) or 2))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            qs = [quantize(w) for w in ws]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"cublas_bf16_ms": graph_ms(lambda i: F.linear(x, ws[i % copies]), calls)}
                for c in configs:
                    int8_kernel.ROWS_CONFIG.update(c)
                    try:
                        t = graph_ms(lambda i: int8_kernel.int8_linear(x, qs[i % copies].q, qs[i % copies].scale), calls)
                    except Exception as exc:   # noqa: BLE001 - a config the compiler refuses
                        print(f"  skip {c}: {type(exc).__name__}", flush=True)
                        continue
                    row["{block_n},{block_k},{stages}".format(**c)] = t
                int8_kernel.ROWS_CONFIG.clear()
                row["engine_ms"] = graph_ms(lambda i: int8_kernel.int8_linear(x, qs[i % copies].q, qs[i % copies].scale), calls)
                best = min((v, key) for key, v in row.items() if key not in ("cublas_bf16_ms", "engine_ms"))
                row["best"] = best[1]
                row["best_vs_cublas_bf16"] = row["cublas_bf16_ms"] / best[0]
                table[f"{name} M={m}"] = row
                print(f"{name:8s} M={m:2d} cuBLAS bf16 {row['cublas_bf16_ms'] * 1e3:6.1f} us  int8 rows best "
                      f"{best[0] * 1e3:6.1f} ({best[1]}) {row['best_vs_cublas_bf16']:.2f}x  engine's rows_config "
                      f"{row['engine_ms'] * 1e3:6.1f}",
                      flush=True)
    finally:
        int8_kernel.ROWS_CONFIG.clear()
    return table


@torch.inference_mode()
def check_int8_kernel() -> dict:
    """The engine's int8 kernel (corgi/engine/int8_kernel.py) against the torch arithmetic that
    the CPU tests check (dequantise, float32 matmul), at 1 and 5 rows, with and without bias."""
    from corgi.engine import int8_kernel
    from corgi.engine.int8_weights import quantize
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for rows, n, k, bias, dtype in ((1, 2560, 2048, True, torch.bfloat16), (5, 2048, 11008, False, torch.bfloat16),
                                    (12, 22016, 2048, True, torch.bfloat16), (40, 2560, 2048, True, torch.bfloat16),
                                    (5, 2048, 11008, True, torch.float32)):
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        x = torch.randn(rows, k, device="cuda", generator=gen, dtype=dtype)
        b = torch.randn(n, device="cuda", generator=gen, dtype=dtype) if bias else None
        q = quantize(w)
        ref = x.float() @ q.q.float().T * q.scale + (b.float() if bias else 0)
        got = int8_kernel.int8_linear(x, q.q, q.scale, b).float()
        out[f"{rows}x{n}x{k} {str(dtype)[6:]}"] = ((got - ref).abs().max() / ref.abs().max()).item()
    return out


def save_checkpoint(shape: str, folder: Path, geo: "gp.Geometry") -> None:
    model, tokenizer, processor = build_random_model(shape, "cuda", torch.bfloat16, max_pixels=geo.max_pixels)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def run_arm(arm: str, folder: Path, geo, image, work: dict, args) -> dict:
    quantization = {"bf16-compiled": "none", "bf16-eager": "none", "8bit": "8bit", "4bit": "4bit",
                    "int8-decode": "int8-decode"}[arm]
    compiled = arm in ("bf16-compiled", "int8-decode")
    config = load_config(None, {
        "model.id": str(folder), "model.device": "cuda", "model.dtype": "bfloat16",
        "model.quantization": quantization, "model.compile": compiled, "model.warmup": False,
        "image.max_pixels": geo.max_pixels, "cache.kv_cache_mb": 16384.0, "cache.vision_cache_mb": 4096.0,
        "pipeline.structured_output": True, "pipeline.temperature": 0.0, "pipeline.max_steps": 6,
        "pipeline.crop_padding": 0.0, "pipeline.crop_max_pixels": geo.crop ** 2})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    lm = load_model(config.model, config.image)
    row = {"load_s": time.perf_counter() - t, "weights_gib": (torch.cuda.memory_allocated() - before) / 2 ** 30}
    engine = gp.TimedEngine(lm, config)
    row["static_decode"] = engine.static is not None
    regions = [(b.x1, b.y1, b.x2, b.y2) for b in geo.regions(work["regions"])]
    grid = engine.image_grid(image, engine.config.image.min_pixels, geo.max_pixels)
    convention = gp.boxes.convention_for(lm.family.box_style, (grid[2] * lm.patch_size, grid[1] * lm.patch_size))
    work = dict(work, reasoning=max(work["reasoning"], gp.common.reasoning_script_min_tokens(
        engine, convention, work["regions"], regions) + 2), synthesis=max(
        work["synthesis"], gp.common.synthesis_script_min_tokens(engine, convention) + 2))
    row["workload"] = work
    if compiled:
        t = time.perf_counter()
        engine.static.warm_up([(1, 2048), (1, 3072), (1, 4096), (1, 512), (2, 512), (8, 512)])
        row["warmup_s"] = time.perf_counter() - t
    tokens = args.decode_tokens if compiled else args.eager_tokens
    gp.decode_ms_per_token(engine, image, 8)                           # first-use costs
    runs = [gp.decode_ms_per_token(engine, image, tokens)[0] for _ in range(3)]
    row["decode_ms_per_token"], row["decode_runs"] = statistics.median(runs), runs
    w1_tokens = work["reasoning"] + work["evidence"] + work["synthesis"]     # phase 3 rows step together
    estimate = row["decode_ms_per_token"] * w1_tokens / 1e3
    if estimate > args.max_w1_s:
        row["W1"] = f"skipped: ~{estimate:.0f} s at {row['decode_ms_per_token']:.1f} ms/token (> --max-w1-s {args.max_w1_s})"
    else:
        torch.cuda.reset_peak_memory_stats()
        turns = []
        for r in range(args.repeats if compiled else 1):
            img = image.copy()
            img.putpixel((r, 0), (r, r, r))
            engine.vision.clear()
            session = ChatSession(engine, img)
            turns.append(gp.engine_turn(engine, session, gp.QUESTION, work, geo))
            session.close()
        row["W1_runs"] = turns
        row["W1"] = {k: statistics.median(t[k] for t in turns) for k in ("ttft", "reasoning", "evidence", "synthesis", "total")}
        row["peak_gib_W1"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"{arm:14s} " + json.dumps({k: v for k, v in row.items() if k not in ("W1_runs",)}, default=str), flush=True)
    del engine, lm
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen2.5-vl-3b", help="benchmarks.shapes name (GEMV arms: "
                    + ", ".join(LINEARS) + ")")
    ap.add_argument("--arms", default="bf16-compiled,bf16-eager,8bit,4bit")
    ap.add_argument("--folder", default="/tmp/corgi-quant-ckpt")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--eager-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="W1 runs of the compiled arm (the others: 1)")
    ap.add_argument("--max-w1-s", type=float, default=120.0)
    ap.add_argument("--skip-gemv", action="store_true")
    ap.add_argument("--rows-sweep", action="store_true", help="the several-row int8 kernel's tile sweep")
    ap.add_argument("--kernels-only", action="store_true", help="stop after the kernel checks and sweeps")
    ap.add_argument("--out", default="benchmarks/out/gpu_quant.json")
    args = ap.parse_args()
    import bitsandbytes
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": args.shape,
              "bitsandbytes": bitsandbytes.__version__, "workload": gp.W1, "arms": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out.write_text(json.dumps(result, indent=1, default=str))   # noqa: E731  (after every arm)
    result["int8_kernel_check"] = check_int8_kernel()
    print("int8 kernel against torch:", result["int8_kernel_check"], flush=True)
    if not args.skip_gemv and args.shape in LINEARS:
        result["int8_gemv"] = int8_gemv_arms(args.shape)
        save()
    if args.rows_sweep and args.shape in LINEARS:
        result["int8_rows"] = int8_rows_arms(args.shape)
        save()
    if args.kernels_only:
        return 0
    geo = gp.Geometry(1.0)
    image = gp.test_image(geo.image_size)
    folder = Path(args.folder) / args.shape
    t = time.perf_counter()
    save_checkpoint(args.shape, folder, geo)
    result["save_s"] = time.perf_counter() - t
    family = family_of(args.shape)
    work = dict(gp.W1)
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        try:
            result["arms"][arm] = run_arm(arm, folder, geo, image, work, args)
        except Exception as exc:        # noqa: BLE001 - an arm that fails is reported, the rest run
            result["arms"][arm] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{arm}: {result['arms'][arm]['error']}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        save()
    result["family"] = family.name
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
