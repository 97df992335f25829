"""One decode step of a real-shape random model, its arms side by side on one GPU.

    python3 benchmarks/gpu_decode_step.py --shape qwen3.5-4b [--profile] [--out FILE]
    python3 benchmarks/gpu_decode_step.py --shape qwen3-vl-30b-a3b        # MoE: eager HF arms

Dense and hybrid shapes: the engine's static step (compiled layers, one CUDA graph per bucket)
at batch 1 with `--context` cached tokens, for each arm of kernels (ARMS: the delta rule as torch
ops or corgi/engine/delta_rule_kernel.py; one-token attention as torch ops or the split-KV kernels
of decode_attention_kernel.py; linear layers on cuBLAS or, per shape where it measured faster,
gemv_kernel.py), against the floor (bytes a step must read over the copy bandwidth measured in the
same run, as gpu_pipeline.py). Before timing, the kernels are checked against the torch ops, and
every arm's logits from the same state are compared with the first arm's.

MoE shapes (the static step covers dense MLPs only): HF's own forward, one token at a time over a
DynamicCache prefilled with `--context` tokens, for each experts implementation transformers 5.23
offers (grouped_mm is its default), against the floor of the bytes a batch-1 step reads (the
routed experts only: top_k of num_experts).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common, shapes  # noqa: E402
from benchmarks.gpu_pipeline import bandwidth_gbps, decode_step_bytes  # noqa: E402
from corgi.engine.static_decode import StaticDecoder, supported  # noqa: E402


def sync():
    torch.cuda.synchronize()


def events_ms(fn, repeats: int) -> float:
    """GPU time of fn() per call, over `repeats` back-to-back calls (after one warm call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    sync()
    return start.elapsed_time(end) / repeats


# ---- the Triton delta rule against the torch ops ---------------------------------------------

@torch.inference_mode()
def check_kernel(n_k: int, n_v: int, d_k: int, d_v: int, rows: int = 2) -> dict:
    from corgi.engine.delta_rule_kernel import delta_rule_token
    from corgi.engine.linear_attention import delta_rule_step
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)          # noqa: E731
    q, k, v = rnd(rows, n_k, d_k), rnd(rows, n_k, d_k), rnd(rows, n_v, d_v)
    g = -torch.rand(rows, n_v, device="cuda", generator=gen)                 # log decay <= 0
    beta = torch.rand(rows, n_v, device="cuda", generator=gen)
    state = rnd(rows, n_v, d_k, d_v) * 0.1
    s_torch, s_triton = state.clone(), state.clone()
    out_torch = delta_rule_step(q, k, v, g, beta, s_torch)
    out_triton = delta_rule_token(q, k, v, g, beta, s_triton)
    # The multi-token kernel (jump-forward chunks), 5 tokens with the last 2 masked as padding.
    from corgi.engine.delta_rule_kernel import delta_rule_chunk
    from corgi.engine.linear_attention import delta_rule_chunk as torch_chunk
    width = 5
    cq, ck, cv = rnd(rows, width, n_k, d_k), rnd(rows, width, n_k, d_k), rnd(rows, width, n_v, d_v)
    valid = (torch.arange(width, device="cuda") < 3)[None, :, None]
    cg = torch.where(valid, -torch.rand(rows, width, n_v, device="cuda", generator=gen), 0.0)
    cb = torch.where(valid, torch.rand(rows, width, n_v, device="cuda", generator=gen), 0.0)
    c_torch, c_triton = state.clone(), state.clone()
    chunk_torch = torch_chunk(cq, ck, cv, cg, cb, c_torch)
    chunk_triton = delta_rule_chunk(cq, ck, cv, cg, cb, c_triton)
    c_three = state.clone()
    torch_chunk(cq[:, :3], ck[:, :3], cv[:, :3], cg[:, :3], cb[:, :3], c_three)
    return {"out_max_abs_diff": (out_torch - out_triton).abs().max().item(),
            "state_max_abs_diff": (s_torch - s_triton).abs().max().item(),
            "out_max_abs": out_torch.abs().max().item(),
            "chunk_out_max_abs_diff": (chunk_torch - chunk_triton).abs().max().item(),
            "chunk_state_max_abs_diff": (c_torch - c_triton).abs().max().item(),
            "chunk_padding_moves_state": (c_triton - c_three).abs().max().item()}


# ---- the static step ------------------------------------------------------------------------

def place(bucket, context: int) -> None:
    """The step as it runs after `context` cached tokens: those columns count in the mask (the
    split-KV kernels skip column blocks that are all masked, the torch ops do not)."""
    bucket.write.fill_(context)
    bucket.positions.fill_(context)
    bucket.mask.fill_(float("-inf"))
    bucket.mask[..., :context] = 0.0


# Arms of the static step: which kernels it runs (StaticDecoder's delta_rule / attention / gemv).
ARMS = {
    "delta-torch": {"delta_rule": "torch", "attention": "torch", "gemv": "cublas"},
    "baseline": {"delta_rule": "auto", "attention": "torch", "gemv": "cublas"},
    "split-kv": {"delta_rule": "auto", "attention": "triton", "gemv": "cublas"},
    "split-kv+gemv": {"delta_rule": "auto", "attention": "triton", "gemv": "auto"},
}


@torch.inference_mode()
def check_attention(n_heads: int, n_kv: int, head_dim: int, context: int, capacity: int) -> dict:
    """The split-KV kernels in bf16 against the torch ops in float32 on the same inputs."""
    from corgi.engine.attention import decode_attention
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)          # noqa: E731
    k_cache, v_cache = rnd(1, n_kv, capacity, head_dim), rnd(1, n_kv, capacity, head_dim)
    q, k, v = rnd(1, n_heads, head_dim), rnd(1, n_kv, head_dim), rnd(1, n_kv, head_dim)
    mask = torch.full((1, 1, 1, capacity), float("-inf"), device="cuda")
    mask[..., :context + 1] = 0.0
    write = torch.tensor([context], device="cuda")
    ref = decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), write, mask)
    bf = lambda t: t.to(torch.bfloat16)                                       # noqa: E731
    got = decode_attention(bf(q), bf(k), bf(v), bf(k_cache), bf(v_cache), write, mask, split_kv=True)
    return {"max_abs_diff": (got.float() - ref).abs().max().item(), "max_abs": ref.abs().max().item()}


@torch.inference_mode()
def static_arm(lm, arm: str, context: int, capacity: int, replays: int, profile: bool) -> tuple[dict, object]:
    t0 = time.perf_counter()
    kernels = dict(ARMS[arm])
    decoder = StaticDecoder(lm.model, lm.device, lm.dtype, use_graphs=True, compile_layers=True, **kernels)
    tuned_s = time.perf_counter() - t0
    bucket = decoder.bucket(1, capacity)
    sync()
    out = {"arm": arm, **kernels, "fused_delta_rule": decoder.fused_delta_rule, "split_kv": decoder.split_kv,
           "gemv_report": decoder.gemv_report, "gemv_tuning_s": tuned_s,
           "compile_and_capture_s": time.perf_counter() - t0}
    if decoder.hybrid:                      # a non-zero state (the time does not depend on it)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for rec in bucket.rec:
            if rec is not None:
                rec.normal_(0, 0.01, generator=gen)

    def replay():
        place(bucket, context)
        bucket.graph.replay()
    times = [events_ms(replay, replays) for _ in range(5)]
    out["graph_replay_ms"] = statistics.median(times)
    out["graph_replay_ms_runs"] = times
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        place(bucket, context)
        bucket._step()
        sync()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                place(bucket, context)
                bucket._step()
            sync()
        out["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                                   max_name_column_width=80)
    return out, bucket


@torch.inference_mode()
def compare_buckets(a, b, context: int) -> dict:
    """The same state in both buckets, one step each: how far apart are the logits? The cached
    K/V are random first, so attention over the context is not trivially equal."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    for cache in a.k + a.v:
        if cache is not None:
            cache.normal_(0, 1, generator=gen)
    for name in ("k", "v", "conv", "rec"):
        for x, y in zip(getattr(a, name, []), getattr(b, name, [])):
            if x is not None:
                y.copy_(x)
    logits = []
    for bucket in (a, b):
        place(bucket, context)
        bucket.tokens.fill_(1000)
        bucket.graph.replay()
        logits.append(bucket.logits[0].clone())
    diff = (logits[0] - logits[1]).abs()
    return {"logits_max_abs_diff": diff.max().item(), "logits_max_abs": logits[0].abs().max().item(),
            "same_argmax": bool(logits[0].argmax() == logits[1].argmax())}


# ---- MoE: HF's forward per token -------------------------------------------------------------

def moe_step_bytes(model, context: int) -> dict:
    tc = model.config.get_text_config()
    dense = decode_step_bytes(model, context)
    experts = sum(p.numel() * p.element_size() for n, p in model.model.language_model.named_parameters()
                  if ".experts." in n)
    routed = experts * tc.num_experts_per_tok / tc.num_experts
    total = dense["total"] - experts + routed
    return dict(dense, experts_all=experts, experts_routed=int(routed), total=int(total))


@torch.inference_mode()
def moe_arm(lm, implementation: str, context: int, tokens: int) -> dict:
    from transformers import DynamicCache
    model = lm.model
    model.set_experts_implementation(implementation)
    gen = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(0, 150000, (1, context), device="cuda", generator=gen)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(tokens + 3):
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sync()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"experts_implementation": implementation, "ms_per_token": statistics.median(times),
            "tokens": tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3.5-4b", choices=sorted(shapes.REAL_SHAPES))
    ap.add_argument("--context", type=int, default=1426, help="cached tokens (W1's phase 1+2 midpoint)")
    ap.add_argument("--capacity", type=int, default=2048, help="static bucket columns")
    ap.add_argument("--replays", type=int, default=100)
    ap.add_argument("--arms", default=None, help=f"static-step arms, of {sorted(ARMS)} (default: all that apply)")
    ap.add_argument("--moe-arms", default="grouped_mm,batched_mm,eager")
    ap.add_argument("--moe-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    result = {"shape": args.shape, "context": args.context, "env": common.environment("cuda")}
    t0 = time.perf_counter()
    lm = shapes.loaded_random_model(args.shape, "cuda", torch.bfloat16, layers_override=args.layers)
    result["build_s"] = time.perf_counter() - t0
    result["bandwidth_gbps"] = bw = bandwidth_gbps()
    print(f"{args.shape}: built in {result['build_s']:.1f} s; copy bandwidth {bw:.0f} GB/s", flush=True)

    if supported(lm.model):
        step_bytes = decode_step_bytes(lm.model, args.context)
        floor_ms = step_bytes["total"] / (bw * 1e9) * 1e3
        result.update(step_bytes=step_bytes, floor_ms=floor_ms)
        hybrid = getattr(lm.family, "hybrid", False)
        arms = args.arms.split(",") if args.arms else [a for a in ARMS if hybrid or a != "delta-torch"]
        tc = lm.model.config.get_text_config()
        if hybrid:
            result["kernel_check_float32"] = check_kernel(tc.linear_num_key_heads, tc.linear_num_value_heads,
                                                          tc.linear_key_head_dim, tc.linear_value_head_dim)
            print("delta-rule kernel vs torch ops (float32):", result["kernel_check_float32"], flush=True)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        result["attention_check_bf16"] = check_attention(tc.num_attention_heads, tc.num_key_value_heads, head_dim,
                                                         args.context, args.capacity)
        print("split-KV attention (bf16) vs torch ops (float32):", result["attention_check_bf16"], flush=True)
        result["arms"], buckets = [], []
        for arm in arms:
            out, bucket = static_arm(lm, arm, args.context, args.capacity, args.replays,
                                     args.profile and arm == arms[-1])      # profile: the last arm
            out["x_floor"] = out["graph_replay_ms"] / floor_ms
            result["arms"].append(out)
            buckets.append(bucket)
            print(f"  static step, {arm}: {out['graph_replay_ms']:.3f} ms "
                  f"({out['x_floor']:.2f}x floor {floor_ms:.3f} ms); gemv tuning {out['gemv_tuning_s']:.1f} s, "
                  f"compile+capture {out['compile_and_capture_s']:.1f} s", flush=True)
            if out["gemv_report"]:
                print("  gemv per shape (us):", json.dumps(out["gemv_report"]), flush=True)
            if "profile" in out:
                print(out["profile"], flush=True)
        result["arms_logits_bf16"] = {}
        for arm, bucket in zip(arms[1:], buckets[1:]):
            result["arms_logits_bf16"][arm] = compare_buckets(buckets[0], bucket, args.context)
            print(f"  same state, one step, {arms[0]} vs {arm} (bf16):", result["arms_logits_bf16"][arm], flush=True)
    else:
        step_bytes = moe_step_bytes(lm.model, args.context)
        floor_ms = step_bytes["total"] / (bw * 1e9) * 1e3
        result.update(step_bytes=step_bytes, floor_ms=floor_ms, arms=[])
        for impl in args.moe_arms.split(","):
            out = moe_arm(lm, impl, args.context, args.moe_tokens)
            out["x_floor"] = out["ms_per_token"] / floor_ms
            result["arms"].append(out)
            print(f"  HF forward per token, experts {impl}: {out['ms_per_token']:.2f} ms "
                  f"({out['x_floor']:.1f}x floor {floor_ms:.3f} ms)", flush=True)
    if args.out:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
