"""y = x W^T with W stored as int8 plus one scale per output row, as one Triton kernel (CUDA
hosts with Triton). Batch-1 decode streams every weight once per token, so halving the bytes is
what speeds it up: measured on the H200 against cuBLAS bf16 at the Qwen2.5-VL-3B/7B step's
fused shapes, 1.28-1.84x per GEMV (benchmarks/gpu_quant.py, results/quant_qwen25_*_h200.json),
where torch.compile's dequantise-then-matmul is 2-3x *slower* than bf16 (it materialises W).

Each program owns BLOCK_N whole rows of W for one row of x, streams them in BLOCK_K slices with
the x slice in registers, and reduces in float32 (no split-K, no atomics: deterministic).
Registered as a `torch.library.triton_op`, so torch.compile keeps it inside the layer's graph and
CUDA graphs capture it. One row (the decode step): grid (cdiv(N, BLOCK_N), 1). Several 16-bit
rows: `_int8_gemm_rows`, tensor-core tiles of 16-64 rows sharing each weight tile, so a batch or
a chunk does not read the weights once per row (a first version broadcast-multiplied in
registers and made the 3B shape's W1 5x slower: the tiles are what keeps it at bf16's cost).
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
    """Several rows of 16-bit x (batched captions, jump-forward chunks, drafts): tensor-core
    tiles, each weight tile read once for BLOCK_M rows. int8 values are exact in bf16/fp16, so
    the products are the GEMV's; only the float32 summation order differs."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, m_ok = rows < N, ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + ms[:, None] * K + cols[None, :], mask=m_ok[:, None] & col_ok[None, :],
                    other=0.0)                                                  # [BM, BK]
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0, eviction_policy="evict_first").to(x.dtype)         # [BN, BK]
        acc = tl.dot(x, tl.trans(w), acc)                                        # [BM, BN]
    y = acc * tl.load(s_ptr + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + ms[:, None] * N + rows[None, :], y.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & row_ok[None, :])


def block_sizes(k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of `_int8_gemv`: the H200 sweep's best configs were BLOCK_N
    4-8 with 512-2048 columns a slice; longer rows (the MLP down projection) take the longer slices."""
    return (4, 1024, 4) if k >= 8192 else (4, 512, 4)


ROWS_CONFIG: dict = {}     # benchmarks/gpu_quant.py --rows-sweep sets one config here to time it


def rows_config(n: int, block_m: int) -> dict:
    """Tile settings of `_int8_gemm_rows`, from the H200 sweeps at the Qwen2.5-VL-3B and
    Qwen3.5-4B fused weights (results/int8_{qwen2.5-vl-3b,qwen3.5-4b}_h200.json, "int8_rows"),
    the config with the best mean ratio to cuBLAS bf16 over both shapes: wide projections
    (gate|up, in_proj) 1.5-1.6x at 2-16 rows, 1.15x at 32; narrow ones (o, down) 0.95-1.0x at
    2-16 rows, 0.87x at 32 (too few programs stream a long row: split-K would be the fix)."""
    if ROWS_CONFIG:
        return ROWS_CONFIG
    if n >= 8192:
        return {"block_n": 32 if block_m <= 16 else 64, "block_k": 256, "warps": 4, "stages": 3}
    return {"block_n": 32 if block_m <= 16 else 16, "block_k": 256, "warps": 4, "stages": 4}


@triton_op("corgi::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (contiguous); weight int8 [N, K]; scale float32 [N]; bias [N] or None -> [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bias_arg = bias if bias is not None else scale
    if m == 1 or x.dtype == torch.float32:
        # One row, or float32 x (no exact tensor-core path): one program per row block and x row.
        block_n, block_k, warps = block_sizes(k)
        wrap_triton(_int8_gemv)[(triton.cdiv(n, block_n), m)](
            x, weight, scale, bias_arg, out, n, K=k, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    else:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        c = rows_config(n, block_m)
        wrap_triton(_int8_gemm_rows)[(triton.cdiv(n, c["block_n"]), triton.cdiv(m, block_m))](
            x, weight, scale, bias_arg, out, m, n, K=k, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], num_warps=c["warps"],
            num_stages=c["stages"])
    return out
