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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BATCH_BUCKETS = (1, 2, 4, 8)
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
               k_cache, v_cache, cos, sin, write, mask, eps: float, n_heads: int, n_kv: int):
    """One decoder layer for one new token per row.
    h [B, H]; wqkv [(Hq+2*Hkv)*D, H] (q|k|v stacked); wgu [2*I, H] (gate|up stacked);
    k_cache/v_cache [B, Hkv, C, D]; cos/sin [B, D]; write [1] (column); mask [B, 1, 1, C]."""
    batch = h.shape[0]
    head_dim = k_cache.shape[-1]
    x = rms_norm(h, ln1, eps)
    # One GEMV for q, k and v: at batch 1 separate k/v projections are latency-bound
    # (5 us each for 1 MB of weights, measured on an H100).
    q, k, v = F.linear(x, wqkv, bqkv).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(batch, n_heads, head_dim)                         # [B, Hq, D]
    k = k.reshape(batch, n_kv, head_dim)                            # [B, Hkv, D]
    v = v.reshape(batch, n_kv, head_dim)
    if qn is not None:                                              # Qwen3: per-head q/k norms
        q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
    cos, sin = cos[:, None, :], sin[:, None, :]                     # [B, 1, D]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, write, k[:, :, None, :])                 # write column `write`
    v_cache.index_copy_(2, write, v[:, :, None, :])
    # Grouped-query attention without repeating K/V: [B, Hkv, G, D] x [B, Hkv, D, C].
    q = q.view(batch, n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(q, k_cache.transpose(-1, -2)) * head_dim ** -0.5   # [B, Hkv, G, C]
    probs = torch.softmax(scores.float() + mask, dim=-1).to(q.dtype)
    out = torch.matmul(probs, v_cache).reshape(batch, n_heads * head_dim)   # [B, Hq*D]
    h = h + F.linear(out, wo)
    x = rms_norm(h, ln2, eps)
    gate, up = F.linear(x, wgu).chunk(2, dim=-1)                     # one GEMV for gate and up
    return h + F.linear(F.silu(gate) * up, wd)


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


class TextStack:
    """The text decoder's weights as plain tensors, per layer, for `layer_step`."""

    def __init__(self, model):
        lm = model.model.language_model
        cfg = model.config.get_text_config()
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.embed = lm.embed_tokens.weight
        self.norm = lm.norm.weight
        self.lm_head = model.lm_head.weight
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
                layer.input_layernorm.weight, wqkv, bqkv, attn.o_proj.weight,
                qn.weight if qn is not None else None, kn.weight if kn is not None else None,
                layer.post_attention_layernorm.weight, wgu, mlp.down_proj.weight))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B] -> cos, sin [B, D], computed in float32 like HF, then cast."""
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)


class Bucket:
    """Static buffers (and, on CUDA, the captured graph) for B rows x C columns."""

    def __init__(self, stack: TextStack, batch: int, capacity: int, device, dtype, layer_fn):
        self.stack, self.batch, self.capacity, self.layer_fn = stack, batch, capacity, layer_fn
        shape = (batch, stack.n_kv, capacity, stack.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in stack.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in stack.layers]
        self.mask = torch.full((batch, 1, 1, capacity), float("-inf"), device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)      # graph inputs
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.write = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = None                                                     # graph output
        self.graph = None
        self.dtype = dtype

    def _step(self) -> torch.Tensor:
        s = self.stack
        self.mask.index_fill_(-1, self.write, 0.0)     # the new token sees itself
        h = F.embedding(self.tokens, s.embed)          # [B, H]
        cos, sin = s.rope(self.positions, self.dtype)
        for i, weights in enumerate(s.layers):
            h = self.layer_fn(h, *weights, self.k[i], self.v[i], cos, sin, self.write, self.mask,
                              s.eps, s.n_heads, s.n_kv)
        h = rms_norm(h, s.norm, s.eps)
        logits = F.linear(h, s.lm_head).float()        # [B, V]
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
        for t, value in zip((self.mask, self.positions, self.write), saved):
            t.copy_(value)

    @torch.inference_mode()
    def load(self, cache, length: int, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Copy a prefilled HF cache (rows = this bucket's first rows) into the buffers.
        positions [rows]: the rope position of each row's next token; valid [rows, length]
        (1 = attend) for left-padded batches, or None when every column is valid."""
        rows = positions.shape[0]
        for i, layer in enumerate(cache.layers):
            self.k[i][:rows, :, :length].copy_(layer.keys[..., :length, :])
            self.v[i][:rows, :, :length].copy_(layer.values[..., :length, :])
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
                logits = self.logits[:rows]
            else:
                logits = self._step()[:rows]
        return logits.clone()   # outside inference mode: an ordinary tensor

    @torch.inference_mode()
    def append_to(self, cache, start: int, stop: int) -> None:
        """Hand columns start..stop-1 (row 0) back to the conversation's HF cache."""
        for i, layer in enumerate(cache.layers):
            layer.update(self.k[i][:1, :, start:stop], self.v[i][:1, :, start:stop])


_COMPILED = None


def _compiled_layer_step():
    """One compiled function for the process, so engines share its per-shape compilations."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(layer_step, fullgraph=True, dynamic=False)
    return _COMPILED


class StaticDecoder:
    """Buckets by (batch, capacity), created on first use or at warm-up."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, use_graphs: bool, compile_layers: bool):
        self.stack = TextStack(model)
        self.device, self.dtype = device, dtype
        self.use_graphs = use_graphs and device.type == "cuda"
        self.layer_fn = layer_step
        if compile_layers:
            import torch._dynamo
            # One specialisation per bucket shape; the default limit (8) would silently fall
            # back to eager once more buckets exist.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            self.layer_fn = _compiled_layer_step()
        self.buckets: dict[tuple[int, int], Bucket] = {}

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
                bucket = Bucket(self.stack, *shape, self.device, self.dtype, self.layer_fn)
                if self.use_graphs:
                    bucket.capture()
            self.buckets[shape] = bucket
        return self.buckets[shape]

    def warm_up(self, shapes) -> None:
        for rows, columns in shapes:
            self.bucket(rows, columns)
