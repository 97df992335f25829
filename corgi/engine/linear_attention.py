"""Qwen3.5 / Qwen3.6 (dense) decode-step math as plain tensor functions, one new token per row.

The text stack alternates Gated DeltaNet layers ("linear_attention") and gated full-attention
layers ("full_attention", every 4th in the real checkpoints). Everything here mirrors
transformers 5.23's `modeling_qwen3_5.py` (the torch fallbacks, which is what runs without the
`causal_conv1d` / `fla` kernels); docs/qwen35-facts.md lists the facts and the tests that pin them.

Shapes (B rows, H hidden, one token per row):
    conv state       [B, conv_dim, K]          conv_dim = 2*Hk*dk + Hv*dv, K = conv kernel (4), model dtype
    recurrent state  [B, Hv, dk, dv]           float32
    K/V buffers      [B, Hkv, C, D]            full-attention layers only

All state updates are in place on the caller's buffers and every shape is static, so a step can
be captured in a CUDA graph (no .item(), no data-dependent shapes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import chunk_attention, decode_attention
from .step_linear import linear

try:                                    # CUDA hosts: the delta rule as one Triton kernel
    from . import delta_rule_kernel
except ImportError:                     # no Triton (CPU wheels): torch ops only
    delta_rule_kernel = None


def fused_delta_rule_available() -> bool:
    return delta_rule_kernel is not None and torch.cuda.is_available()


def zc_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3_5RMSNorm (zero-centred): statistics *and* the (1 + w) scale in float32, then cast.
    (Qwen2RMSNorm instead casts first and multiplies by w.) Decoder norms, final norm, q/k norms."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * (1.0 + weight.float())).to(dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3_5RMSNormGated: RMSNorm over the head dim with a plain w (ones at init), then * silu(z)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x = weight * x.to(dtype)
    return (x * F.silu(z.float())).to(dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def conv_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv for one new column, shifting `conv_state` in place.
    x [B, C]; conv_state [B, C, K] (the last K inputs, oldest first); weight [C, K].
    Same as HF's causal_conv1d_update: the state keeps the K newest inputs (this one included)
    and the output is their dot product with the taps, then silu."""
    conv_state.copy_(torch.cat([conv_state[..., 1:], x.to(conv_state.dtype)[..., None]], dim=-1))
    out = (conv_state.float() * weight.float()).sum(-1)           # K taps, accumulated in float32
    return F.silu(out).to(x.dtype)


def conv_extend(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
    """`conv_step` for T new columns per row, of which row b keeps the first lengths[b] (the
    rest is padding: it gets an output but never enters the state).
    x [B, T, C]; conv_state [B, C, K]; weight [C, K]; lengths [B] -> [B, T, C].
    Column t sees the K inputs ending at itself, as T conv_steps in a row would."""
    kernel = conv_state.shape[-1]
    seq = torch.cat([conv_state, x.to(conv_state.dtype).transpose(1, 2)], dim=-1)   # [B, C, K+T]
    windows = seq.float().unfold(-1, kernel, 1)[:, :, 1:]                      # [B, C, T, K]
    out = (windows * weight.float()[None, :, None, :]).sum(-1)                 # [B, C, T]
    _shift_in(seq, conv_state, lengths)
    return F.silu(out).transpose(1, 2).to(x.dtype)


def conv_shift(x: torch.Tensor, conv_state: torch.Tensor, lengths: torch.Tensor) -> None:
    """The state `conv_extend` leaves, without its output: x [B, T, C] into conv_state [B, C, K]."""
    _shift_in(torch.cat([conv_state, x.to(conv_state.dtype).transpose(1, 2)], dim=-1), conv_state, lengths)


def _shift_in(seq: torch.Tensor, conv_state: torch.Tensor, lengths: torch.Tensor) -> None:
    """The new state: the K inputs ending at each row's last kept column (a gather: static shapes).
    seq [B, C, K+T] = the old state then the new columns."""
    kernel = conv_state.shape[-1]
    index = (lengths[:, None] + torch.arange(kernel, device=seq.device))[:, None, :]    # [B, 1, K]
    conv_state.copy_(seq.gather(-1, index.expand(-1, seq.shape[1], -1)))


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    state: torch.Tensor) -> torch.Tensor:
    """Gated delta rule for one token, `state` [B, Hv, dk, dv] (float32) updated in place.
    q, k [B, Hk, dk]; v [B, Hv, dv]; g (log decay, <= 0), beta [B, Hv]. Returns [B, Hv, dv] in v's dtype.

    HF (torch_recurrent_gated_delta_rule, use_qk_l2norm_in_kernel=True):
        q, k = l2norm(q), l2norm(k); q = q / sqrt(dk)
        S = S * exp(g); delta = beta * (v - k^T S); S = S + k delta^T; out = q^T S
    Rewritten so the state is read once (k^T S and q^T S in one matmul) and written once:
        k^T (S e^g) = e^g k^T S,  q^T S' = e^g q^T S + (q.k) delta."""
    dtype = v.dtype
    ratio = v.shape[1] // k.shape[1]
    if ratio > 1:                                   # grouped value heads: each q/k head serves `ratio`
        q = q.repeat_interleave(ratio, dim=1)
        k = k.repeat_interleave(ratio, dim=1)
    q, k, v = l2norm(q.float()), l2norm(k.float()), v.float()
    q = q / (q.shape[-1] ** 0.5)
    decay = g.float().exp()[..., None]                              # [B, Hv, 1]
    beta = beta.float()[..., None]
    read = torch.matmul(torch.stack((k, q), dim=2), state)          # [B, Hv, 2, dv]: k^T S, q^T S
    delta = (v - decay * read[:, :, 0]) * beta                      # [B, Hv, dv]
    out = decay * read[:, :, 1] + (q * k).sum(-1, keepdim=True) * delta
    state.mul_(decay[..., None]).add_(k[..., :, None] * delta[..., None, :])
    return out.to(dtype)


def delta_rule_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor) -> torch.Tensor:
    """`delta_rule_step` for T tokens per row in order: q, k [B, T, Hk, dk]; v [B, T, Hv, dv];
    g, beta [B, T, Hv] -> [B, T, Hv, dv]. A token with g = 0 and beta = 0 leaves the state as it
    is exactly (decay e^0 = 1, delta 0): how padding is kept out."""
    outs = [delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state) for t in range(q.shape[1])]
    return torch.stack(outs, dim=1)


def linear_layer_step(h, ln1, w_in, conv_w, a_log, dt_bias, norm_w, w_out, ln2, wgu, wd,
                      conv_state, rec_state, eps: float, n_k: int, n_v: int, d_k: int, d_v: int,
                      fused: bool = False):
    """One Qwen3.5 decoder layer with a Gated DeltaNet mixer, one new token per row.
    h [B, H]; w_in [(2*Hk*dk + Hv*dv) + Hv*dv + Hv + Hv, H] (in_proj_qkv | z | b | a stacked);
    conv_w [conv_dim, K]; a_log, dt_bias [Hv]; norm_w [dv]; w_out [H, Hv*dv]; wgu [2*I, H].
    fused: the delta rule as one Triton kernel (delta_rule_kernel; CUDA) instead of torch ops."""
    batch = h.shape[0]
    key_dim, value_dim = n_k * d_k, n_v * d_v
    x = zc_rms_norm(h, ln1, eps)
    mixed, z, b, a = linear(x, w_in).split([2 * key_dim + value_dim, value_dim, n_v, n_v], dim=-1)
    mixed = conv_step(mixed, conv_state, conv_w)                    # [B, conv_dim]
    q, k, v = mixed.split([key_dim, key_dim, value_dim], dim=-1)
    beta = b.sigmoid()
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)      # [B, Hv], float32
    step = delta_rule_kernel.delta_rule_token if fused else delta_rule_step
    out = step(q.reshape(batch, n_k, d_k), k.reshape(batch, n_k, d_k),
               v.reshape(batch, n_v, d_v), g, beta, rec_state)                     # [B, Hv, dv]
    out = gated_rms_norm(out, z.reshape(batch, n_v, d_v), norm_w, eps)
    h = h + linear(out.reshape(batch, value_dim), w_out)
    x = zc_rms_norm(h, ln2, eps)
    gate, up = linear(x, wgu).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, wd)


def linear_layer_extend(h, ln1, w_in, conv_w, a_log, dt_bias, norm_w, w_out, ln2, wgu, wd,
                        conv_state, rec_state, lengths, eps: float, n_k: int, n_v: int, d_k: int, d_v: int,
                        fused: bool = False, tape=None):
    """`linear_layer_step` for T new tokens per row in one forward (a jump-forward chunk or a
    draft verify): the projections read their weights once for all T; the conv and the delta
    rule move the states token by token over the first lengths[b] tokens of row b only.
    h [B, T, H]; lengths [B] (1..T). Returns [B, T, H].
    tape: buffers (mixed, conv_out [B, W, conv_dim], g, beta [B, W, Hv]), W >= T, that get the
    conv's input and output and the delta rule's g and beta, so `replay_linear_state` can move
    the states over fewer tokens afterwards, with no weight read and the delta rule fed exactly
    what it got here (a verify whose drafts were rejected part-way)."""
    batch, width = h.shape[:2]
    key_dim, value_dim = n_k * d_k, n_v * d_v
    x = zc_rms_norm(h, ln1, eps)
    mixed, z, b, a = linear(x, w_in).split([2 * key_dim + value_dim, value_dim, n_v, n_v], dim=-1)
    conv_out = conv_extend(mixed, conv_state, conv_w, lengths)                 # [B, T, conv_dim]
    beta = b.sigmoid()
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)                # [B, T, Hv], float32
    if tape is not None:
        for buffer, value in zip(tape, (mixed, conv_out, g, beta)):
            buffer[:, :width].copy_(value)
    out = _delta_chunk(conv_out, g, beta, rec_state, lengths, n_k, n_v, d_k, d_v, fused)   # [B, T, Hv, dv]
    out = gated_rms_norm(out, z.reshape(batch, width, n_v, d_v), norm_w, eps)
    h = h + linear(out.reshape(batch, width, value_dim), w_out)
    x = zc_rms_norm(h, ln2, eps)
    gate, up = linear(x, wgu).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, wd)


def _delta_chunk(conv_out, g, beta, rec_state, lengths, n_k: int, n_v: int, d_k: int, d_v: int,
                 fused: bool) -> torch.Tensor:
    """The delta rule over T tokens per row, the state moving over the first lengths[b] tokens
    of row b (the rest get g = beta = 0, which leaves it exactly as it is).
    conv_out [B, T, conv_dim] (q | k | v after the conv); g, beta [B, T, Hv] -> [B, T, Hv, dv]."""
    batch, width = conv_out.shape[:2]
    key_dim = n_k * d_k
    q, k, v = conv_out.split([key_dim, key_dim, n_v * d_v], dim=-1)
    valid = (torch.arange(width, device=conv_out.device)[None, :] < lengths[:, None])[..., None]   # [B, T, 1]
    beta = torch.where(valid, beta, 0.0)
    g = torch.where(valid, g, 0.0)
    chunk = delta_rule_kernel.delta_rule_chunk if fused else delta_rule_chunk
    return chunk(q.reshape(batch, width, n_k, d_k), k.reshape(batch, width, n_k, d_k),
                 v.reshape(batch, width, n_v, d_v), g, beta, rec_state)


def replay_linear_state(tape, width: int, conv_state, rec_state, lengths,
                        n_k: int, n_v: int, d_k: int, d_v: int, fused: bool = False) -> None:
    """Move a linear layer's states (already put back to where a `linear_layer_extend` began)
    over the first lengths[b] of its `width` taped tokens: the states that extend would have
    left with those lengths. No weight is read, and the delta rule gets the taped conv output,
    so with one kernel for both (the Triton one on CUDA) the state is what extend computes."""
    mixed, conv_out, g, beta = (t[:, :width] for t in tape)
    conv_shift(mixed, conv_state, lengths)
    _delta_chunk(conv_out, g, beta, rec_state, lengths, n_k, n_v, d_k, d_v, fused)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head (partial_rotary_factor 0.25: 64 of 256)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def gated_attention_layer_step(h, ln1, wqkv, bqkv, wo, qn, kn, ln2, wgu, wd,
                               k_cache, v_cache, cos, sin, write, mask, eps: float, n_heads: int, n_kv: int,
                               split_kv: bool = False):
    """One Qwen3.5 decoder layer with full attention, one new token per row.
    wqkv [Hq*2D + 2*Hkv*D, H]: q_proj (per head: D query rows then D gate rows) | k | v;
    k_cache/v_cache [B, Hkv, C, D]; cos/sin [B, rot]; write [1]; mask [B, 1, 1, C]."""
    batch = h.shape[0]
    head_dim = k_cache.shape[-1]
    x = zc_rms_norm(h, ln1, eps)
    qg, k, v = linear(x, wqkv, bqkv).split([2 * n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    qg = qg.reshape(batch, n_heads, 2 * head_dim)
    q, gate = qg[..., :head_dim], qg[..., head_dim:].reshape(batch, n_heads * head_dim)
    q = zc_rms_norm(q, qn, eps)                                     # [B, Hq, D]
    k = zc_rms_norm(k.reshape(batch, n_kv, head_dim), kn, eps)      # [B, Hkv, D]
    v = v.reshape(batch, n_kv, head_dim)
    cos, sin = cos[:, None, :], sin[:, None, :]
    q, k = partial_rope(q, cos, sin), partial_rope(k, cos, sin)
    out = decode_attention(q, k, v, k_cache, v_cache, write, mask, split_kv)    # [B, Hq*D]
    out = out * torch.sigmoid(gate)                                 # output gate from q_proj
    h = h + linear(out, wo)
    x = zc_rms_norm(h, ln2, eps)
    gate_, up = linear(x, wgu).chunk(2, dim=-1)
    return h + linear(F.silu(gate_) * up, wd)


def gated_attention_layer_extend(h, ln1, wqkv, bqkv, wo, qn, kn, ln2, wgu, wd,
                                 k_cache, v_cache, cos, sin, write, mask, eps: float, n_heads: int, n_kv: int):
    """`gated_attention_layer_step` for T new tokens per row. h [B, T, H]; cos/sin [B, T, rot];
    write [T] (columns); mask [B, 1, T, C] (causal inside the chunk)."""
    batch, width = h.shape[:2]
    head_dim = k_cache.shape[-1]
    x = zc_rms_norm(h, ln1, eps)
    qg, k, v = linear(x, wqkv, bqkv).split([2 * n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    qg = qg.reshape(batch, width, n_heads, 2 * head_dim)
    q, gate = qg[..., :head_dim], qg[..., head_dim:].reshape(batch, width, n_heads * head_dim)
    q = zc_rms_norm(q, qn, eps)                                                # [B, T, Hq, D]
    k = zc_rms_norm(k.reshape(batch, width, n_kv, head_dim), kn, eps)          # [B, T, Hkv, D]
    v = v.reshape(batch, width, n_kv, head_dim)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]                          # [B, T, 1, rot]
    q, k = partial_rope(q, cos, sin), partial_rope(k, cos, sin)
    out = chunk_attention(q, k, v, k_cache, v_cache, write, mask)             # [B, T, Hq*D]
    out = out * torch.sigmoid(gate)
    h = h + linear(out, wo)
    x = zc_rms_norm(h, ln2, eps)
    gate_, up = linear(x, wgu).chunk(2, dim=-1)
    return h + linear(F.silu(gate_) * up, wd)
