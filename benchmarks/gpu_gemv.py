"""Batch-1 GEMV at the real checkpoints' linear shapes: cuBLAS (F.linear) against the Triton kernel
(benchmarks/gemv_kernel.py, a candidate not wired into the step) and a sweep of its block sizes, side by side in one process.

    python3 benchmarks/gpu_gemv.py [--out FILE]

Each arm is captured as a CUDA graph of `--calls` GEMVs over `--copies` different weight copies
(more bytes than the L2 cache holds, as in a decode step where every layer has its own weights),
so the times are GPU time without launch overhead from Python. Bandwidth = weight bytes / time,
against a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {   # (N, K) of nn.Linear weights, fused as the static step fuses them
    "qwen2.5-vl-3b": {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (22016, 2048),
                      "down": (2048, 11008), "lm_head": (151936, 2048)},
    "qwen3.5-4b": {"in_proj": (12352, 2560), "qkv_gated": (10240, 2560), "o": (2560, 4096),
                   "gate_up": (18432, 2560), "down": (2560, 9216), "lm_head": (248320, 2560)},
    "qwen3.5-9b": {"in_proj": (16448, 4096), "qkv_gated": (10240, 4096), "o": (4096, 4096),
                   "gate_up": (24576, 4096), "down": (4096, 12288), "lm_head": (248320, 4096)},
}


def graph_ms(fn, calls: int, replays: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (replays * calls))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = graph_ms(lambda i: b.copy_(a), calls=5)
    return 2 * a.numel() / ms / 1e6        # GB/s, read + write


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from benchmarks import gemv_kernel
    import triton

    copy = copy_bandwidth()
    print(f"copy bandwidth {copy:.0f} GB/s")
    results = {"device": torch.cuda.get_device_name(), "copy_gbps": copy, "shapes": {}}
    sweep = list(itertools.product((4, 8, 16), (256, 512, 1024), (4, 8)))
    for model, layers in SHAPES.items():
        for name, (n, k) in layers.items():
            copies = max(2, min(args.copies, int(400e6 // (n * k * 2)) or 2))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ ws[0].float().T)
            got = gemv_kernel.gemv(x, ws[0])
            err = (got.float() - ref).abs().max().item() / ref.abs().max().item()
            bytes_ = n * k * 2
            row = {"N": n, "K": k, "rel_err": err}
            row["cublas_ms"] = graph_ms(lambda i: F.linear(x, ws[i % copies]), args.calls)
            row["triton_ms"] = graph_ms(lambda i: gemv_kernel.gemv(x, ws[i % copies]), args.calls)
            best = None
            for bn, bk, warps in sweep:
                if bk > max(128, triton.next_power_of_2(k)):
                    continue
                grid = (triton.cdiv(n, bn),)
                fn = lambda i: gemv_kernel._gemv[grid](x, ws[i % copies], ws[i % copies], out, n, K=k,  # noqa: E731
                                                      HAS_BIAS=False, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
                try:
                    ms = graph_ms(fn, args.calls)
                except Exception as exc:          # a config the compiler refuses
                    print(f"  skip {bn},{bk},{warps}: {type(exc).__name__}")
                    continue
                if best is None or ms < best[0]:
                    best = (ms, bn, bk, warps)
            row["best_ms"], row["best_config"] = best[0], best[1:]
            for arm in ("cublas_ms", "triton_ms", "best_ms"):
                row[arm.replace("_ms", "_pct_copy")] = 100 * bytes_ / row[arm] / 1e6 / copy
            results["shapes"][f"{model}/{name}"] = row
            print(f"{model:14s} {name:10s} {n:6d}x{k:5d} {bytes_ / 1e6:7.1f} MB  cublas {row['cublas_ms'] * 1e3:7.1f} us "
                  f"({row['cublas_pct_copy']:4.1f}%)  triton {row['triton_ms'] * 1e3:7.1f} us ({row['triton_pct_copy']:4.1f}%)"
                  f"  best {row['best_ms'] * 1e3:7.1f} us ({row['best_pct_copy']:4.1f}%) {best[1:]}  err {err:.1e}",
                  flush=True)
            del ws
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
