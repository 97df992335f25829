"""Issue 3: what the grammar constraint costs per decoded token, measured side by side.

One conversation (image + reasoning prompt, prefilled once). From that same prefix, N tokens
are decoded through Engine.generate twice per repeat: free (only the stop tokens masked, so it
cannot end early) and constrained by the real phase-1+2 grammar (engine.constraint("reasoning")).
If the grammar's structure completes before N tokens, a fresh decoder takes over, so both arms
always run exactly N decode steps. Then the constrained arm's tokens are replayed through fresh
decoders with no model, timing the mask fill (xgrammar + length masks), the apply (-inf into the
logits, incl. the host-to-device copy on CUDA) and accept separately; the first mask of each
decoder is reported apart from the steady ones. The one-off setup of the first constraint is
split into the tokenizer tables (xgrammar TokenizerInfo + length tables, once per tokenizer)
and the grammar compile (once per schema).

    .venv/bin/python -m benchmarks.grammar_cost                                   # CPU, small model
    .venv/bin/python -m benchmarks.grammar_cost --model tiny-qwen2.5-vl
    .venv/bin/python -m benchmarks.grammar_cost --shape cpu-qwen3.5               # small widths, 248k tokenizer
    .venv/bin/python -m benchmarks.grammar_cost --device cuda --shape qwen2.5-vl-3b  # GPU, random weights

Every model here carries its family's real tokenizer (the tiny checkpoints and benchmarks.shapes
both build it with corgi.engine.twin_tokenizer): 151,665 tokens for Qwen2/2.5/3-VL, 248,077
for Qwen3.5. `--tokenizer FOLDER` (with --shape) takes another one.
"""
from __future__ import annotations

import argparse

import torch

from corgi import boxes, prompts
from corgi.config import load_config
from corgi.engine.engine import Engine
from corgi.engine.loading import load_model
from corgi.images import load_image

from . import common

QUESTION = "What does the sign above the shop say?"


class Rearming:
    """The real grammar decoder, replaced by a fresh one whenever its structure completes, so
    decoding never stops. Keeps the accepted tokens per decoder for the replay."""

    def __init__(self, make):
        self.make = make
        self.inner = make()
        self.segments: list[list[int]] = [[]]

    def mask(self, logits: torch.Tensor) -> None:
        if self.inner.is_finished():
            self.inner = self.make()
            self.segments.append([])
        self.inner.mask(logits)

    def accept(self, token: int) -> bool:
        ok = self.inner.accept(token)
        assert ok, "the grammar refused a token it allowed"
        self.segments[-1].append(token)
        return ok

    def is_finished(self) -> bool:
        return False


def setup(args):
    if args.shape:
        from .shapes import loaded_random_model
        config = load_config(None, {"model.device": args.device})
        dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
        lm = loaded_random_model(args.shape, args.device, dtype, tokenizer_folder=args.tokenizer,
                                 min_pixels=config.image.min_pixels, max_pixels=config.image.max_pixels)
    else:
        config = load_config(None, {"model.id": args.model, "model.device": args.device})
        lm = load_model(config.model, config.image)
    return lm, config


def replay(make, segments: list[list[int]], vocab: int, device) -> dict:
    """Per-token seconds of fill, mask (= fill + apply) and accept, no model involved."""
    logits = torch.zeros((1, vocab), device=device)
    fill, mask, accept, first, steady = [], [], [], [], []
    for segment in segments:
        decoder = make()
        for i, token in enumerate(segment):
            fill.append(common.timed(lambda: decoder.fill_bitmask(decoder.bitmask, 0), device)[0])
            logits.zero_()
            mask.append(common.timed(lambda: decoder.mask(logits), device)[0])
            (first if i == 0 else steady).append(mask[-1])
            assert logits[0, token] == 0, "replayed token is masked"
            accept.append(common.timed(lambda: decoder.accept(token), device)[0])
    n = len(fill)
    return {"tokens": n, "fill_ms": 1e3 * sum(fill) / n, "apply_ms": 1e3 * (sum(mask) - sum(fill)) / n,
            "mask_ms": 1e3 * sum(mask) / n, "accept_ms": 1e3 * sum(accept) / n,
            "median_mask_ms": 1e3 * common.median(mask), "max_mask_ms": 1e3 * max(mask),
            "first_mask_ms": 1e3 * sum(first) / len(first),
            "steady_mask_ms": 1e3 * sum(steady) / len(steady) if steady else None}


def run(args) -> dict:
    lm, config = setup(args)
    settings = config.pipeline
    engine = Engine(lm, config)
    conv = engine.start_conversation(load_image(args.image, 10**8), prompts.conversation_head())
    convention = boxes.convention_for(lm.family.box_style, conv.resized)
    engine.append(conv, prompts.reasoning_prompt(QUESTION, settings.max_steps, convention))
    engine.prefill(conv)
    base, last = len(conv.token_ids), conv.token_ids[-1]
    make = lambda: engine.constraint("reasoning", settings, convention)
    from corgi.engine.grammar import vocabulary
    # The first constraint's setup: the tokenizer's tables (shared by every grammar over this
    # tokenizer object; the engine's GrammarCache finds them), then the grammar compile.
    t_tables, _ = common.timed(lambda: vocabulary(lm.tokenizer, lm.vocab_size), args.device)
    t_compile, first = common.timed(make, args.device)
    # the very first mask in this process (xgrammar's first fill on a fresh matcher)
    t_first_mask, _ = common.timed(lambda: first.mask(torch.zeros((1, lm.vocab_size), device=lm.device)),
                                   args.device)
    t_fresh, _ = common.timed(make, args.device)       # compiled grammar cached: a new decoder only

    def decode(constraint, n):
        # Back to the same prefix; the prompt's last token is recomputed (one decode-sized step),
        # because generate() needs at least one uncached token.
        conv.truncate(base - 1)
        conv.token_ids.append(last)
        return common.timed(lambda: list(engine.generate(conv, n, constraint=constraint)), args.device)[0]

    arms = {"free": lambda: common.NoStop(lm.special.stop_ids), "constrained": lambda: Rearming(make)}
    for arm in arms.values():          # untimed warm-up of both paths
        decode(arm(), 4)
    samples = {name: [] for name in arms}
    last_constrained = None
    for _ in range(args.repeats):
        for name, arm in arms.items():
            constraint = arm()
            samples[name].append(decode(constraint, args.tokens))
            if name == "constrained":
                last_constrained = constraint
    per_token = {name: 1e3 * common.median(s) / args.tokens for name, s in samples.items()}
    costs = replay(make, last_constrained.segments, lm.vocab_size, lm.device)
    rows = [{"arm": name, "ms_per_token": per_token[name], "tokens": args.tokens,
             "samples_s": samples[name]} for name in arms]
    return {"benchmark": "grammar_cost", "environment": common.environment(args.device),
            "settings": {"model": args.shape or args.model, "tokens": args.tokens, "repeats": args.repeats,
                         "family": lm.family.name, "tokenizer_kind": lm.family.tokenizer,
                         "tokenizer_class": type(lm.tokenizer).__name__,
                         "vocab_size": lm.vocab_size, "tokenizer_tokens": len(lm.tokenizer),
                         "prompt_tokens": base, "max_steps": settings.max_steps,
                         "max_thinking_chars": settings.max_thinking_chars},
            "rows": rows, "grammar_compile_s": t_compile, "tokenizer_tables_s": t_tables,
            "first_constraint_setup_s": t_tables + t_compile, "fresh_decoder_s": t_fresh,
            "first_mask_in_process_ms": 1e3 * t_first_mask,
            "grammar_restarts": len(last_constrained.segments) - 1,
            "mask_costs": costs,
            "overhead_ms_per_token": per_token["constrained"] - per_token["free"],
            "ratio_constrained_over_free": per_token["constrained"] / per_token["free"],
            "constrained_text_sample": engine.decode_text(last_constrained.segments[0][:80])}


def print_report(data: dict) -> None:
    s, c = data["settings"], data["mask_costs"]
    print(f"\ngrammar_cost: {s['model']}, {s['tokens']} decode steps from a {s['prompt_tokens']}-token prefix, "
          f"vocab {s['vocab_size']} (tokenizer {s['tokenizer_tokens']}), median of {s['repeats']}")
    print(common.table(data["rows"], ["arm", "ms_per_token", "tokens"]))
    print(f"constrained / free: {data['ratio_constrained_over_free']:.3f}x "
          f"(+{data['overhead_ms_per_token']:.3f} ms per token); grammar restarts: {data['grammar_restarts']}; "
          f"first constraint {data['first_constraint_setup_s']:.3f} s (tokenizer tables "
          f"{data['tokenizer_tables_s']:.3f} s + compile {data['grammar_compile_s']:.3f} s), "
          f"then {1e3 * data['fresh_decoder_s']:.2f} ms per new decoder; first mask in the process "
          f"{data['first_mask_in_process_ms']:.2f} ms")
    print(common.table([dict(c, part="per token, mean over the replay")],
                       ["part", "tokens", "fill_ms", "apply_ms", "mask_ms", "accept_ms", "median_mask_ms",
                        "max_mask_ms", "first_mask_ms", "steady_mask_ms"]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-qwen2.5-vl", help="tiny-builder name or checkpoint folder")
    ap.add_argument("--shape", default=None, help="random weights of a real shape instead (benchmarks.shapes)")
    ap.add_argument("--tokenizer", default=None, help="with --shape: a real tokenizer folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads (1: steadier on a shared machine, see common.threads)")
    ap.add_argument("--image", default=str(common.ROOT / "assets" / "street-scene.png"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(common.OUT_DIR / "grammar_cost.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens, 1 repeat (for the tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.shape, args.tokens, args.repeats = "tiny-qwen2.5-vl", None, 16, 1
    return args


def main(argv=None) -> dict:
    return common.run_script(parse_args, run, print_report, argv)


if __name__ == "__main__":
    main()
