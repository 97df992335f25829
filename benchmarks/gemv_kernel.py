"""y = x W^T for one row of x (batch-1 decode) as one Triton kernel (CUDA hosts with Triton).

Why: at batch 1 every linear layer of the decode step is a GEMV that only streams its weight
matrix once; cuBLAS picks GEMM kernels for M=1 that reach ~60-65% of the copy bandwidth on the
H200 at Qwen's shapes (benchmarks/RESULTS.md). This kernel gives each program BLOCK_N whole rows
of W (nn.Linear layout [N, K], row-major), streams them in BLOCK_K slices with x kept in
registers, and reduces in float32: no split-K, no atomics, so the result is deterministic.
Registered as a `torch.library.triton_op`, so torch.compile keeps it inside the layer's graph and
CUDA graphs capture it.

Grid: (cdiv(N, BLOCK_N),). The block sizes per shape come from `config_for`, measured by
`benchmarks/gpu_gemv.py` (H200, results/gemv_h200.json). Not wired into the decode step: see RESULTS.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


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


def config_for(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for W [n, k]: enough programs to fill the GPU several
    times over, and 16-byte loads along K."""
    block_k = 512 if k >= 2048 else 256
    block_n = 8 if n >= 8192 else 4
    return block_n, block_k, 4


@triton_op("corgi::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (or [K]); weight [N, K] contiguous; bias [N] or None -> [1, N] in x's dtype."""
    n, k = weight.shape
    x = x.reshape(-1).contiguous()
    out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    block_n, block_k, warps = config_for(n, k)
    grid = (triton.cdiv(n, block_n),)
    wrap_triton(_gemv)[grid](x, weight, bias if bias is not None else weight, out, n, K=k,
                             HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                             num_warps=warps)
    return out


@triton.jit
def _gemv_w8(x_ptr, w_ptr, s_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_gemv` over int8 weights with one float scale per output row (weight-only int8):
    half the bytes of bf16 streamed, the same float32 reduction."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0, eviction_policy="evict_first").to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: weight [N, K] -> (int8 [N, K], float32 scale [N])."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def gemv_w8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int = 8,
            block_k: int = 1024, warps: int = 4) -> torch.Tensor:
    """x [1, K]; weight int8 [N, K]; scale [N] -> [1, N] in x's dtype (benchmark entry point)."""
    n, k = weight.shape
    out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    _gemv_w8[(triton.cdiv(n, block_n),)](x.reshape(-1), weight, scale, out, n, K=k,
                                         BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out
