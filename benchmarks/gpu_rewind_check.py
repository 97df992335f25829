"""Does a cut-back draft verify on the hybrid static bucket leave the state of the kept tokens? (CUDA)

    python3 benchmarks/gpu_rewind_check.py --shape qwen3.5-4b [--out FILE]

The CPU tests (tests/test_static_hybrid.py, tests/test_fewer_steps.py) check the replay of the
linear states eagerly on a tiny twin. This runs the same path where users get it: random weights
of a real Qwen3.5 shape, bf16, compiled layers, CUDA graphs for the step, the extend widths and the
replay, the Triton delta rule where it is chosen. From one prefilled cache, three arms per case:

  rewind  extend(T tokens, rewind=True), keep(kept): the states replayed from the tape
  exact   extend(the same T tokens, lengths=kept), keep(kept): the states only ever took the kept
          tokens (same widths and kernels: this arm must agree to the last bit or nearly)
  steps   the kept tokens one step at a time (other kernels: agrees to bf16 rounding)

then two more one-token steps on each; the report gives the largest differences of the logits
and of the linear states.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common, shapes  # noqa: E402
from corgi.engine import decode, state  # noqa: E402
from corgi.engine.static_decode import StaticDecoder  # noqa: E402


@torch.inference_mode()
def prefill(lm, rows: int, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 100000, (rows, length), generator=gen).to(lm.device)        # [B, L]
    cache = state.new_cache(lm.text_config, hybrid=True)
    decode.forward(lm.model, ids, decode.text_positions(0, length, 0, rows, lm.device), cache)
    return cache


@torch.inference_mode()
def arm(bucket, cache, length: int, rows: int, ids: torch.Tensor, kept: list[int], how: str):
    """Logits of the two steps after the kept tokens [2, rows, V], and the linear states."""
    bucket.load(cache, length, torch.full((rows,), length, device=ids.device), None)
    if how == "steps":
        # Row b feeds its kept tokens, then pads... one-token steps feed every row together, so
        # this arm is only defined when every row keeps the same count.
        assert len(set(kept)) == 1
        for t in range(kept[0]):
            bucket.step(ids[:, t])
    else:
        bucket.extend(ids, lengths=kept if how == "exact" else [ids.shape[1]] * rows, rewind=how == "rewind")
        bucket.keep(kept)
    after = torch.stack([bucket.step(torch.full((rows,), 777 + i, device=ids.device)) for i in range(2)])
    common.sync(ids.device)
    return after, [t.clone() for t in bucket.linear_states()]


def compare(a, b) -> dict:
    (la, sa), (lb, sb) = a, b
    return {"logits_max_abs": float((la - lb).abs().max()),
            "logits_scale": float(la.abs().max()),
            "argmax_equal": bool((la.argmax(-1) == lb.argmax(-1)).all()),
            "state_max_abs": max(float((x.float() - y.float()).abs().max()) for x, y in zip(sa, sb))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3.5-4b")
    p.add_argument("--context", type=int, default=300)
    p.add_argument("--device", default="cuda", help="cpu: a functional dry run (no graphs, eager layers)")
    p.add_argument("--layers", type=int, default=None, help="fewer text layers (a quick dry run)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lm = shapes.loaded_random_model(args.shape, args.device, torch.bfloat16, layers_override=args.layers)
    cuda = args.device == "cuda"
    decoder = StaticDecoder(lm.model, lm.device, lm.dtype, use_graphs=cuda, compile_layers=cuda)
    result = {"shape": args.shape, "layers": args.layers, "environment": common.environment(args.device),
              "fused_delta_rule": decoder.fused_delta_rule, "cases": []}
    gen = torch.Generator().manual_seed(1)
    for rows, width, kept in ((1, 5, [2]), (1, 5, [1]), (2, 5, [3, 1]), (2, 3, [2, 2])):
        cache = prefill(lm, rows, args.context, seed=rows)
        bucket = decoder.bucket(rows, args.context + 64)
        ids = torch.randint(1000, 100000, (rows, width), generator=gen).to(lm.device)
        runs = {how: arm(bucket, cache, args.context, rows, ids, kept, how)
                for how in ("rewind", "exact") + (("steps",) if len(set(kept)) == 1 else ())}
        case = {"rows": rows, "width": width, "kept": kept, "padded_to": bucket.last_width,
                "replay_graphs": sorted(bucket.replays),
                "rewind_vs_exact": compare(runs["rewind"], runs["exact"])}
        if "steps" in runs:
            case["rewind_vs_steps"] = compare(runs["rewind"], runs["steps"])
        result["cases"].append(case)
        print(case, flush=True)
    result["snapshot_bytes"] = sum(t.numel() * t.element_size() for ts in decoder.snapshots.values() for t in ts)
    print(f"snapshot bytes (all batch sizes): {result['snapshot_bytes']}; fused delta rule: {decoder.fused_delta_rule}")
    if args.out:
        common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
