"""Issue 14 items 2 and 3: model steps per output token and turn time with jump-forward and
prompt lookup on and off, side by side in one run; the cost of a k-token forward.

    # CPU, a twin (real tokenizer, random weights), one thread:
    python -m benchmarks.fewer_steps --model tiny-qwen2.5-vl --out benchmarks/results/fewer_steps_cpu.json
    # GPU, random weights of a real checkpoint's shape, static + compiled + CUDA graphs:
    python benchmarks/fewer_steps.py --shape qwen2.5-vl-3b --device cuda --out fewer_steps_3b.json

Three arms, interleaved per repeat, each on its own Engine over one model:
  off      pipeline.jump_forward false, pipeline.prompt_lookup false
  jf       jump-forward only
  jf+pl    jump-forward and prompt lookup (the default)
Scripted turns (W1 then W2 on the same session; workloads of benchmarks/gpu_pipeline.py): phase
1+2 and 4 write fixed texts (think filler, then steps with boxes; an answer with explanation and
key evidence with boxes) under the REAL grammar (benchmarks.common.GrammarScript), so every arm
writes the same text and jump-forward acts as the grammar allows; phase 3 rows never stop early.
Prompt lookup's drafts are kept when they match the script: its acceptance here is set by the
script's text (its filler repeats a sentence), an illustration of the mechanism, not a
prediction for a real model. Free turns (CPU only): the twin's own greedy output (noise), the
default config, jump-forward on and off: the outputs differ, so compare per token.

Verify cost: one static bucket at the W1 context, a one-token step against a k-token forward
(k = 1..8), and a verify of k tokens all but the first rejected (the forward made to be cut back,
then keep([1]): on a hybrid stack the linear states' snapshot and replay), median of
`--verify-reps` calls each.

MTP cost (families with an MTP head, engine/mtp.py): one draft of the head (its layer over 1 or
2 new pairs at a 512-entry cache, lm_head, the argmax read back), median of `--verify-reps`.
Random weights accept no drafts, so decode ms/token as a function of the acceptance a is
computed from the measured costs: per forward a * (2-token forward + 2-pair draft) + (1 - a) *
(rejected 2-token verify + 1-pair draft), over 1 + a tokens; against the one-token step. A
model of the loop, not a measured turn.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.gpu_pipeline import (FOLLOW_UP, QUESTION, W1, W2, Geometry, TimedEngine,  # noqa: E402
                                     grammar_turn, test_image)
from corgi.config import load_config  # noqa: E402
from corgi.engine.engine import Engine  # noqa: E402
from corgi.pipeline import ChatSession  # noqa: E402

ARMS = {"off": (False, False), "jf": (True, False), "jf+pl": (True, True)}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def free_turn(engine, image, question) -> dict:
    session = ChatSession(engine, image)
    t0 = time.perf_counter()
    result = list(session.ask(question))[-1].result
    total = time.perf_counter() - t0
    c = result.cache
    session.close()
    return {"total": total, "model_steps": c.decode_model_steps, "output_tokens": c.decode_output_tokens,
            "forced": c.forced_tokens, "drafted": c.drafted_tokens, "accepted": c.accepted_drafts,
            "steps": len(result.steps)}


@torch.inference_mode()
def verify_cost(engine, context: int, reps: int, device) -> dict:
    """ms of a one-token step and of k-token forwards (k = 1..8) on a static (1, C) bucket whose
    first `context` columns are valid (K/V values do not change the cost)."""
    bucket = engine.static.bucket(1, context + 64)
    def reset():
        bucket.mask.fill_(float("-inf"))
        bucket.mask[..., :context] = 0.0
        bucket.write.fill_(context)
        bucket.positions.fill_(context)
    def timed(fn):
        samples = []
        for _ in range(reps + 3):
            reset()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples[3:])
    token = torch.tensor([42], device=engine.lm.device)
    out = {"context": context, "bucket": [bucket.batch, bucket.capacity], "graphs": bucket.graph is not None,
           "step_ms": timed(lambda: bucket.step(token))}
    for k in range(1, 9):
        ids = torch.full((1, k), 42, device=engine.lm.device)
        out[f"extend_{k}_ms"] = timed(lambda: bucket.extend(ids))
        out[f"extend_{k}_padded_to"] = bucket.last_width
        if k > 1:
            # A verify whose k-1 drafts are all rejected: set aside (hybrid: the linear states'
            # snapshot), the forward, then cut back to the one token (hybrid: the states' replay).
            out[f"verify_{k}_rejected_ms"] = timed(lambda: (bucket.extend(ids, rewind=True), bucket.keep([1])))
    reset()
    return out


@torch.inference_mode()
def mtp_cost(engine, head, reps: int, device, cached: int = 512) -> dict:
    """ms of one MTP draft over 1 and over 2 new (hidden, token) pairs, the head's cache holding
    `cached` entries (a phase's worth)."""
    from corgi.engine.mtp import MtpDraft
    lm = engine.lm
    hidden = lm.text_config.hidden_size
    draft = MtpDraft(head, lm.model, start=0, rope_delta=0)
    draft.skip = 0
    draft.observe(torch.randn(cached, hidden, device=lm.device, dtype=lm.dtype))
    for _ in range(cached):
        draft.push(42)
    draft.draft(1)

    def timed(pairs: int) -> float:
        samples = []
        for _ in range(reps + 3):
            draft.observe(torch.randn(pairs, hidden, device=lm.device, dtype=lm.dtype))
            for _ in range(pairs):
                draft.push(42)
            sync(device)
            t0 = time.perf_counter()
            draft.draft(1)                   # reads the token back: the host waits for it
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples[3:])
    return {"cached": cached, "draft_1_ms": timed(1), "draft_2_ms": timed(2)}


def mtp_model(v: dict, m: dict) -> list[dict]:
    """Decode ms/token with MTP drafts (one per forward) at acceptance a, from measured costs."""
    rows = []
    for a in (0.0, 0.5, 0.7, 0.8, 0.9, 1.0):
        forward = a * (v["extend_2_ms"] + m["draft_2_ms"]) + (1 - a) * (v["verify_2_rejected_ms"] + m["draft_1_ms"])
        per_token = forward / (1 + a)
        rows.append({"acceptance": a, "ms/token": per_token, "x one-token step": per_token / v["step_ms"]})
    return rows


def summary(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a twin (CPU), e.g. tiny-qwen2.5-vl")
    p.add_argument("--shape", default=None, help="benchmarks.shapes name (random weights), e.g. qwen2.5-vl-3b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--free-repeats", type=int, default=2, help="free turns per arm (CPU twin only)")
    p.add_argument("--verify-reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--image-scale", type=float, default=1.0)
    p.add_argument("--regions", type=int, default=None)
    p.add_argument("--static", action="store_true", help="CPU: decode over static buckets (a functional check)")
    p.add_argument("--out", default="benchmarks/out/fewer_steps.json")
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.shape):
        p.error("give --model (a twin) or --shape (random weights of a real shape)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = args.device
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    geo = Geometry(args.image_scale)
    work = {"W1": dict(W1), "W2": dict(W2)}
    if args.regions is not None:
        work["W1"]["regions"], work["W2"]["regions"] = args.regions, min(W2["regions"], args.regions)
    t = time.perf_counter()
    if args.shape:
        from benchmarks.shapes import loaded_random_model
        lm = loaded_random_model(args.shape, device, dtype, max_pixels=geo.max_pixels)
    else:
        from corgi.engine.loading import load_model
        cfg = load_config(None, {"model.id": args.model, "model.device": device, "image.max_pixels": geo.max_pixels})
        lm = load_model(cfg.model, cfg.image)
    result = {"model": args.shape or args.model, "environment": common.environment(device),
              "build_seconds": time.perf_counter() - t, "workloads": work}
    base = {"model.device": device, "model.dtype": str(dtype).removeprefix("torch."),
            "image.max_pixels": geo.max_pixels, "cache.kv_cache_mb": 16384.0, "cache.vision_cache_mb": 4096.0,
            "pipeline.structured_output": True, "pipeline.temperature": 0.0, "pipeline.max_steps": 6,
            "pipeline.max_thinking_chars": 4000, "pipeline.crop_padding": 0.0,
            "pipeline.crop_max_pixels": geo.crop ** 2, "model.compile": cuda or args.static, "model.warmup": False}
    engines = {name: TimedEngine(lm, load_config(None, dict(
        base, **{"pipeline.jump_forward": jf, "pipeline.prompt_lookup": pl}))) for name, (jf, pl) in ARMS.items()}
    image = test_image(geo.image_size)
    t = time.perf_counter()
    if cuda:
        for engine in engines.values():
            engine.static.warm_up([(1, 2048), (1, 3072), (1, 4096), (2, 512), (8, 512)])
    result["warmup_seconds"] = time.perf_counter() - t
    print(f"built in {result['build_seconds']:.1f}s, warm-up {result['warmup_seconds']:.1f}s", flush=True)

    if engines["off"].static is not None:
        # The W1 phase-4 context, about: image + prompt + 512 reasoning tokens.
        result["verify_cost"] = verify_cost(engines["off"], 2100, args.verify_reps, device)
        v = result["verify_cost"]
        print("verify cost (ms): step %.3f; " % v["step_ms"]
              + ", ".join(f"k={k} {v[f'extend_{k}_ms']:.3f}" for k in range(1, 9)), flush=True)
        if lm.family.mtp_layer:
            from corgi.engine.mtp import load_mtp_head, random_mtp_head
            head = load_mtp_head(lm) if args.model else None
            if head is None:       # a random shape: a random head of its shape
                head = random_mtp_head(lm.text_config, lm.family.mtp_layer, 1).to(device=lm.device, dtype=lm.dtype)
            result["mtp_cost"] = mtp_cost(engines["off"], head, args.verify_reps, device)
            result["mtp_model"] = mtp_model(v, result["mtp_cost"])

    runs = {name: [] for name in engines}
    for r in range(args.repeats + 1):            # run 0 warms (compiles the multi-token widths)
        for name, engine in engines.items():
            img = image.copy()
            img.putpixel((r, 0), (r, r, r))      # new content: vision cache miss, fresh prefill
            engine.vision.clear()
            session = ChatSession(engine, img)
            run = {"W1": grammar_turn(engine, session, QUESTION, work["W1"], geo)}
            engine.vision.clear()
            run["W2"] = grammar_turn(engine, session, FOLLOW_UP, work["W2"], geo)
            session.close()
            if r:
                runs[name].append(run)
            print(f"run {r} {name}: " + ", ".join(
                f"{w} {t['total']:.2f}s steps/token {t['model_steps'] / t['output_tokens']:.3f} "
                f"(forced {t['forced']}, drafts {t['accepted']}/{t['drafted']})" for w, t in run.items()), flush=True)
    result["scripted_runs"] = runs
    result["scripted"] = {name: {w: summary([run[w] for run in rs]) for w in ("W1", "W2")} for name, rs in runs.items()}

    if not args.shape and args.free_repeats:
        free = {name: [] for name in engines}
        for r in range(args.free_repeats):
            for name, (jf, pl) in ARMS.items():
                engine = Engine(lm, load_config(None, {"model.id": args.model, "pipeline.jump_forward": jf,
                                                       "pipeline.prompt_lookup": pl}))
                free[name].append(free_turn(engine, image, QUESTION))
        result["free_runs"] = free
        result["free"] = {name: summary(rs) for name, rs in free.items()}

    common.write_json(args.out, result)
    print_report(result)
    print(f"wrote {args.out}")
    return 0


def print_report(result: dict) -> None:
    rows = []
    for name, per in result["scripted"].items():
        for w, t in per.items():
            rows.append({"arm": name, "workload": w, "turn s": t["total"], "phase 1+2 s": t["reasoning"],
                         "phase 3 s": t["evidence"], "phase 4 s": t["synthesis"],
                         "model steps": t["model_steps"], "output tokens": t["output_tokens"],
                         "steps/token": t["model_steps"] / t["output_tokens"], "forced": t["forced"],
                         "drafts kept/proposed": f"{t['accepted']:.0f}/{t['drafted']:.0f}"})
    print(common.table(rows, list(rows[0])))
    if "free" in result:
        rows = [{"arm": name, "turn s": t["total"], "model steps": t["model_steps"],
                 "output tokens": t["output_tokens"], "steps/token": t["model_steps"] / t["output_tokens"],
                 "ms/token": 1e3 * t["total"] / t["output_tokens"], "forced": t["forced"],
                 "drafts kept/proposed": f"{t['accepted']:.0f}/{t['drafted']:.0f}"}
                for name, t in result["free"].items()]
        print(common.table(rows, list(rows[0])))
    if "verify_cost" in result:
        v = result["verify_cost"]
        rows = [{"k": k, "ms": v[f"extend_{k}_ms"], "x one-token step": v[f"extend_{k}_ms"] / v["step_ms"],
                 "padded to": v[f"extend_{k}_padded_to"],
                 "all rejected ms": v.get(f"verify_{k}_rejected_ms", float("nan"))} for k in range(1, 9)]
        print(f"one-token step {v['step_ms']:.3f} ms at context {v['context']}")
        print(common.table(rows, list(rows[0])))
    if "mtp_cost" in result:
        m = result["mtp_cost"]
        print(f"MTP draft: {m['draft_1_ms']:.3f} ms (1 pair), {m['draft_2_ms']:.3f} ms (2 pairs), "
              f"cache {m['cached']}; decode with MTP drafts, modelled from the measured costs:")
        print(common.table(result["mtp_model"], list(result["mtp_model"][0])))


if __name__ == "__main__":
    raise SystemExit(main())
