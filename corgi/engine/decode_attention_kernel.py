"""Attention of one new token per row over a static K/V buffer, split along the cache
(flash-decoding), as two Triton kernels (CUDA hosts with Triton).

Why: at batch 1 with 2-4 KV heads, the torch ops (QK^T as a tiny-M batched GEMM, softmax, P.V)
run a handful of programs that each walk the whole cache: 13 us a layer on the H200 for the 3B
shape (RESULTS.md, "What holds back"), where the bytes (1-2 MB of K/V) take well under 1 us.
Here every BLOCK_N columns of every KV head are one program, so hundreds of programs share the
read; a second kernel merges the pieces with their softmax statistics.

    stage 1, grid (B*Hkv, C/BLOCK_N): the G query heads of one KV head against BLOCK_N columns
             -> partial out [G, D] (unnormalised), row max m [G], row sum l [G] (float32)
    stage 2, grid (B*Hq,): out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s

Masked columns (the additive mask's -inf: unused or padded) add nothing; a block with no valid
column stores m = -inf and drops out of the merge. Scores and sums stay in float32 (the torch
path rounds QK^T to the model dtype first, so in bf16 the two differ by rounding only).
Registered as a `torch.library.triton_op`, so torch.compile keeps it inside the layer's graph and
CUDA graphs capture it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _split_scores(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, m_ptr, l_ptr, scale, C, SPLITS,
                  HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    bh, s = tl.program_id(0), tl.program_id(1)           # bh = b * HKV + kv head; s = column block
    b = bh // HKV
    cols = s * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    mask = tl.load(mask_ptr + b * C + cols)                                   # [BLOCK_N] 0 or -inf
    part = (bh * SPLITS + s) * G_PAD + g                                      # [G_PAD] partial rows
    if tl.max(mask, axis=0) == float("-inf"):            # nothing valid here: drop out of the merge
        tl.store(m_ptr + part, tl.full((G_PAD,), float("-inf"), tl.float32))
        tl.store(l_ptr + part, tl.zeros((G_PAD,), tl.float32))
        tl.store(o_ptr + part[:, None] * D + d[None, :], tl.zeros((G_PAD, D), tl.float32))
    else:
        # q [B, Hq, D] with head h*G + g for KV head h: rows bh*G + g.
        q = tl.load(q_ptr + (bh * G + g[:, None]) * D + d[None, :], mask=(g < G)[:, None], other=0.0)
        kv = (bh * C + cols[:, None]) * D + d[None, :]                        # [BLOCK_N, D]
        k = tl.load(k_ptr + kv)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale + mask[None, :]    # [G_PAD, BLOCK_N]
        m = tl.max(scores, axis=1)                                            # finite: a column is valid
        p = tl.exp(scores - m[:, None])
        v = tl.load(v_ptr + kv)
        o = tl.dot(p.to(v.dtype), v).to(tl.float32)                          # [G_PAD, D]
        tl.store(m_ptr + part, m)
        tl.store(l_ptr + part, tl.sum(p, axis=1))
        tl.store(o_ptr + part[:, None] * D + d[None, :], o)


@triton.jit
def _merge_splits(o_ptr, m_ptr, l_ptr, out_ptr, SPLITS, HQ: tl.constexpr, G: tl.constexpr,
                  G_PAD: tl.constexpr, D: tl.constexpr, SPLITS_PAD: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0)                               # b * HQ + query head
    b, hq = row // HQ, row % HQ
    bh, g = b * (HQ // G) + hq // G, hq % G
    s = tl.arange(0, SPLITS_PAD)
    m = tl.load(m_ptr + (bh * SPLITS + s) * G_PAD + g, mask=s < SPLITS, other=float("-inf"))
    top = tl.max(m, axis=0)                              # finite: the current token is always valid
    d = tl.arange(0, D)
    acc = tl.zeros((D,), tl.float32)
    weight = tl.zeros((CHUNK,), tl.float32)
    for start in range(0, SPLITS, CHUNK):
        c = start + tl.arange(0, CHUNK)
        ok = c < SPLITS
        part = (bh * SPLITS + c) * G_PAD + g
        w = tl.exp(tl.load(m_ptr + part, mask=ok, other=float("-inf")) - top)       # [CHUNK]
        weight += w * tl.load(l_ptr + part, mask=ok, other=0.0)
        o = tl.load(o_ptr + part[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [CHUNK, D]
        acc += tl.sum(w[:, None] * o, axis=0)
    tl.store(out_ptr + row * D + d, (acc / tl.sum(weight, axis=0)).to(out_ptr.dtype.element_ty))


def block_columns(capacity: int) -> int:
    """Columns a stage-1 program reads: 64 (tens of programs per KV head at the usual buckets),
    more for long buffers so the merge stays short; always divides the capacity buckets."""
    for block in (64, 128, 256):
        if capacity // block <= 64 and capacity % block == 0:
            return block
    return 256 if capacity % 256 == 0 else 64


def usable(head_dim: int, capacity: int) -> bool:
    pow2 = head_dim > 0 and head_dim & (head_dim - 1) == 0
    return pow2 and head_dim >= 16 and capacity % 64 == 0


@triton_op("corgi::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D] contiguous; k_cache/v_cache [B, Hkv, C, D] contiguous; mask float32 [B, 1, 1, C]
    (0 where a column counts, -inf where not) -> [B, Hq, D] in q's dtype."""
    batch, n_heads, head_dim = q.shape
    n_kv, capacity = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    group_pad = max(16, triton.next_power_of_2(group))          # tl.dot needs 16 rows
    block = block_columns(capacity)
    splits = capacity // block
    o = torch.empty((batch * n_kv * splits * group_pad, head_dim), device=q.device, dtype=torch.float32)
    m = torch.empty((batch * n_kv * splits * group_pad,), device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    out = torch.empty_like(q)
    wrap_triton(_split_scores)[(batch * n_kv, splits)](
        q, k_cache, v_cache, mask, o, m, l, head_dim ** -0.5, capacity, splits,
        HKV=n_kv, G=group, G_PAD=group_pad, D=head_dim, BLOCK_N=block, num_warps=4)
    wrap_triton(_merge_splits)[(batch * n_heads,)](
        o, m, l, out, splits, HQ=n_heads, G=group, G_PAD=group_pad, D=head_dim,
        SPLITS_PAD=triton.next_power_of_2(splits), CHUNK=16, num_warps=4)
    return out
