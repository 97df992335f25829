"""The decode step's CUDA kernels against the torch ops they replace, run by Triton's interpreter
on the CPU (the interpreter gets bfloat16 tl.dot wrong, so float32/float16 here; the GPU runs of
benchmarks/gpu_decode_step.py check bfloat16):
- the split-KV decode attention (decode_attention_kernel.py) against attention.decode_attention's
  torch ops: grouped heads (8, 4 and a group of 7 that is padded), head dims 128 and 256 (Qwen3.5),
  rows whose valid columns end at different places, so whole column blocks are masked out and the
  merge must drop them;
- the one-row GEMV (gemv_kernel.py) against F.linear, with and without bias, at shapes that
  leave partial row blocks and column slices, for every config the tuner may pick."""
from __future__ import annotations

import pytest
import torch

from conftest import TRITON_CHECKS, check_interpreted

CHECK = """
import torch
from corgi.engine.attention import decode_attention
torch.manual_seed(0)
for n_heads, n_kv, head_dim, capacity, lengths, dtype in (
        (16, 2, 128, 512, (300, 17), torch.float32),      # 3B-like groups of 8; row 1 leaves 7 blocks empty
        (16, 4, 256, 1024, (1000, 64), torch.float16),    # Qwen3.5 head dim; 64: exactly one block
        (28, 4, 64, 512, (512, 129), torch.float32)):     # a group of 7 (padded to 16); a full buffer
    batch = len(lengths)
    k_cache = torch.randn(batch, n_kv, capacity, head_dim).to(dtype)
    v_cache = torch.randn(batch, n_kv, capacity, head_dim).to(dtype)
    mask = torch.full((batch, 1, 1, capacity), float("-inf"))
    for b, n in enumerate(lengths):
        mask[b, ..., :n] = 0.0                             # row b sees its first n columns
    write = torch.tensor([max(lengths) - 1])               # the new token's column (seen by every row)
    q = torch.randn(batch, n_heads, head_dim).to(dtype)
    k, v = torch.randn(batch, n_kv, head_dim).to(dtype), torch.randn(batch, n_kv, head_dim).to(dtype)
    mask[:, ..., write] = 0.0
    ref = decode_attention(q.float(), k.float(), v.float(), k_cache.float().clone(), v_cache.float().clone(),
                           write, mask, split_kv=False)
    got = decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), write, mask, split_kv=True)
    assert got.shape == (batch, n_heads * head_dim) and got.dtype == dtype, (got.shape, got.dtype)
    err = (got.float() - ref).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert err < tol, (n_heads, n_kv, head_dim, capacity, dtype, err)
print("ok")
"""


GEMV_CHECK = """
import torch
import torch.nn.functional as F
from corgi.engine.gemv_kernel import CONFIGS, gemv
torch.manual_seed(0)
for n, k, dtype, with_bias in ((40, 96, torch.float32, True), (37, 1100, torch.float16, False)):
    w, x, b = torch.randn(n, k).to(dtype), torch.randn(k).to(dtype), torch.randn(n).to(dtype)
    bias = b if with_bias else None
    ref = F.linear(x.float()[None], w.float(), bias.float() if with_bias else None)[0]
    for config in CONFIGS:
        got = gemv(x, w, bias, *config)
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        assert got.shape == (n,) and got.dtype == dtype and err < 2e-3, (n, k, dtype, config, err)
print("ok")
"""


# Run by Triton's interpreter in one subprocess with test_int8_decode.py's kernel check (conftest.py).
TRITON_CHECKS.update({"split-kv decode attention": CHECK, "one-row gemv": GEMV_CHECK})


def test_the_split_kv_kernels_equal_the_torch_attention(triton_interpreted):
    check_interpreted(triton_interpreted, "split-kv decode attention")


def test_the_one_row_gemv_equals_f_linear_for_every_config(triton_interpreted):
    check_interpreted(triton_interpreted, "one-row gemv")


def test_the_static_decoder_refuses_an_unknown_kernel_choice():
    from conftest import loaded_model
    from corgi.engine.static_decode import StaticDecoder
    lm = loaded_model("tiny-qwen2.5-vl")
    for kwargs, word in (({"gemv": "fast"}, "gemv"), ({"attention": "flash"}, "attention")):
        with pytest.raises(ValueError, match=word):
            StaticDecoder(lm.model, torch.device("cpu"), torch.float32, False, False, **kwargs)
    with pytest.raises(ValueError, match="split-KV"):             # no CUDA here
        StaticDecoder(lm.model, torch.device("cpu"), torch.float32, False, False, attention="triton")
