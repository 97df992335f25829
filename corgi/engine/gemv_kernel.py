"""y = x W^T for one 16-bit row of x (the batch-1 decode step) as one Triton kernel, used for a
weight shape only where it beats cuBLAS on this device (CUDA hosts with Triton).

Why: at batch 1 every linear layer is a GEMV that streams its weight once, and cuBLAS's M=1
kernels leave bandwidth unused at some of Qwen's shapes: on the H200 the best Triton config was
1.1-1.4x cuBLAS on most of them and slower on others, with a different best config per shape
(benchmarks/gpu_gemv.py, results/gemv_h200.json). So the choice is measured, per (N, K), when the
static decoder is built (`GemvTuner`): cuBLAS and each config in CONFIGS timed as the step runs
them, inside a CUDA graph (no launch overhead: timed eagerly, a Triton launch costs more host time
than the kernel takes) over rotating copies of the weight that together exceed the L2 cache (a
decode step streams every weight once); the kernel is kept only when it is at least MARGIN faster.

Each program owns BLOCK_N whole rows of W (nn.Linear layout [N, K]), streams them in BLOCK_K
slices with the x slice in registers and reduces in float32 (no split-K, no atomics: the result
is deterministic). Registered as a `torch.library.triton_op`, so torch.compile keeps it inside the
layer's graph and CUDA graphs capture it. Several rows (batched buckets, chunks) stay on cuBLAS.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# (BLOCK_N, BLOCK_K, num_warps): the configs that won at least one Qwen shape in the H200 sweep.
CONFIGS = ((4, 1024, 4), (4, 1024, 8), (4, 512, 4), (4, 512, 8), (8, 512, 4), (8, 1024, 8),
           (16, 256, 8), (4, 256, 4))
MARGIN = 0.05      # the kernel must be 5% faster than cuBLAS: smaller wins are within timing noise


class TunedWeight(NamedTuple):
    """A linear weight whose one-row product runs as `gemv` with these block sizes."""
    weight: torch.Tensor      # [N, K], the model's own tensor
    block_n: int
    block_k: int
    warps: int


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, out_ptr, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0, eviction_policy="evict_first").to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton_op("corgi::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int,
         warps: int) -> torch.Tensor:
    """x [K] (one row, contiguous); weight [N, K] contiguous; bias [N] or None -> [N] in x's dtype."""
    n, k = weight.shape
    out = torch.empty((n,), device=x.device, dtype=x.dtype)
    wrap_triton(_gemv)[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, K=k, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


def one_row_linear(x: torch.Tensor, weight: TunedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a TunedWeight: the kernel for one row on CUDA, cuBLAS otherwise. x [..., K]."""
    w = weight.weight
    if x.is_cuda and x.numel() == w.shape[1]:
        y = gemv(x.reshape(-1).contiguous(), w, bias, weight.block_n, weight.block_k, weight.warps)
        return y.reshape(*x.shape[:-1], -1)
    return F.linear(x, w, bias)


ROTATION_BYTES = 256 << 20      # weight copies per timing: together several times the H200's 50 MB L2


def weight_bytes(weight: torch.Tensor) -> int:
    return weight.numel() * weight.element_size()


def graph_us(calls, calls_per_graph: int = 48, replays: int = 5) -> float:
    """GPU time of one call, in microseconds: the calls (one GEMV each, on rotating weight
    copies) repeated to calls_per_graph in one CUDA graph, median over replays."""
    rounds = max(1, calls_per_graph // len(calls))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:                       # compile/select kernels outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (rounds * len(calls)))
    del graph
    return sorted(times)[len(times) // 2]


class GemvTuner:
    """Wraps a linear weight as a TunedWeight where the kernel beats cuBLAS at its shape; the
    timings per (N, K) are kept in `report` (microseconds), one measurement per shape."""

    def __init__(self):
        self.report: dict[str, dict] = {}
        self._choice: dict[tuple, tuple | None] = {}

    def __call__(self, weight: torch.Tensor):
        if not (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and weight.is_contiguous()):
            return weight
        key = (tuple(weight.shape), weight.dtype)
        if key not in self._choice:
            self._choice[key] = self._measure(weight)
        config = self._choice[key]
        return weight if config is None else TunedWeight(weight, *config)

    @torch.inference_mode()
    def _measure(self, weight: torch.Tensor) -> tuple | None:
        n, k = weight.shape
        x = torch.randn(k, device=weight.device, dtype=weight.dtype)
        copies = [weight] + [weight.clone() for _ in range(min(15, -(-ROTATION_BYTES // weight_bytes(weight)) - 1))]
        cublas = graph_us([lambda w=w: F.linear(x[None], w) for w in copies])
        timed = {config: graph_us([lambda w=w, c=config: gemv(x, w, None, *c) for w in copies])
                 for config in CONFIGS}
        del copies
        best = min(timed, key=timed.get)
        won = timed[best] < cublas * (1 - MARGIN)
        self.report[f"{n}x{k}"] = {"cublas_us": round(cublas, 2), "triton_us": round(timed[best], 2),
                                   "config": list(best), "chosen": "triton" if won else "cublas"}
        return best if won else None
