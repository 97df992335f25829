"""The decoder's RMSNorms as plain tensor functions, each with the arithmetic of its HF module
(the compiled step must round where the model rounds)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm (Qwen2-VL .. Qwen3-VL): float32 statistics, cast back, then scale by w."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def zc_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3_5RMSNorm (zero-centred): statistics *and* the (1 + w) scale in float32, then cast.
    (Qwen2RMSNorm instead casts first and multiplies by w.) Decoder norms, final norm, q/k norms."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * (1.0 + weight.float())).to(dtype)
