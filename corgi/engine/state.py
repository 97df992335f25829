"""The per-layer model state a conversation keeps, for both kinds of text stack.

    "kv"      every layer attends: K/V per layer (GrowingLayer, kv.py). Cutting back to any
              length is a view change.
    "hybrid"  Qwen3.5/3.6: Gated DeltaNet layers keep a conv state [B, conv_dim, kernel] and a
              recurrent state [B, heads, k_dim, v_dim] (fp32), updated in place, with no
              history: they cannot be cut back. Every 4th layer attends (K/V as above).
              Going back to a boundary = restore a snapshot of the linear states taken there
              and cut the attention layers to the same length; what follows is recomputed.

transformers 5.23 builds the hybrid cache with `DynamicCache(config=...)`
(LinearAttentionLayer for the linear layers); tests/test_qwen35_facts.py checks the facts used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

from .kv import GrowingLayer


def new_cache(text_config, hybrid: bool) -> DynamicCache:
    """An empty cache for one conversation (or one batch of rows)."""
    if not hybrid:
        cache = DynamicCache()
        cache.layers = [GrowingLayer() for _ in range(text_config.num_hidden_layers)]
        return cache
    cache = DynamicCache(config=text_config)
    # Attention layers grow in place instead of torch.cat per token; linear layers stay HF's.
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def is_linear(layer) -> bool:
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def _tensors(layer) -> list[torch.Tensor]:
    out = []
    if is_linear(layer):
        out += [t for t in layer.conv_states.values() if isinstance(t, torch.Tensor)]
        out += [t for t in layer.recurrent_states.values() if isinstance(t, torch.Tensor)]
    return out


def cache_nbytes(cache: DynamicCache | None) -> int:
    """Bytes held, spare K/V capacity included (what the memory budget must count)."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer) and layer.is_initialized:
            total += layer.nbytes()
        elif is_linear(layer):
            total += sum(t.numel() * t.element_size() for t in _tensors(layer))
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def cut_attention(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` columns of every attention layer (layers a failed forward
    left longer or shorter are all brought to `length` or below)."""
    for layer in cache.layers:
        if is_linear(layer) or not getattr(layer, "is_initialized", False):
            continue
        used = layer.get_seq_length()
        if used > length:
            layer.crop(length - used)          # 5.23: a negative count of tokens to remove


@dataclass
class Snapshot:
    """The linear layers' state after exactly `length` tokens (clones: the live state moves on)."""
    length: int
    layers: dict[int, tuple[list[torch.Tensor | None], list[torch.Tensor | None], dict]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for conv, rec, _ in self.layers.values() for t in conv + rec if t is not None)


@torch.inference_mode()    # the cache's tensors are inference tensors
def take_snapshot(cache: DynamicCache, length: int) -> Snapshot:
    layers = {}
    for i, layer in enumerate(cache.layers):
        if not is_linear(layer):
            continue
        keys = sorted(layer.conv_states)
        conv = [layer.conv_states[k].clone() if isinstance(layer.conv_states[k], torch.Tensor) else None for k in keys]
        rec = [layer.recurrent_states[k].clone() if isinstance(layer.recurrent_states[k], torch.Tensor) else None
               for k in keys]
        flags = {"has_previous_state": dict(layer.has_previous_state)}
        layers[i] = (conv, rec, flags)
    return Snapshot(length, layers)


@torch.inference_mode()
def restore(cache: DynamicCache, snapshot: Snapshot) -> None:
    """Put the linear layers back to `snapshot` (copied in: the snapshot stays reusable) and
    cut the attention layers to its length."""
    for i, (conv, rec, flags) in snapshot.layers.items():
        layer = cache.layers[i]
        for k, (c, r) in enumerate(zip(conv, rec)):
            if c is not None:
                layer.conv_states[k].copy_(c)
            if r is not None:
                layer.recurrent_states[k].copy_(r)
        layer.has_previous_state.update(flags["has_previous_state"])
    cut_attention(cache, snapshot.length)
