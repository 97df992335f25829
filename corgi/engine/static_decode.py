"""Decode steps over static KV buffers, replayed as CUDA graphs (gpt-fast style).

Prefill stays in the HF model: images, deepstack features and 3-D M-RoPE positions live
there. A decode step feeds one *text* token per row, and for text M-RoPE puts the same
position on all three axes, which is plain 1-D RoPE. So the step needs only the text
stack's weights, read straight from the HF modules (no copies):

    embed -> [RMSNorm -> q,k,v (+bias) -> (q/k RMSNorm, Qwen3) -> RoPE -> write K/V at `write`
              -> attention over the whole buffer with a mask -> o_proj -> RMSNorm -> SwiGLU] x L
          -> RMSNorm -> lm_head

Shapes are static per bucket (B rows, C cache columns): buffers K/V [B, Hkv, C, D] per
layer, an additive mask [B, 1, 1, C], and the write column. The layer function is one
torch.compile'd graph reused by every layer (weights are arguments), and the whole step is
captured once per bucket as a CUDA graph; after warm-up a conversation never compiles
again. On CPU (tests) the same step runs eagerly.

Qwen3.5 / Qwen3.6 dense (hybrid text stack, `HybridTextStack` / `HybridBucket`): Gated DeltaNet
layers keep a conv state [B, conv_dim, K] (model dtype) and a recurrent state [B, Hv, dk, dv]
(float32) per bucket row; only the full-attention layers (every 4th) have K/V buffers. There are
two layer functions (engine/linear_attention.py), each compiled once and shared by every layer of
its kind. `load` copies an HF prefill's cache (DynamicCache(config=...)) in; `append_to` hands the
attention columns and row 0's linear states back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import chunk_attention, decode_attention
from .int8_weights import quantize
from . import step_linear
from .step_linear import linear

from .linear_attention import (fused_delta_rule_available, gated_attention_layer_extend,
                               gated_attention_layer_step, linear_layer_extend, linear_layer_step,
                               replay_linear_state, zc_rms_norm)

LINEAR, FULL = "linear_attention", "full_attention"
BATCH_BUCKETS = (1, 2, 4, 8)
WIDTH_BUCKETS = (2, 4, 8, 16, 32, 64)   # multi-token forwards (jump-forward chunks, drafts, short prefills)
PREFILL_WIDTH = 64                        # tokens per forward of a short prefill (engine._prefill_static)
REWIND_WIDTH = 8      # a hybrid bucket's widest multi-token forward that keep() can cut back (drafts)
CAPACITY_BUCKETS = (512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as HF's Qwen2RMSNorm: float32 statistics, cast back, then scale.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_step(h, ln1, wqkv, bqkv, wo, qn, kn, ln2, wgu, wd,
               k_cache, v_cache, cos, sin, write, mask, eps: float, n_heads: int, n_kv: int,
               split_kv: bool = False):
    """One decoder layer for one new token per row.
    h [B, H]; wqkv [(Hq+2*Hkv)*D, H] (q|k|v stacked); wgu [2*I, H] (gate|up stacked);
    k_cache/v_cache [B, Hkv, C, D]; cos/sin [B, D]; write [1] (column); mask [B, 1, 1, C];
    split_kv: attention as the split-KV Triton kernels (CUDA)."""
    batch = h.shape[0]
    head_dim = k_cache.shape[-1]
    x = rms_norm(h, ln1, eps)
    # One GEMV for q, k and v: at batch 1 separate k/v projections are latency-bound
    # (5 us each for 1 MB of weights, measured on an H100).
    q, k, v = linear(x, wqkv, bqkv).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(batch, n_heads, head_dim)                         # [B, Hq, D]
    k = k.reshape(batch, n_kv, head_dim)                            # [B, Hkv, D]
    v = v.reshape(batch, n_kv, head_dim)
    if qn is not None:                                              # Qwen3: per-head q/k norms
        q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
    cos, sin = cos[:, None, :], sin[:, None, :]                     # [B, 1, D]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    out = decode_attention(q, k, v, k_cache, v_cache, write, mask, split_kv)     # [B, Hq*D]
    h = h + linear(out, wo)
    x = rms_norm(h, ln2, eps)
    gate, up = linear(x, wgu).chunk(2, dim=-1)                     # one GEMV for gate and up
    return h + linear(F.silu(gate) * up, wd)


def layer_extend(h, ln1, wqkv, bqkv, wo, qn, kn, ln2, wgu, wd,
                 k_cache, v_cache, cos, sin, write, mask, eps: float, n_heads: int, n_kv: int):
    """`layer_step` for T new tokens per row (a jump-forward chunk or draft verification).
    h [B, T, H]; cos/sin [B, T, D]; write [T] (columns); mask [B, 1, T, C] (causal inside the chunk)."""
    batch, width = h.shape[:2]
    head_dim = k_cache.shape[-1]
    x = rms_norm(h, ln1, eps)
    q, k, v = linear(x, wqkv, bqkv).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(batch, width, n_heads, head_dim)                  # [B, T, Hq, D]
    k = k.reshape(batch, width, n_kv, head_dim)                     # [B, T, Hkv, D]
    v = v.reshape(batch, width, n_kv, head_dim)
    if qn is not None:
        q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]               # [B, T, 1, D]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    out = chunk_attention(q, k, v, k_cache, v_cache, write, mask)  # [B, T, Hq*D]
    h = h + linear(out, wo)
    x = rms_norm(h, ln2, eps)
    gate, up = linear(x, wgu).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, wd)


def fuse_linears(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of linear layers that read the same input into one
    matrix, and make each layer's own weight a view of it: one GEMV instead of several in
    the decode step, no extra memory, and the HF modules compute exactly what they did."""
    if all(getattr(m, "_corgi_fused", None) is not None for m in linears):
        return linears[0]._corgi_fused                      # a second engine on the same model
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)
    with_bias = all(m.bias is not None for m in linears)
    bias = torch.cat([m.bias.detach() for m in linears], dim=0) if with_bias else None
    offset = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[offset:offset + rows], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[offset:offset + rows], requires_grad=False)
        offset += rows
    for m in linears:
        m._corgi_fused = (weight, bias)
    return weight, bias


def _weights(int8: bool, tuner):
    """How the stacks keep a linear weight: its int8 copy (int8_weights.py), a TunedWeight where
    the tuner's one-row kernel beat cuBLAS (gemv_kernel.py), or the tensor itself."""
    return quantize if int8 else tuner if tuner is not None else (lambda w: w)


class TextStack:
    """The text decoder's weights as plain tensors, per layer, for `layer_step` (int8: the linear
    weights and the lm_head as `Int8Weight` copies)."""

    def __init__(self, model, int8: bool = False, tuner=None):
        w = _weights(int8, tuner)
        lm = model.model.language_model
        cfg = model.config.get_text_config()
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.embed = lm.embed_tokens.weight
        self.norm = lm.norm.weight
        self.lm_head = w(model.lm_head.weight)
        self.inv_freq = lm.rotary_emb.inv_freq                      # [D/2]
        self.rope_scale = float(getattr(lm.rotary_emb, "attention_scaling", 1.0))
        self.layers = []
        for layer in lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qn = getattr(attn, "q_norm", None)
            kn = getattr(attn, "k_norm", None)
            wqkv, bqkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            wgu, _ = fuse_linears([mlp.gate_proj, mlp.up_proj])
            self.layers.append((
                layer.input_layernorm.weight, w(wqkv), bqkv, w(attn.o_proj.weight),
                qn.weight if qn is not None else None, kn.weight if kn is not None else None,
                layer.post_attention_layernorm.weight, w(wgu), w(mlp.down_proj.weight)))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B] -> cos, sin [B, D], computed in float32 like HF, then cast."""
        return rope_cos_sin(self.inv_freq, self.rope_scale, positions, dtype)


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B] -> cos, sin [B, 2*len(inv_freq)]: text M-RoPE (the same position on all three
    axes) is plain 1-D RoPE, so the mrope sections and their interleaving drop out."""
    freqs = positions[:, None].float() * inv_freq[None, :].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def is_hybrid(model) -> bool:
    """Qwen3.5 / Qwen3.6: a text stack with Gated DeltaNet ("linear_attention") layers."""
    return LINEAR in (getattr(model.config.get_text_config(), "layer_types", None) or ())


def supported(model) -> bool:
    """Whether the static step covers this text stack: dense MLPs (gate/up/down) only; the MoE
    families (Qwen3-VL-MoE, Qwen3.5-MoE) keep the HF decode path."""
    return all(hasattr(layer.mlp, "gate_proj") for layer in model.model.language_model.layers)


class HybridTextStack:
    """Qwen3.5 dense text decoder weights as plain tensors, per layer, for the two layer kinds."""

    def __init__(self, model, int8: bool = False, tuner=None):
        w = _weights(int8, tuner)
        lm = model.model.language_model
        cfg = model.config.get_text_config()
        if not supported(model):
            raise ValueError("the static decode step covers dense MLPs only (this text stack is MoE)")
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_k, self.n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.d_k, self.d_v = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.conv_dim = 2 * self.n_k * self.d_k + self.n_v * self.d_v
        self.kernel = cfg.linear_conv_kernel_dim
        self.kinds = list(cfg.layer_types)[:cfg.num_hidden_layers]
        self.embed = lm.embed_tokens.weight
        self.norm = lm.norm.weight
        self.lm_head = w(model.lm_head.weight)
        self.inv_freq = lm.rotary_emb.inv_freq                      # [rot/2]: partial rotary
        self.rope_scale = float(getattr(lm.rotary_emb, "attention_scaling", 1.0))
        self.layers = []
        for layer, kind in zip(lm.layers, self.kinds):
            mlp = layer.mlp
            wgu, _ = fuse_linears([mlp.gate_proj, mlp.up_proj])
            ln1, ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            if kind == LINEAR:
                la = layer.linear_attn
                w_in, _ = fuse_linears([la.in_proj_qkv, la.in_proj_z, la.in_proj_b, la.in_proj_a])
                conv_w = la.conv1d.weight.detach().squeeze(1)       # [conv_dim, K], a view
                self.layers.append((ln1, w(w_in), conv_w, la.A_log, la.dt_bias, la.norm.weight,
                                    w(la.out_proj.weight), ln2, w(wgu), w(mlp.down_proj.weight)))
            elif kind == FULL:
                attn = layer.self_attn
                wqkv, bqkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
                self.layers.append((ln1, w(wqkv), bqkv, w(attn.o_proj.weight), attn.q_norm.weight,
                                    attn.k_norm.weight, ln2, w(wgu), w(mlp.down_proj.weight)))
            else:
                raise ValueError(f"layer kind {kind!r} is not covered by the static decode step")

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, self.rope_scale, positions, dtype)


class Bucket:
    """Static buffers (and, on CUDA, the captured graph) for B rows x C columns.

    `extend(ids [B, T])` feeds T tokens per row in one forward (`layer_extend`; on CUDA one graph
    per padded width, captured on first use); `keep(kept)` then keeps the first kept[b] of them."""
    rewindable = True
    rewind_width = CAPACITY_BUCKETS[-1]     # keep() cuts back any extend() (K/V columns are masked)
    multi_token = True        # extend() is one forward: T tokens cost about one step's weight reads

    def __init__(self, stack: TextStack, batch: int, capacity: int, device, dtype, layer_fn, extend_fn=None,
                 split_kv: bool = False):
        self.stack, self.batch, self.capacity, self.layer_fn = stack, batch, capacity, layer_fn
        self.extend_fn = extend_fn or layer_extend
        self.split_kv = split_kv      # one-token attention as the split-KV Triton kernels (CUDA)
        shape = (batch, stack.n_kv, capacity, stack.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in stack.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in stack.layers]
        self._init_io(batch, capacity, device, dtype)

    def _init_io(self, batch: int, capacity: int, device, dtype) -> None:
        self.mask = torch.full((batch, 1, 1, capacity), float("-inf"), device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)      # graph inputs
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.write = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = None                                                     # graph output
        self.hidden = self.step_hidden = None   # final-norm states of the latest forward [B, (T,) H]
        self.graph = None
        self.dtype = dtype
        self.columns = torch.arange(capacity, device=device)                  # [C]
        self.wide: dict[int, tuple] = {}       # T -> (ids [B, T], graph, logits [B, T, V]) on CUDA
        self.last_width, self.last_forwards = 0, 0      # of the latest extend()

    def _step(self) -> torch.Tensor:
        s = self.stack
        self.mask.index_fill_(-1, self.write, 0.0)     # the new token sees itself
        h = F.embedding(self.tokens, s.embed)          # [B, H]
        cos, sin = s.rope(self.positions, self.dtype)
        for i, weights in enumerate(s.layers):
            h = self.layer_fn(h, *weights, self.k[i], self.v[i], cos, sin, self.write, self.mask,
                              s.eps, s.n_heads, s.n_kv, split_kv=self.split_kv)
        h = rms_norm(h, s.norm, s.eps)
        self.hidden = h                              # [B, H]: a graph output too (MTP drafts)
        logits = linear(h, s.lm_head).float()        # [B, V]
        # Advance inside the step so a replayed graph needs no host-side bookkeeping.
        self.positions.add_(1)
        self.write.add_(1)
        return logits

    def capture(self) -> None:
        """Warm up (compiles the layer function for this shape) and capture a CUDA graph."""
        saved = [t.clone() for t in (self.mask, self.positions, self.write)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self._step()
        self.step_hidden = self.hidden
        for t, value in zip((self.mask, self.positions, self.write), saved):
            t.copy_(value)

    def _extend(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] at columns write..write+T-1 -> logits [B, T, V]; advances write and positions by T."""
        s = self.stack
        width = ids.shape[1]
        cols, mask, h, cos, sin = self._chunk_inputs(ids)
        for i, weights in enumerate(s.layers):
            h = self.extend_fn(h, *weights, self.k[i], self.v[i], cos, sin, cols, mask, s.eps, s.n_heads, s.n_kv)
        h = rms_norm(h, s.norm, s.eps)
        self.hidden = h                                                      # [B, T, H]
        logits = linear(h, s.lm_head).float()                                # [B, T, V]
        self.mask.index_fill_(-1, cols, 0.0)          # kept until keep() masks the rejected ones
        self.positions.add_(width)
        self.write.add_(width)
        return logits

    def _chunk_inputs(self, ids: torch.Tensor):
        """ids [B, T] -> columns [T], mask [B, 1, T, C], h [B, T, H], cos/sin [B, T, D]."""
        s = self.stack
        offsets = self.columns[:ids.shape[1]]                                  # [T]
        cols = self.write + offsets                                            # [T]
        # Query t sees the valid columns before the chunk and the chunk's columns up to its own.
        inside = (self.columns >= self.write) & (self.columns[None, :] <= cols[:, None])   # [T, C]
        mask = torch.maximum(self.mask, torch.where(inside, 0.0, float("-inf"))[None, None])
        positions = self.positions[:, None] + offsets                          # [B, T]
        cos, sin = s.rope(positions.reshape(-1), self.dtype)
        cos, sin = cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
        return cols, mask, F.embedding(ids, s.embed), cos, sin

    def _capture_extend(self, width: int) -> tuple:
        saved = [t.clone() for t in (self.mask, self.positions, self.write)]
        ids = torch.zeros((self.batch, width), dtype=torch.long, device=self.tokens.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._extend(ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            logits = self._extend(ids)
        for t, value in zip((self.mask, self.positions, self.write), saved):
            t.copy_(value)
        return ids, graph, logits, self.hidden

    def _set_lengths(self, rows: int, width: int, lengths: list[int]) -> None:
        pass

    def room(self) -> int:
        """Columns left for new tokens."""
        return self.capacity - int(self.write)

    def nbytes(self) -> int:
        """Bytes of this bucket's own buffers (the weights are the model's; the hybrid snapshots
        are the decoder's, shared)."""
        # `hidden` only names a tensor counted elsewhere (a graph output) or a passing one.
        return _nbytes([value for name, value in vars(self).items() if name not in ("stack", "snapshots", "hidden")])

    def _padded(self, width: int, spare: int) -> int:
        if width > self.room():
            raise ValueError(f"{width} tokens do not fit the {self.room()} columns left")
        return next((w for w in WIDTH_BUCKETS if width <= w <= self.room() - spare), width)

    def extend(self, ids: torch.Tensor, spare: int = 0, lengths: list[int] | None = None,
               rewind: bool = False) -> torch.Tensor:
        """ids [rows, T] -> logits [rows, T, V], a copy the caller may mask in place. T is padded
        up to a width of WIDTH_BUCKETS (one compilation and one graph per width, not per T) where
        `spare` columns stay free after it: the padding's columns are dropped by keep() like
        rejected drafts. lengths[b]: how many of row b's tokens keep() will keep at most (a
        hybrid bucket feeds only those into its linear states). rewind: keep() may keep fewer
        (drafts; here every token can be dropped, so it changes nothing)."""
        rows, width = ids.shape
        padded = self._padded(width, spare)
        self.last_width, self.last_forwards = padded, 1
        with torch.inference_mode():
            self._set_lengths(rows, width, lengths or [width] * rows)
            if self.graph is not None:
                if padded not in self.wide:
                    self.wide[padded] = self._capture_extend(padded)
                buffer, graph, logits, self.hidden = self.wide[padded]
                buffer.zero_()
                buffer[:rows, :width].copy_(ids)
                graph.replay()
                logits = logits[:rows, :width]
            else:
                full = ids.new_zeros((self.batch, padded))
                full[:rows, :width] = ids
                logits = self._extend(full)[:rows, :width]
        return logits.clone()

    @torch.inference_mode()
    def keep(self, kept: list[int]) -> None:
        """After extend(): row b keeps the first kept[b] of its tokens. One row: the write column
        and position go back to just after them. Several rows share the write column: a row's
        other columns are masked out and its positions continue after its kept tokens."""
        # Column indices from the device's write column, not int(self.write): reading it would
        # wait for the extend() just queued, and the decode loop queues a forced chunk before
        # it hands the token to the caller so that the two overlap.
        rows, width = len(kept), self.last_width
        if rows == 1:
            drop = width - kept[0]
            if drop:
                self.mask.index_fill_(-1, self.write - drop + self.columns[:drop], float("-inf"))
                self.write.sub_(drop)
                self.positions.sub_(drop)
            return
        for b, n in enumerate(kept):
            if width > n:
                self.mask[b].index_fill_(-1, self.write - (width - n) + self.columns[:width - n], float("-inf"))
                self.positions[b] -= width - n

    @torch.inference_mode()
    def load(self, cache, length: int, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Copy a prefilled HF cache (rows = this bucket's first rows) into the buffers.
        positions [rows]: the rope position of each row's next token; valid [rows, length]
        (1 = attend) for left-padded batches, or None when every column is valid."""
        rows = positions.shape[0]
        for i, layer in enumerate(cache.layers):
            self.k[i][:rows, :, :length].copy_(layer.keys[..., :length, :])
            self.v[i][:rows, :, :length].copy_(layer.values[..., :length, :])
        self._load_io(rows, length, positions, valid)

    def _load_io(self, rows: int, length: int, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        self.mask.fill_(float("-inf"))
        if valid is None:
            self.mask[:rows, ..., :length] = 0.0
        else:
            self.mask[:rows, 0, 0, :length].masked_fill_(valid.bool(), 0.0)
        self.positions.zero_()
        self.positions[:rows].copy_(positions)
        self.write.fill_(length)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [rows] -> logits [rows, V], a copy the caller may mask in place."""
        rows = tokens.shape[0]
        with torch.inference_mode():
            self.tokens[:rows].copy_(tokens)
            if self.graph is not None:
                self.graph.replay()
                logits, self.hidden = self.logits[:rows], self.step_hidden
            else:
                logits = self._step()[:rows]
        return logits.clone()   # outside inference mode: an ordinary tensor

    @torch.inference_mode()
    def append_to(self, cache, start: int, stop: int) -> None:
        """Hand columns start..stop-1 (row 0) back to the conversation's HF cache."""
        for i, layer in enumerate(cache.layers):
            layer.update(self.k[i][:1, :, start:stop], self.v[i][:1, :, start:stop])


class HybridBucket(Bucket):
    """Bucket for the Qwen3.5 hybrid stack: per row, conv + recurrent states for the linear
    layers, K/V columns for the full-attention layers. `layer_fn` maps layer kind -> function.
    Same capture / step protocol as Bucket; `load` and `append_to` also move the linear states.

    extend(ids, lengths=...) is one forward for T tokens per row (`linear_layer_extend`,
    `gated_attention_layer_extend`): the weights are read once, the linear states move over the
    first lengths[b] tokens of row b only (the rest, padding to a width bucket or to the longest
    row, gets masked attention columns and no state).

    The linear states have no history, so a verify whose drafts are rejected part-way is cut back
    by replay: extend(..., rewind=True) first copies the linear states aside (one snapshot per
    batch size, shared by the decoder's buckets: at most one verify is in flight), and every
    forward up to REWIND_WIDTH tokens tapes what each linear layer's stateful part took (the
    conv's input and output, g, beta). keep(kept) then puts the states back, shifts the kept
    inputs into the conv state and runs the delta rule over the kept tokens of the tape
    (`replay_linear_state`): no weight is read again, and the delta rule gets what it got in the
    forward. On CUDA the replay is one graph per width, like extend()."""
    rewindable = True
    rewind_width = REWIND_WIDTH
    multi_token = True

    def __init__(self, stack: HybridTextStack, batch: int, capacity: int, device, dtype, layer_fn,
                 fused: bool = False, extend_fn=None, split_kv: bool = False,
                 snapshots: dict | None = None):
        self.stack, self.batch, self.capacity, self.layer_fn = stack, batch, capacity, layer_fn
        self.extend_fn = extend_fn or {LINEAR: linear_layer_extend, FULL: gated_attention_layer_extend}
        self.fused = fused            # the delta rule as one Triton kernel (CUDA)
        self.split_kv = split_kv      # one-token attention as the split-KV Triton kernels (CUDA)
        kv = (batch, stack.n_kv, capacity, stack.head_dim)
        full = [kind == FULL for kind in stack.kinds]
        self.k = [torch.zeros(kv, device=device, dtype=dtype) if f else None for f in full]
        self.v = [torch.zeros(kv, device=device, dtype=dtype) if f else None for f in full]
        self.conv = [None if f else torch.zeros((batch, stack.conv_dim, stack.kernel), device=device, dtype=dtype)
                     for f in full]
        self.rec = [None if f else torch.zeros((batch, stack.n_v, stack.d_k, stack.d_v), device=device,
                                               dtype=torch.float32) for f in full]
        self._init_io(batch, capacity, device, dtype)
        # Graph input of extend(): tokens per row that enter the linear states. Zero while a
        # width's graph is captured, so the warm-up forwards leave a loaded conversation's
        # states as they are (their K/V columns lie past `write`, masked, like padding).
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        # The rewind: per linear layer the conv's input and output (mixed, conv_out [B, W, conv_dim])
        # and g, beta [B, W, Hv]; the kept tokens per row (replay graph input); the states' snapshot.
        def tape():
            wide = (batch, REWIND_WIDTH, stack.conv_dim)
            heads = (batch, REWIND_WIDTH, stack.n_v)
            return (torch.zeros(wide, device=device, dtype=dtype), torch.zeros(wide, device=device, dtype=dtype),
                    torch.zeros(heads, device=device), torch.zeros(heads, device=device))
        self.tape = [None if f else tape() for f in full]
        self.kept = torch.ones(batch, dtype=torch.long, device=device)
        self.snapshots = snapshots if snapshots is not None else {}    # batch -> copies of the conv + rec states
        self.replays: dict[int, torch.cuda.CUDAGraph] = {}             # width -> replay graph (CUDA)
        self._rewind = False

    def _step(self) -> torch.Tensor:
        s = self.stack
        linear_fn, attention_fn = self.layer_fn[LINEAR], self.layer_fn[FULL]
        self.mask.index_fill_(-1, self.write, 0.0)     # the new token sees itself
        h = F.embedding(self.tokens, s.embed)          # [B, H]
        cos, sin = s.rope(self.positions, self.dtype)  # [B, rot]
        for i, (kind, weights) in enumerate(zip(s.kinds, s.layers)):
            if kind == LINEAR:
                h = linear_fn(h, *weights, self.conv[i], self.rec[i], s.eps, s.n_k, s.n_v, s.d_k, s.d_v,
                              fused=self.fused)
            else:
                h = attention_fn(h, *weights, self.k[i], self.v[i], cos, sin, self.write, self.mask,
                                 s.eps, s.n_heads, s.n_kv, split_kv=self.split_kv)
        h = zc_rms_norm(h, s.norm, s.eps)
        self.hidden = h                              # [B, H]
        logits = linear(h, s.lm_head).float()        # [B, V]
        self.positions.add_(1)
        self.write.add_(1)
        return logits

    def _set_lengths(self, rows: int, width: int, lengths: list[int]) -> None:
        if len(lengths) != rows or not all(1 <= n <= width for n in lengths):
            raise ValueError(f"lengths {lengths} do not describe {rows} rows")
        self._lengths = list(lengths)
        self.lengths.fill_(1)                                 # the bucket's unused rows: anything
        self.lengths[:rows].copy_(torch.tensor(lengths))

    def _extend(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] at columns write..write+T-1 -> logits [B, T, V]; row b's linear states take
        its first lengths[b] tokens. Advances write and positions by T (keep() goes back)."""
        s = self.stack
        linear_fn, attention_fn = self.extend_fn[LINEAR], self.extend_fn[FULL]
        width = ids.shape[1]
        cols, mask, h, cos, sin = self._chunk_inputs(ids)                      # cos/sin [B, T, rot]
        tape = width <= REWIND_WIDTH
        for i, (kind, weights) in enumerate(zip(s.kinds, s.layers)):
            if kind == LINEAR:
                h = linear_fn(h, *weights, self.conv[i], self.rec[i], self.lengths, s.eps, s.n_k, s.n_v,
                              s.d_k, s.d_v, fused=self.fused, tape=self.tape[i] if tape else None)
            else:
                h = attention_fn(h, *weights, self.k[i], self.v[i], cos, sin, cols, mask, s.eps, s.n_heads, s.n_kv)
        h = zc_rms_norm(h, s.norm, s.eps)
        self.hidden = h                                                      # [B, T, H]
        logits = linear(h, s.lm_head).float()                                # [B, T, V]
        self.mask.index_fill_(-1, cols, 0.0)
        self.positions.add_(width)
        self.write.add_(width)
        return logits

    def _capture_extend(self, width: int) -> tuple:
        saved = self.lengths.clone()
        self.lengths.zero_()
        try:
            return super()._capture_extend(width)
        finally:
            self.lengths.copy_(saved)

    def extend(self, ids: torch.Tensor, spare: int = 0, lengths: list[int] | None = None,
               rewind: bool = False) -> torch.Tensor:
        if rewind:
            padded = self._padded(ids.shape[1], spare)
            if padded > REWIND_WIDTH:
                raise ValueError(f"a forward of {padded} tokens cannot be cut back (at most {REWIND_WIDTH})")
            self._take_snapshot()
        self._rewind = rewind
        return super().extend(ids, spare, lengths)

    def linear_states(self) -> list[torch.Tensor]:
        """Every linear layer's conv state, then every one's recurrent state (the snapshot's order)."""
        return [t for t in self.conv + self.rec if t is not None]

    @torch.inference_mode()
    def _take_snapshot(self) -> None:
        live = self.linear_states()
        if self.batch not in self.snapshots:
            self.snapshots[self.batch] = [torch.empty_like(t) for t in live]
        torch._foreach_copy_(self.snapshots[self.batch], live)      # one call for every layer

    def snapshot_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.snapshots.get(self.batch, ()))

    def keep(self, kept: list[int]) -> None:
        rewind, self._rewind = self._rewind, False
        if kept != self._lengths:
            if not rewind or not all(1 <= n <= m for n, m in zip(kept, self._lengths)) \
                    or len(kept) != len(self._lengths):
                raise ValueError(f"a hybrid bucket keeps the tokens its linear states took ({self._lengths}), "
                                 f"not {kept}: only a forward made with rewind=True can keep fewer")
            self._replay(kept)
        super().keep(kept)

    @torch.inference_mode()
    def _replay(self, kept: list[int]) -> None:
        """Linear states back to the snapshot, then over the kept tokens of the tape."""
        width = self.last_width
        self.kept.fill_(1)                   # the bucket's unused rows took one token in extend()
        self.kept[:len(kept)].copy_(torch.tensor(kept))
        if self.graph is None:
            self._replay_states(width)
            return
        if width not in self.replays:
            self.replays[width] = self._capture_replay(width)
        self.replays[width].replay()

    def _replay_states(self, width: int) -> None:
        s = self.stack
        torch._foreach_copy_(self.linear_states(), self.snapshots[self.batch])
        for i, kind in enumerate(s.kinds):
            if kind == LINEAR:
                replay_linear_state(self.tape[i], width, self.conv[i], self.rec[i], self.kept,
                                    s.n_k, s.n_v, s.d_k, s.d_v, fused=self.fused)

    def _capture_replay(self, width: int) -> torch.cuda.CUDAGraph:
        # The replay starts from the snapshot each time, so the warm-up run leaves the right state.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._replay_states(width)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._replay_states(width)
        return graph

    @torch.inference_mode()
    def load(self, cache, length: int, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Copy a prefilled HF cache (DynamicCache(config=...): LinearAttentionLayer for the linear
        layers; rows = this bucket's first rows) into the buffers. Rows past `rows` get zero states.
        positions / valid as in Bucket.load (valid only masks the attention layers: the linear
        layers' states already ignore left padding when the prefill was given the mask)."""
        rows = positions.shape[0]
        for i, layer in enumerate(cache.layers):
            if self.stack.kinds[i] == LINEAR:
                self.conv[i][:rows].copy_(layer.conv_states[0][..., -self.stack.kernel:])
                self.rec[i][:rows].copy_(layer.recurrent_states[0])
                self.conv[i][rows:].zero_()
                self.rec[i][rows:].zero_()
            else:
                self.k[i][:rows, :, :length].copy_(layer.keys[..., :length, :])
                self.v[i][:rows, :, :length].copy_(layer.values[..., :length, :])
        self._load_io(rows, length, positions, valid)

    @torch.inference_mode()
    def append_to(self, cache, start: int, stop: int, row: int = 0) -> None:
        """Hand the decoded tokens back to a one-row HF cache: attention columns start..stop-1 and
        the linear layers' conv/recurrent states of `row` (copied into the cache's own tensors).
        A linear state exists only for the newest token, so `stop` must be the write column
        (every token fed since `load`)."""
        written = int(self.write)
        if stop != written:
            raise ValueError(f"linear states cover {written} columns, not {stop}: hand back every fed token")
        for i, layer in enumerate(cache.layers):
            if self.stack.kinds[i] == LINEAR:
                conv, rec = layer.conv_states[0], layer.recurrent_states[0]
                if conv.shape[0] != 1:
                    raise ValueError("append_to hands one row back to a one-row cache")
                conv.copy_(self.conv[i][row:row + 1])
                rec.copy_(self.rec[i][row:row + 1])
            else:
                layer.update(self.k[i][row:row + 1, :, start:stop], self.v[i][row:row + 1, :, start:stop])


def _nbytes(value) -> int:
    """Bytes of the tensors in value, through lists, tuples and dict values."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _use_fused_delta_rule(choice: str, device: torch.device, stack: "HybridTextStack") -> bool:
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"delta_rule must be auto, triton or torch, not {choice!r}")
    pow2 = lambda n: n > 0 and n & (n - 1) == 0                                  # noqa: E731
    fits = pow2(stack.d_k) and pow2(stack.d_v) and stack.d_v % 16 == 0 and stack.n_v % stack.n_k == 0
    usable = device.type == "cuda" and fused_delta_rule_available() and fits
    if choice == "triton" and not usable:
        raise ValueError("the Triton delta-rule kernel needs CUDA, Triton and power-of-two head dims")
    return usable if choice == "auto" else choice == "triton"


def _use_split_kv(choice: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether one-token attention runs as the split-KV Triton kernels: on CUDA in 16-bit dtypes
    ("auto"); float32 keeps the torch ops, whose results the eager path matches exactly (tl.dot
    would round float32 inputs to TF32)."""
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"attention must be auto, triton or torch, not {choice!r}")
    from . import attention
    usable = (device.type == "cuda" and attention.split_kv_available() and dtype in (torch.bfloat16, torch.float16)
              and attention.decode_attention_kernel.usable(head_dim, min(CAPACITY_BUCKETS)))
    if choice == "triton" and not usable:
        raise ValueError("the split-KV attention kernels need CUDA, Triton, a 16-bit dtype and a power-of-two head dim")
    return usable if choice == "auto" else choice == "triton"


_COMPILED: dict = {}


def _compiled(fn):
    """One compiled function per layer kind for the process, so engines share its per-shape
    compilations."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


def _compiled_layer_step():
    return _compiled(layer_step)


class StaticDecoder:
    """Buckets by (batch, capacity), created on first use or at warm-up."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, use_graphs: bool, compile_layers: bool,
                 delta_rule: str = "auto", int8: bool = False, attention: str = "auto", gemv: str = "auto"):
        """delta_rule (hybrid stacks): "triton" (one kernel per layer), "torch" (plain ops), or
        "auto": Triton on CUDA when it imports and the head dims suit it. int8: decode reads
        weight-only int8 copies of the linear weights (int8_weights.py). attention: one-token
        attention as the split-KV kernels ("triton"), torch ops ("torch"), or "auto" (see _use_split_kv).
        gemv: "auto" times the one-row Triton GEMV against cuBLAS per weight shape on CUDA in 16-bit
        dtypes and keeps the faster (gemv_kernel.py; the timings in `gemv_report`), "cublas": F.linear."""
        if gemv not in ("auto", "cublas"):
            raise ValueError(f"gemv must be auto or cublas, not {gemv!r}")
        self.hybrid = is_hybrid(model)
        tune = (gemv == "auto" and not int8 and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16))
        tuner = step_linear.tuner() if tune else None
        self.stack = HybridTextStack(model, int8, tuner) if self.hybrid else TextStack(model, int8, tuner)
        self.gemv_report = tuner.report if tuner is not None else {}
        self.bucket_class = HybridBucket if self.hybrid else Bucket
        self.fused_delta_rule = self.hybrid and _use_fused_delta_rule(delta_rule, device, self.stack)
        self.split_kv = _use_split_kv(attention, device, dtype, self.stack.head_dim)
        self.device, self.dtype = device, dtype
        self.use_graphs = use_graphs and device.type == "cuda"
        self.layer_fn = {LINEAR: linear_layer_step, FULL: gated_attention_layer_step} if self.hybrid else layer_step
        if compile_layers:
            from torch import _dynamo
            # One specialisation per bucket shape; the default limit (8) would silently fall
            # back to eager once more buckets exist.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(_dynamo.config, name):
                    setattr(_dynamo.config, name, max(64, getattr(_dynamo.config, name)))
            if self.hybrid:
                self.layer_fn = {kind: _compiled(fn) for kind, fn in self.layer_fn.items()}
            else:
                self.layer_fn = _compiled_layer_step()
        # One compilation per chunk width T (dynamic=False), like one per bucket shape.
        self.extend_fn = ({LINEAR: linear_layer_extend, FULL: gated_attention_layer_extend} if self.hybrid
                          else layer_extend)
        if compile_layers:
            self.extend_fn = ({kind: _compiled(fn) for kind, fn in self.extend_fn.items()} if self.hybrid
                              else _compiled(layer_extend))
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.snapshots: dict[int, list[torch.Tensor]] = {}   # hybrid: linear states set aside by a verify, per batch

    def nbytes(self) -> int:
        """Bytes the buckets hold (K/V, linear states, tapes, the multi-token widths' input and
        logits buffers) and the hybrid snapshots, allocated at a batch size's first verify. Not
        seen here: the CUDA graphs' private pools of intermediates."""
        return sum(bucket.nbytes() for bucket in self.buckets.values()) + _nbytes(list(self.snapshots.values()))

    @staticmethod
    def bucket_shape(rows: int, columns: int) -> tuple[int, int] | None:
        batch = next((b for b in BATCH_BUCKETS if b >= rows), None)
        capacity = next((c for c in CAPACITY_BUCKETS if c >= columns), None)
        return (batch, capacity) if batch and capacity else None

    def bucket(self, rows: int, columns: int) -> Bucket | None:
        shape = self.bucket_shape(rows, columns)
        if shape is None:
            return None          # too long or too wide: the caller decodes eagerly
        if shape not in self.buckets:
            with torch.inference_mode():    # buffers are written only under inference mode
                extra = {"fused": self.fused_delta_rule, "snapshots": self.snapshots} if self.hybrid else {}
                bucket = self.bucket_class(self.stack, *shape, self.device, self.dtype, self.layer_fn,
                                           extend_fn=self.extend_fn, split_kv=self.split_kv, **extra)
                if self.use_graphs:
                    bucket.capture()
            self.buckets[shape] = bucket
        return self.buckets[shape]

    def warm_up(self, shapes, widths=(PREFILL_WIDTH,)) -> None:
        """Create (capture) the buckets; one-row buckets also capture these multi-token widths
        (the short-prefill width, which every follow-up uses; jump-forward and draft widths), so
        a first turn does not compile and capture one mid-turn (1.5-6 s each on the H200)."""
        for rows, columns in shapes:
            bucket = self.bucket(rows, columns)
            if bucket is not None and rows == 1 and bucket.graph is not None and bucket.multi_token:
                for width in widths:
                    if width not in bucket.wide and width <= bucket.capacity:
                        with torch.inference_mode():
                            bucket.wide[width] = bucket._capture_extend(width)
