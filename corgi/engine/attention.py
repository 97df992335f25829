"""Attention over static K/V buffers, shared by the dense layer (static_decode) and Qwen3.5's
gated attention layer (linear_attention): the new tokens' K/V go into their columns, then
grouped-query attention without repeating K/V. One token per row (`decode_attention`) may run as
the split-KV Triton kernels (decode_attention_kernel.py, CUDA); a chunk of T tokens
(`chunk_attention`) is always torch ops."""
from __future__ import annotations

import torch

try:
    from . import decode_attention_kernel
except ImportError:       # no Triton (CPU wheels): torch ops only
    decode_attention_kernel = None


def split_kv_available() -> bool:
    return decode_attention_kernel is not None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, write: torch.Tensor, mask: torch.Tensor,
                     split_kv: bool = False) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, D] (normed and rotated); k_cache/v_cache [B, Hkv, C, D];
    write [1] (the new column); mask [B, 1, 1, C] -> [B, Hq*D]. split_kv: the Triton kernels."""
    batch, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    k_cache.index_copy_(2, write, k[:, :, None, :])                 # write column `write`
    v_cache.index_copy_(2, write, v[:, :, None, :])
    if split_kv:
        out = decode_attention_kernel.decode_attention(q.contiguous(), k_cache, v_cache, mask)  # [B, Hq, D]
        return out.reshape(batch, n_heads * head_dim)
    # [B, Hkv, G, D] x [B, Hkv, D, C]: K/V not repeated.
    q = q.reshape(batch, n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(q, k_cache.transpose(-1, -2)) * head_dim ** -0.5   # [B, Hkv, G, C]
    probs = torch.softmax(scores.float() + mask, dim=-1).to(q.dtype)
    return torch.matmul(probs, v_cache).reshape(batch, n_heads * head_dim)   # [B, Hq*D]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, write: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] (normed and rotated); k_cache/v_cache [B, Hkv, C, D];
    write [T] (the chunk's columns); mask [B, 1, T, C] (causal inside the chunk) -> [B, T, Hq*D]."""
    batch, width, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    k_cache.index_copy_(2, write, k.transpose(1, 2))                # columns write[0..T-1]
    v_cache.index_copy_(2, write, v.transpose(1, 2))
    # Query rows ordered (group, token): [B, Hkv, G*T, D] x [B, Hkv, D, C], K/V not repeated.
    q = q.view(batch, width, n_kv, group, head_dim).permute(0, 2, 3, 1, 4).reshape(batch, n_kv, group * width, head_dim)
    scores = torch.matmul(q, k_cache.transpose(-1, -2)) * head_dim ** -0.5   # [B, Hkv, G*T, C]
    probs = torch.softmax(scores.float() + mask.repeat(1, 1, group, 1), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v_cache)                              # [B, Hkv, G*T, D]
    return out.view(batch, n_kv, group, width, head_dim).permute(0, 3, 1, 2, 4).reshape(batch, width, n_heads * head_dim)
