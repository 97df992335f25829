"""The decode step's linear layer, for the three ways a stack keeps a weight: the model's tensor
(F.linear, cuBLAS), an `Int8Weight` (model.quantization: int8-decode; int8_weights.py, the Triton
kernel of int8_kernel.py on CUDA) or a `TunedWeight` (a bf16/fp16 weight whose one-row product
beat cuBLAS on this device as the GEMV of gemv_kernel.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .int8_weights import Int8Weight

try:
    from . import gemv_kernel, int8_kernel
except ImportError:       # no Triton (CPU wheels): torch ops only
    gemv_kernel = int8_kernel = None


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for any of the three. x [..., K] -> [..., N]."""
    if isinstance(weight, Int8Weight):
        if x.is_cuda and int8_kernel is not None:
            flat = x.reshape(-1, x.shape[-1]).contiguous()                  # [M, K]
            return int8_kernel.int8_linear(flat, weight.q, weight.scale, bias).reshape(*x.shape[:-1], -1)
        out = F.linear(x.float(), weight.q.float()) * weight.scale          # same products, float32 sums
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    if gemv_kernel is not None and isinstance(weight, gemv_kernel.TunedWeight):
        return gemv_kernel.one_row_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def tuner():
    """A GemvTuner where Triton imports, else None (the stacks keep plain tensors)."""
    return gemv_kernel.GemvTuner() if gemv_kernel is not None else None
