"""Windowed vision attention in a few batched SDPA calls instead of one call per window.

Without flash-attn, transformers' Qwen-VL vision attention splits the patch sequence at
`cu_seqlens` and calls SDPA once per window or image: 88 windows x 28 layers = 2,464 small
calls for a 1232x896 image, launch-bound. Any attention implementation whose name contains
"flash" is handed `cu_seqlens` in one call instead, so we register one: windows of equal
length (most are) are gathered into a batch and attended together; the result is the same
block-diagonal attention. Used for the vision tower only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "corgi_flash_varlen_sdpa"   # contains "flash": transformers passes cu_seqlens


def window_groups(cu_seqlens: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(window length, number of windows, [windows*length] positions on the device) per distinct
    length. Computed once per `cu_seqlens` tensor and kept on it: the tower hands the same two
    tensors (windows, whole images) to every block, and reading them back to the host (`tolist`)
    in every block would make the host wait for the GPU 32 times a tower call, so no block's
    launches overlap the previous block's work."""
    groups = getattr(cu_seqlens, "_corgi_window_groups", None)
    if groups is None:
        cu = cu_seqlens.tolist()
        by_length: dict[int, list[int]] = {}
        for start, stop in zip(cu[:-1], cu[1:]):
            by_length.setdefault(stop - start, []).append(start)
        device = cu_seqlens.device
        groups = [(length, len(starts),
                   (torch.tensor(starts, device=device)[:, None]
                    + torch.arange(length, device=device)[None, :]).view(-1))
                  for length, starts in by_length.items()]
        cu_seqlens._corgi_window_groups = groups
    return groups


# A custom op: opaque to torch.compile, so a compiled vision block (vision.compile_tower_blocks)
# is one graph around it. Traced, its loop over window lengths would specialise the graph on
# each image set's windows and recompile for new ones; a graph break instead costs two more
# compiled-frame entries per block, which outweighed the fusion on a one-crop call (H100).
@torch.library.custom_op("corgi::varlen_sdpa", mutates_args=())
def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """query/key/value [1, H, N, D]; segment i is positions cu[i]..cu[i+1]-1 and attends only
    within itself. Returns [1, H, N, D]."""
    _, heads, n, dim = query.shape
    out = torch.empty_like(query)
    for length, windows, index in window_groups(cu_seqlens):
        gather = lambda t: t[0].index_select(1, index).view(heads, windows, length, dim).transpose(0, 1)
        attended = F.scaled_dot_product_attention(gather(query), gather(key), gather(value), scale=scale)
        out[0].index_copy_(1, index, attended.transpose(0, 1).reshape(heads, -1, dim))
    return out


@segment_attention.register_fake
def _(query, key, value, cu_seqlens, scale):
    return torch.empty_like(query)


def varlen_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                cu_seq_lens_q=None, is_causal=False, **kwargs):
    """transformers' attention-function signature: query/key/value [1, H, N, D], segments at
    cu_seq_lens_q. Returns ([1, N, H, D], None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return segment_attention(query, key, value, cu_seq_lens_q, scale).transpose(1, 2), None


def use_for_vision(model) -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, varlen_sdpa)
    visual = model.model.visual
    visual.config._attn_implementation = NAME
