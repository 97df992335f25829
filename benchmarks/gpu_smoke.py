"""First check on a GPU: the engine runs on CUDA, the static decoder captures CUDA graphs,
and its greedy tokens equal the eager HF path (tiny models, float32 and bf16).

    python benchmarks/gpu_smoke.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from corgi.config import load_config  # noqa: E402
from corgi.engine.engine import Engine  # noqa: E402
from corgi.engine.loading import load_model  # noqa: E402
from corgi.images import load_image  # noqa: E402
from corgi.pipeline import ChatSession  # noqa: E402
from corgi.types import TurnFinished  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def turns(engine, image, questions):
    session = ChatSession(engine, image)
    out = []
    for q in questions:
        for event in session.ask(q):
            if isinstance(event, TurnFinished):
                out.append(event.result)
    return session, out


ARMS = (("tiny-qwen2.5-vl", "float32"), ("tiny-qwen3-vl", "float32"), ("tiny-qwen3.5", "float32"),
        ("tiny-qwen2.5-vl", "bfloat16"))


def main() -> int:
    """Arms by model name as arguments (default: all); the hybrid twin's static step runs the
    Triton delta-rule kernel on CUDA (static_decode: delta_rule "auto")."""
    wanted = sys.argv[1:]
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
    image = load_image(ROOT / "assets" / "street-scene.png", 10**8)
    questions = ["What does the sign say?", "And the car?"]
    failures = 0
    for model, dtype in ARMS:
        if not wanted or model in wanted:
            over = {"model.id": model, "model.dtype": dtype, "model.device": "cuda", "model.warmup": False}
            eager_cfg = load_config(None, dict(over, **{"model.compile": False}))
            static_cfg = load_config(None, dict(over, **{"model.compile": True}))
            lm = load_model(eager_cfg.model, eager_cfg.image)
            t0 = time.perf_counter()
            eager, eager_turns = turns(Engine(lm, eager_cfg), image, questions)
            t1 = time.perf_counter()
            static_engine = Engine(lm, static_cfg)
            static, static_turns = turns(static_engine, image, questions)     # includes compile+capture
            t2 = time.perf_counter()
            static2, _ = turns(static_engine, image, questions)              # warm
            t3 = time.perf_counter()
            same = static.conv.token_ids == eager.conv.token_ids
            n = len(eager.conv.token_ids)
            agree = sum(a == b for a, b in zip(static.conv.token_ids, eager.conv.token_ids)) / n
            print(f"{model} {dtype}: identical={same} agreement={agree:.4f} tokens={n} "
                  f"eager={t1 - t0:.2f}s static(first)={t2 - t1:.2f}s static(warm)={t3 - t2:.2f}s "
                  f"buckets={sorted(static_engine.static.buckets)} graphs={static_engine.static.use_graphs} "
                  f"fused_delta_rule={static_engine.static.fused_delta_rule}")
            if dtype == "float32" and not same:
                failures += 1
    print("FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
