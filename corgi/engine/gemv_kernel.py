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


# What a fused GEMV does to its input before the product (a PROLOGUE constexpr of the kernel):
# the decode step's RMSNorms and SwiGLU, each otherwise its own small kernel per layer.
PROLOGUES = {"none": 0, "rms": 1, "zc-rms": 2, "swiglu": 3}


class TunedWeight(NamedTuple):
    """A linear weight whose one-row product runs as the kernel with these block sizes; prologue
    and residual: the norm / SwiGLU before it and the residual add after it that the kernel
    does too (`fused_gemv`; "none" and False: the plain product, `gemv`)."""
    weight: torch.Tensor      # [N, K], the model's own tensor
    block_n: int
    block_k: int
    warps: int
    prologue: str = "none"
    residual: bool = False


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, out_ptr, nw_ptr, r_ptr, N, eps, K: tl.constexpr, HAS_BIAS: tl.constexpr,
          PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Every rounding to the model dtype below is one the torch ops make (norms.py, F.silu(g) * u,
    # h + linear(...)), so the fused product rounds where the unfused one does.
    pid = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if PROLOGUE == 1 or PROLOGUE == 2:
        # The norm's statistic over the whole row of x, recomputed by every program: x is K
        # elements in L2, the weights' BLOCK_N x K rows are what streams from memory.
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            squares += xk * xk
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        if PROLOGUE == 3:                       # x = [gate | up], 2K long: silu(gate) * up
            g = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
            x = ((g * tl.sigmoid(g)).to(dtype).to(tl.float32) * u).to(dtype).to(tl.float32)
        else:
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if PROLOGUE == 1:                   # Qwen2RMSNorm: cast, then * w
                nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                x = ((x * rstd).to(dtype).to(tl.float32) * nw).to(dtype).to(tl.float32)
            if PROLOGUE == 2:                   # Qwen3_5RMSNorm: * (1 + w) in float32, then cast
                nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                x = (x * rstd * (1.0 + nw)).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0, eviction_policy="evict_first").to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        y = y.to(dtype).to(tl.float32) + tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(dtype), mask=row_ok)


@triton_op("corgi::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int,
         warps: int) -> torch.Tensor:
    """x [K] (one row, contiguous); weight [N, K] contiguous; bias [N] or None -> [N] in x's dtype."""
    n, k = weight.shape
    out = torch.empty((n,), device=x.device, dtype=x.dtype)
    wrap_triton(_gemv)[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, weight, weight, n, 0.0, K=k,
        HAS_BIAS=bias is not None, PROLOGUE=0, HAS_RES=False, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps)
    return out


@triton_op("corgi::fused_gemv", mutates_args=())
def fused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm: torch.Tensor | None,
               residual: torch.Tensor | None, eps: float, prologue: int, block_n: int, block_k: int,
               warps: int) -> torch.Tensor:
    """residual + (prologue(x) W^T + bias) -> [N] in x's dtype, one kernel. x [K] ([2K]: gate | up
    for swiglu); norm [K] (the RMSNorm's weight, rms / zc-rms); residual [N] or None."""
    n, k = weight.shape
    out = torch.empty((n,), device=x.device, dtype=x.dtype)
    wrap_triton(_gemv)[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, norm if norm is not None else weight,
        residual if residual is not None else weight, n, eps, K=k, HAS_BIAS=bias is not None,
        PROLOGUE=prologue, HAS_RES=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


def one_row_linear(x: torch.Tensor, weight: TunedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a TunedWeight: the kernel for one row on CUDA, cuBLAS otherwise. x [..., K]."""
    w = weight.weight
    if x.is_cuda and x.numel() == w.shape[1]:
        y = gemv(x.reshape(-1).contiguous(), w, bias, weight.block_n, weight.block_k, weight.warps)
        return y.reshape(*x.shape[:-1], -1)
    return F.linear(x, w, bias)


def fusable(x: torch.Tensor, weight, prologue: str, residual: bool) -> bool:
    """Whether `weight` was tuned for exactly this fused op and x is the one CUDA row it takes."""
    if not (isinstance(weight, TunedWeight) and weight.prologue == prologue and weight.residual == residual):
        return False
    width = weight.weight.shape[1] * (2 if prologue == "swiglu" else 1)
    return x.is_cuda and x.numel() == width


def fused_linear(x: torch.Tensor, weight: TunedWeight, bias: torch.Tensor | None = None,
                 norm: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 eps: float = 0.0) -> torch.Tensor:
    """The fused op for one row (see `fusable`). x [..., K or 2K] -> [..., N]."""
    y = fused_gemv(x.reshape(-1).contiguous(), weight.weight, bias, norm,
                   residual.reshape(-1).contiguous() if residual is not None else None, eps,
                   PROLOGUES[weight.prologue], weight.block_n, weight.block_k, weight.warps)
    return y.reshape(*x.shape[:-1], -1)


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
    """Wraps a linear weight as a TunedWeight where a kernel beats cuBLAS at its shape; the
    timings per (N, K) and fused op are kept in `report` (microseconds), one measurement each.

    `prologue` / `residual`: what the step does around this product (an RMSNorm or SwiGLU before
    it, a residual add after it). The fused kernel is kept where it alone beats cuBLAS alone by
    MARGIN (conservative: the unfused op also pays the norm's own kernel); else the plain kernel
    where it wins; else cuBLAS. The step then runs the unfused ops around what was kept."""

    def __init__(self, fuse: bool = True):
        self.fuse = fuse            # False: time the plain product only (fused ops stay torch ops)
        self.report: dict[str, dict] = {}
        self._plain: dict[tuple, tuple] = {}      # (shape, dtype) -> (cuBLAS us, {config: us})
        self._choice: dict[tuple, TunedWeight | None] = {}

    def __call__(self, weight: torch.Tensor, prologue: str = "none", residual: bool = False):
        if not (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and weight.is_contiguous()):
            return weight
        if not self.fuse:
            prologue, residual = "none", False
        key = (tuple(weight.shape), weight.dtype, prologue, residual)
        if key not in self._choice:
            self._choice[key] = self._measure(weight, prologue, residual)
        choice = self._choice[key]
        return weight if choice is None else choice._replace(weight=weight)

    @torch.inference_mode()
    def _measure(self, weight: torch.Tensor, prologue: str, residual: bool) -> TunedWeight | None:
        n, k = weight.shape
        copies = [weight] + [weight.clone() for _ in range(min(15, -(-ROTATION_BYTES // weight_bytes(weight)) - 1))]
        x = torch.randn(k, device=weight.device, dtype=weight.dtype)
        shape = (tuple(weight.shape), weight.dtype)
        if shape not in self._plain:
            cublas = graph_us([lambda w=w: F.linear(x[None], w) for w in copies])
            self._plain[shape] = cublas, {config: graph_us([lambda w=w, c=config: gemv(x, w, None, *c) for w in copies])
                                          for config in CONFIGS}
        cublas, plain = self._plain[shape]
        best = min(plain, key=plain.get)
        entry = {"cublas_us": round(cublas, 2), "triton_us": round(plain[best], 2), "config": list(best)}
        choice = TunedWeight(weight, *best) if plain[best] < cublas * (1 - MARGIN) else None
        if prologue != "none" or residual:
            wide = torch.randn(k * (2 if prologue == "swiglu" else 1), device=weight.device, dtype=weight.dtype)
            norm = torch.randn(k, device=weight.device, dtype=weight.dtype)
            res = torch.randn(n, device=weight.device, dtype=weight.dtype) if residual else None
            code = PROLOGUES[prologue]
            fused = {config: graph_us([lambda w=w, c=config: fused_gemv(wide, w, None, norm, res, 1e-6, code, *c)
                                       for w in copies]) for config in CONFIGS}
            top = min(fused, key=fused.get)
            entry.update(fused=prologue + ("+residual" if residual else ""), fused_us=round(fused[top], 2),
                         fused_config=list(top))
            if fused[top] < cublas * (1 - MARGIN):
                choice = TunedWeight(weight, *top, prologue=prologue, residual=residual)
        del copies
        entry["chosen"] = ("cublas" if choice is None else "triton" if choice.prologue == "none" and not choice.residual
                           else "fused")
        self.report[f"{n}x{k}" + (f" {entry['fused']}" if "fused" in entry else "")] = entry
        return choice
