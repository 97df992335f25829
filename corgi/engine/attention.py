"""Attention of a chunk of T new tokens per row over static K/V buffers, shared by the dense
layer (static_decode.layer_extend) and Qwen3.5's gated attention layer
(linear_attention.gated_attention_layer_extend): the chunk's K/V go into their columns, then
grouped-query attention without repeating K/V."""
from __future__ import annotations

import torch


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
