"""y = x W^T with W stored as int8 plus one scale per output row, as one Triton kernel (CUDA
hosts with Triton). Batch-1 decode streams every weight once per token, so halving the bytes is
what speeds it up: measured on the H200 against cuBLAS bf16 at the Qwen2.5-VL-3B/7B step's
fused shapes, 1.28-1.84x per GEMV (benchmarks/gpu_quant.py, results/quant_qwen25_*_h200.json),
where torch.compile's dequantise-then-matmul is 2-3x *slower* than bf16 (it materialises W).

Each program owns BLOCK_N whole rows of W for one row of x, streams them in BLOCK_K slices with
the x slice in registers, and reduces in float32 (no split-K, no atomics: deterministic).
Registered as a `torch.library.triton_op`, so torch.compile keeps it inside the layer's graph and
CUDA graphs capture it. One row (the decode step): grid (cdiv(N, BLOCK_N), 1). Several rows: up
to 8 of them share each weight tile (`_int8_gemm_rows`), so a batch or a chunk does not read
the weights once per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _int8_gemv(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, m = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + m * K + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0, eviction_policy="evict_first").to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _int8_gemm_rows(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A few rows of x at once (batched captions, jump-forward chunks): each weight tile is read
    once for BLOCK_M rows instead of once per row."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, m_ok = rows < N, ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + ms[:, None] * K + cols[None, :], mask=m_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)                                   # [BM, BK]
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0, eviction_policy="evict_first").to(tl.float32)      # [BN, BK]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)                     # [BM, BN]
    y = acc * tl.load(s_ptr + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + ms[:, None] * N + rows[None, :], y.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & row_ok[None, :])


def block_sizes(k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the H200 sweep's best configs were BLOCK_N 4-8 with 512-2048
    columns a slice; longer rows (the MLP down projection) take the longer slices."""
    return (4, 1024, 4) if k >= 8192 else (4, 512, 4)


@triton_op("corgi::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (contiguous); weight int8 [N, K]; scale float32 [N]; bias [N] or None -> [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bias_arg = bias if bias is not None else scale
    if m == 1:
        block_n, block_k, warps = block_sizes(k)
        wrap_triton(_int8_gemv)[(triton.cdiv(n, block_n), 1)](
            x, weight, scale, bias_arg, out, n, K=k, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    else:
        block_m = min(triton.next_power_of_2(m), 8)
        wrap_triton(_int8_gemm_rows)[(triton.cdiv(n, 4), triton.cdiv(m, block_m))](
            x, weight, scale, bias_arg, out, m, n, K=k, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=4, BLOCK_K=128, num_warps=4)
    return out
