"""The decode step's linear layer, for the three ways a stack keeps a weight: the model's tensor
(F.linear, cuBLAS), an `Int8Weight` (model.quantization: int8-decode; int8_weights.py, the Triton
kernel of int8_kernel.py on CUDA) or a `TunedWeight` (a bf16/fp16 weight whose one-row product
beat cuBLAS on this device as the GEMV of gemv_kernel.py).

`norm_linear` and `swiglu_linear` are the step's products together with what surrounds them (the
RMSNorm before, SwiGLU before, the residual add after): one kernel for a TunedWeight tuned for
that op (one CUDA row), else the same torch ops as always, so the eager and CPU paths and the
multi-row buckets compute exactly what they did."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .int8_weights import Int8Weight
from .norms import rms_norm, zc_rms_norm

try:
    from . import gemv_kernel, int8_kernel
except ImportError:       # no Triton (CPU wheels): torch ops only
    gemv_kernel = int8_kernel = None


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for any of the three, plus `residual` when given. x [..., K] -> [..., N]."""
    if residual is not None:
        if _fusable(x, weight, "none", True):
            return gemv_kernel.fused_linear(x, weight, bias, residual=residual)
        return residual + linear(x, weight, bias)
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


def norm_linear(h: torch.Tensor, norm: torch.Tensor, eps: float, weight, bias: torch.Tensor | None = None,
                zero_centred: bool = False) -> torch.Tensor:
    """linear(RMSNorm(h)): Qwen2RMSNorm, or Qwen3_5RMSNorm with zero_centred. h [..., K] -> [..., N]."""
    prologue = "zc-rms" if zero_centred else "rms"
    if _fusable(h, weight, prologue, False):
        return gemv_kernel.fused_linear(h, weight, bias, norm=norm, eps=eps)
    x = zc_rms_norm(h, norm, eps) if zero_centred else rms_norm(h, norm, eps)
    return linear(x, weight, bias)


def swiglu_linear(gate_up: torch.Tensor, weight, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(silu(gate) * up), gate_up [..., 2I] (gate | up) -> [..., N]: the MLP's
    down projection."""
    if _fusable(gate_up, weight, "swiglu", True):
        return gemv_kernel.fused_linear(gate_up, weight, residual=residual)
    gate, up = gate_up.chunk(2, dim=-1)
    return residual + linear(F.silu(gate) * up, weight)


def _fusable(x: torch.Tensor, weight, prologue: str, residual: bool) -> bool:
    return gemv_kernel is not None and gemv_kernel.fusable(x, weight, prologue, residual)


def tuner(fuse: bool = True):
    """A GemvTuner where Triton imports, else None (the stacks keep plain tensors). fuse=False:
    time the plain product only (every norm, SwiGLU and residual stays a torch op)."""
    return gemv_kernel.GemvTuner(fuse) if gemv_kernel is not None else None
