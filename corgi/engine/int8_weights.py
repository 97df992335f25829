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
