"""The gated delta rule for one new token as one Triton kernel (CUDA hosts with Triton).

Same arithmetic as `linear_attention.delta_rule_step` (HF's torch_recurrent_gated_delta_rule with
use_qk_l2norm_in_kernel=True, one token), but the recurrent state is read once and written once
by one kernel, in place, instead of by a batched matmul and separate update kernels that the
compiler cannot fuse with it. The decode step of Qwen3.5 runs this once per Gated DeltaNet layer
(24 of 32 layers at 4B), so its launch count and latency matter more than its bytes (2 MB of
float32 state per layer at 4B). It is registered as a `torch.library.triton_op`, so
torch.compile keeps it inside the layer's graph and CUDA graphs capture it.

Grid: (dv / BLOCK_V, B * Hv); each program owns a [dk, BLOCK_V] slice of one head's state, so
programs never touch each other's state and the in-place update is race-free.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_V = 16


@triton.jit
def _delta_rule_token(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, out_ptr, scale,
                      HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    row, hv = pid_bh // HV, pid_bh % HV
    hk = hv // (HV // HK)                       # grouped value heads share a q/k head
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    q = tl.load(q_ptr + (row * HK + hk) * DK + offs_k).to(tl.float32)
    k = tl.load(k_ptr + (row * HK + hk) * DK + offs_k).to(tl.float32)
    q = q / tl.sqrt(tl.sum(q * q) + 1e-6) * scale          # l2norm(q) / sqrt(dk)
    k = k / tl.sqrt(tl.sum(k * k) + 1e-6)
    v = tl.load(v_ptr + (row * HV + hv) * DV + offs_v).to(tl.float32)
    decay = tl.exp(tl.load(g_ptr + row * HV + hv).to(tl.float32))
    beta = tl.load(beta_ptr + row * HV + hv).to(tl.float32)
    s_ptrs = state_ptr + (row * HV + hv) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    s = tl.load(s_ptrs) * decay                                 # [DK, BLOCK_V]: S e^g
    delta = beta * (v - tl.sum(s * k[:, None], 0))              # beta (v - k^T S e^g)
    s = s + k[:, None] * delta[None, :]
    tl.store(s_ptrs, s)
    tl.store(out_ptr + (row * HV + hv) * DV + offs_v, tl.sum(s * q[:, None], 0).to(out_ptr.dtype.element_ty))


@triton_op("corgi::delta_rule_token", mutates_args={"state"})
def delta_rule_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """q, k [B, Hk, dk]; v [B, Hv, dv]; g (log decay), beta [B, Hv]; state [B, Hv, dk, dv] float32,
    updated in place. Returns [B, Hv, dv] in v's dtype. dk and dv powers of two, dv % BLOCK_V == 0."""
    batch, n_k, d_k = q.shape
    n_v, d_v = v.shape[1], v.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, beta = g.float().contiguous(), beta.float().contiguous()
    out = torch.empty_like(v)
    grid = (d_v // BLOCK_V, batch * n_v)
    wrap_triton(_delta_rule_token)[grid](q, k, v, g, beta, state, out, d_k ** -0.5,
                                         HK=n_k, HV=n_v, DK=d_k, DV=d_v, BLOCK_V=BLOCK_V, num_warps=2)
    return out



@triton.jit
def _delta_rule_chunk(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, out_ptr, scale, T,
                      HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    # As _delta_rule_token, for T tokens in order: the state slice stays in registers across them.
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    row, hv = pid_bh // HV, pid_bh % HV
    hk = hv // (HV // HK)
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    s_ptrs = state_ptr + (row * HV + hv) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    s = tl.load(s_ptrs)                                          # [DK, BLOCK_V]
    for t in range(T):
        qk_at = ((row * T + t) * HK + hk) * DK + offs_k          # q, k [B, T, HK, DK]
        q = tl.load(q_ptr + qk_at).to(tl.float32)
        k = tl.load(k_ptr + qk_at).to(tl.float32)
        q = q / tl.sqrt(tl.sum(q * q) + 1e-6) * scale
        k = k / tl.sqrt(tl.sum(k * k) + 1e-6)
        head = (row * T + t) * HV + hv                           # v [B, T, HV, DV]; g, beta [B, T, HV]
        v = tl.load(v_ptr + head * DV + offs_v).to(tl.float32)
        decay = tl.exp(tl.load(g_ptr + head).to(tl.float32))
        beta = tl.load(beta_ptr + head).to(tl.float32)
        s = s * decay
        delta = beta * (v - tl.sum(s * k[:, None], 0))
        s = s + k[:, None] * delta[None, :]
        tl.store(out_ptr + head * DV + offs_v, tl.sum(s * q[:, None], 0).to(out_ptr.dtype.element_ty))
    tl.store(s_ptrs, s)


@triton_op("corgi::delta_rule_chunk", mutates_args={"state"})
def delta_rule_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]; state [B, Hv, dk, dv] float32,
    updated in place -> [B, T, Hv, dv] in v's dtype (linear_attention.delta_rule_chunk's contract)."""
    batch, width, n_k, d_k = q.shape
    n_v, d_v = v.shape[2], v.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, beta = g.float().contiguous(), beta.float().contiguous()
    out = torch.empty_like(v)
    grid = (d_v // BLOCK_V, batch * n_v)
    wrap_triton(_delta_rule_chunk)[grid](q, k, v, g, beta, state, out, d_k ** -0.5, width,
                                         HK=n_k, HV=n_v, DK=d_k, DV=d_v, BLOCK_V=BLOCK_V, num_warps=2)
    return out
