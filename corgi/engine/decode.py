"""The model step and sampling, gpt-fast style: plain functions over tensors.

Shapes: B = batch rows, T = new tokens this step, S = all tokens attended (cache + new),
V = vocabulary. Positions are M-RoPE: three rows (temporal, height, width); text tokens
after the image use the same value on all three rows, `index + rope_delta`.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .vision import EncoderOutput


def text_positions(start: int, stop: int, delta: int | torch.Tensor, batch: int,
                   device: torch.device) -> torch.Tensor:
    """[3, B, stop-start] positions of text tokens at sequence indices start..stop-1.

    `delta` is the conversation's own rope delta (scalar, or [B, 1] for a batch); it is passed
    in explicitly so the model's shared `rope_deltas` attribute is never consulted."""
    pos = torch.arange(start, stop, device=device).view(1, 1, -1).expand(3, batch, -1)
    if isinstance(delta, torch.Tensor):
        delta = delta.to(device).view(1, -1, 1)
    return pos + delta


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
            attention_mask: torch.Tensor | None = None,
            images: EncoderOutput | None = None) -> torch.Tensor:
    """Run input_ids [B, T] on top of `cache` (extended in place); logits [B, V] of the last position.

    Only the last position goes through lm_head: a 1500-token prefill would otherwise build a
    [1500, 151k] logits tensor nobody reads."""
    out = model.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                      attention_mask=attention_mask, use_cache=True,
                      mm_encoder_outputs={"image": images} if images is not None else None)
    hidden = out.last_hidden_state[:, -1]          # [B, hidden]
    return model.lm_head(hidden).float()           # [B, V]


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (masked entries are -inf) -> token ids [B]. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p   # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)
