"""`model.quantization: int8-decode`: the compiled step reads weight-only int8 copies of the
linear weights (corgi/engine/int8_weights.py; on CUDA one Triton kernel, measured in
benchmarks/gpu_quant.py). On the CPU the same arithmetic runs as torch ops, which is what these
tests hold against the float path."""
from __future__ import annotations

import pytest
import torch

from conftest import TRITON_CHECKS, check_interpreted, fast_config, run_turn
from corgi.engine.engine import Engine
from corgi.engine.int8_weights import Int8Weight, dequantize, quantize
from corgi.engine.step_linear import linear
from corgi.engine.loading import load_model
from corgi.pipeline import ChatSession


def test_int8_linear_is_the_dequantised_linear():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    x = torch.randn(3, 5, 64, generator=gen)
    q = quantize(w)
    assert q.q.dtype == torch.int8 and q.scale.shape == (48,) and int(q.q.abs().max()) == 127
    assert (dequantize(q, torch.float32) - w).abs().max() <= q.scale.max() / 2 + 1e-6   # half a step
    assert torch.allclose(linear(x, q), torch.nn.functional.linear(x, dequantize(q, torch.float32)), atol=1e-5)
    again = quantize(dequantize(q, torch.float32))          # idempotent: the test below relies on it
    assert torch.equal(again.q, q.q) and torch.allclose(again.scale, q.scale)
    assert linear(x, w).shape == (3, 5, 48)                  # plain weights pass straight through


KERNEL_CHECK = """
import torch
from corgi.engine import int8_kernel
from corgi.engine.int8_weights import quantize
torch.manual_seed(0)
# One row and float32 rows: the GEMV; float16 rows: the tensor-core tiles (the interpreter gets
# bfloat16 wrong: NumPy has no bfloat16, so the GPU check in gpu_quant.py covers that dtype).
for rows, n, k, dtype in ((1, 40, 96, torch.float32), (3, 40, 96, torch.float32), (6, 40, 96, torch.float16),
                          (40, 72, 64, torch.float16)):
    w, x, b = torch.randn(n, k) * 0.02, torch.randn(rows, k).to(dtype), torch.randn(n).to(dtype)
    q = quantize(w)
    ref = x.float() @ q.q.float().T * q.scale + b.float()
    got = int8_kernel.int8_linear(x, q.q, q.scale, b).float()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert got.shape == (rows, n) and err < 2e-3, (rows, n, k, dtype, err)
print("ok")
"""


TRITON_CHECKS["int8 linear"] = KERNEL_CHECK     # one interpreter process with test_step_kernels.py's


def test_the_triton_kernels_compute_the_dequantised_product(triton_interpreted):
    """The CUDA kernels themselves (int8_kernel.py), run by Triton's interpreter on the CPU: every
    dispatch branch of int8_linear against the dequantised float32 product."""
    check_interpreted(triton_interpreted, "int8 linear")


def _int8_weights(stack) -> list[torch.Tensor]:
    """The tensors the int8 stack keeps copies of, on a float stack over the same model."""
    found = [stack.lm_head]
    for layer in stack.layers:
        found += [t for t in layer if isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype.is_floating_point
                  and t.shape[1] > 8]                    # linear weights (conv kernels are [C, 4])
    return found


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen3.5"])
def test_int8_decode_equals_the_float_step_on_the_same_weights(model, street_image):
    """A private copy of the twin whose weights are already on the int8 grid (quantised and back):
    then the int8 step must write exactly the float step's tokens."""
    # Half the suite's reasoning and answer budgets: every token still runs the int8 step, and the
    # Qwen3.5 twin's tokens are the dearest on a CPU.
    budgets = dict(model__compile=True, model__warmup=False, pipeline__reasoning_max_new_tokens=48,
                   pipeline__synthesis_max_new_tokens=32)
    config = fast_config(model, **budgets)
    lm = load_model(config.model, config.image)      # private: its weights are changed below
    plain = Engine(lm, config)
    with torch.no_grad():
        for w in _int8_weights(plain.static.stack):
            w.copy_(dequantize(quantize(w), w.dtype))
    int8 = Engine(lm, fast_config(model, model__quantization="int8-decode", **budgets))
    assert isinstance(int8.static.stack.lm_head, Int8Weight)
    assert any(isinstance(t, Int8Weight) for t in int8.static.stack.layers[0])
    sessions = [ChatSession(engine, street_image) for engine in (plain, int8)]
    for session in sessions:
        run_turn(session, "What does the sign say?")
    assert sessions[1].conv.token_ids == sessions[0].conv.token_ids
    assert int8.static.buckets, "the static path was really used"


def test_int8_decode_without_compile_says_so(caplog):
    config = fast_config("tiny-qwen2.5-vl", model__quantization="int8-decode")
    from conftest import loaded_model
    with caplog.at_level("WARNING"):
        engine = Engine(loaded_model("tiny-qwen2.5-vl"), config)
    assert engine.static is None and "int8-decode needs model.compile" in caplog.text
