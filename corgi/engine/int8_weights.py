"""Weight-only int8 for the compiled decode step (`model.quantization: int8-decode`).

The static step's linear weights (and the lm_head) get an int8 copy with one float32 scale per
output row (symmetric, absmax / 127); decode reads those, half the bytes of bf16, through the
Triton kernel on CUDA (int8_kernel.py). Prefill, the vision tower and every non-static path keep
the model's own weights, so memory grows by one byte per quantized weight instead of shrinking:
this is a speed option, not a memory one (bitsandbytes' 8bit/4bit are the memory options).
Off CUDA the same arithmetic runs as torch ops (dequantise, then F.linear): the tests' path.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    from . import int8_kernel
except ImportError:       # no Triton (CPU wheels): the torch ops below
    int8_kernel = None


class Int8Weight(NamedTuple):
    q: torch.Tensor           # int8 [N, K]
    scale: torch.Tensor       # float32 [N]


def quantize(weight: torch.Tensor) -> Int8Weight:
    """weight [N, K] -> its per-row symmetric int8 copy (the weight itself is left as it is)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scale.contiguous())


def dequantize(weight: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    return (weight.q.float() * weight.scale[:, None]).to(dtype)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a plain weight or an Int8Weight. x [..., K] -> [..., N]."""
    if not isinstance(weight, Int8Weight):
        return F.linear(x, weight, bias)
    if x.is_cuda and int8_kernel is not None:
        flat = x.reshape(-1, x.shape[-1]).contiguous()                  # [M, K]
        return int8_kernel.int8_linear(flat, weight.q, weight.scale, bias).reshape(*x.shape[:-1], -1)
    out = F.linear(x.float(), weight.q.float()) * weight.scale          # same products, float32 sums
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
