"""What structured output costs outside the model, at Qwen's real vocabularies: the speed
measurements that tests/test_grammar.py and tests/test_parsing.py no longer time.

Grammar, per real tokenizer (corgi.engine.twin_tokenizer: "qwen2.5-vl" 151,665 tokens,
"qwen3.5" 248,077, over a lm_head padded to a multiple of 128): the first GrammarCache (xgrammar
TokenizerInfo + length tables) against a second one over the same tokenizer (shared tables),
the compile of each schema, and mask() + accept() per token under uniform random logits until
the structure closes (median of the per-token times).

Parsing: each hostile input of tests/test_parsing.py (and the expensive ones), parse_reasoning +
parse_synthesis, against json.loads of a valid JSON text of the same length (the ratio is the
number to read), with the parser's `Work` counters.

    .venv/bin/python -m benchmarks.structured_cost
    .venv/bin/python -m benchmarks.structured_cost --kinds qwen2.5-vl --skip-parsing
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from corgi.boxes import REL1000, pixel_convention
from corgi.engine import grammar as G

from . import common


def _grammar_rows(kind: str, seeds: int) -> list[dict]:
    from corgi.engine.twin_tokenizer import build_tokenizer
    tok = build_tokenizer(kind)
    vocab_size = (len(tok) + 127) // 128 * 128
    first_s, cache = common.timed(lambda: G.GrammarCache(tok, vocab_size=vocab_size))
    second_s, _ = common.timed(lambda: G.GrammarCache(tok, vocab_size=vocab_size))
    rows = [{"kind": kind, "what": "GrammarCache, first / second (shared tables)",
             "seconds": first_s, "ratio": first_s / max(second_s, 1e-9)}]
    pixels = pixel_convention(644, 476)
    specs = {"reasoning (6 steps, 600 thinking chars)": G.reasoning_spec(6, pixels, 600),
             "synthesis": G.synthesis_spec(pixels)}
    for name, spec in specs.items():
        compile_s, _ = common.timed(lambda: cache.get(spec.source))
        per_token: list[float] = []
        for seed in range(seeds):
            decoder = cache.decoder(spec)
            gen = torch.Generator().manual_seed(seed)
            while not decoder.is_finished():
                logits = torch.rand(1, cache.vocab_size, generator=gen)
                t0 = time.perf_counter()
                decoder.mask(logits)
                ok = decoder.accept(int(torch.argmax(logits)))
                per_token.append(time.perf_counter() - t0)
                assert ok, "the decoder refused a token its own mask allowed"
        rows.append({"kind": kind, "what": f"compile {name}", "seconds": compile_s})
        rows.append({"kind": kind, "what": f"mask+accept per token, {name}", "seconds": common.median(per_token),
                     "tokens": len(per_token)})
    return rows


def _parsing_rows(repeats: int) -> list[dict]:
    import sys
    sys.path.insert(0, str(common.ROOT / "tests"))
    from corgi.parsing import Work, parse_reasoning, parse_synthesis
    from test_parsing import EXPENSIVE, HOSTILE
    rows = []
    for i, text in enumerate(HOSTILE + EXPENSIVE):
        works: list[Work] = []

        def parse():
            w1, w2 = Work(len(text)), Work(len(text))
            parse_reasoning(text, REL1000, 8, work=w1)
            parse_synthesis(text, REL1000, work=w2)
            works[:] = [w1, w2]

        valid = json.dumps({"steps": [{"statement": "x" * 50}] * max(1, len(text) // 70)})
        parse_s, _ = common.median_of(parse, repeats)
        base_s, _ = common.median_of(lambda: json.loads(valid), repeats)
        rows.append({"input": f"hostile{i}", "chars": len(text), "parse_s": parse_s,
                     "ratio_to_json_loads": parse_s / max(base_s, 1e-9),
                     "candidates": works[0].candidates, "work_chars": works[0].chars})
    return rows


def run(args) -> dict:
    data = {"environment": common.environment(), "grammar": [], "parsing": []}
    for kind in args.kinds:
        data["grammar"] += _grammar_rows(kind, args.seeds)
    if not args.skip_parsing:
        data["parsing"] = _parsing_rows(args.repeats)
    return data


def print_report(data: dict) -> None:
    if data["grammar"]:
        print("\nstructured_cost: grammar at real vocabularies")
        print(common.table(data["grammar"], ["kind", "what", "seconds", "ratio", "tokens"]))
    if data["parsing"]:
        print("\nstructured_cost: hostile inputs, parse_reasoning + parse_synthesis")
        print(common.table(data["parsing"], ["input", "chars", "parse_s", "ratio_to_json_loads",
                                             "candidates", "work_chars"]))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="*", default=["qwen2.5-vl", "qwen3.5"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-parsing", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(common.OUT_DIR / "structured_cost.json"))
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return common.run_script(parse_args, run, print_report, argv)


if __name__ == "__main__":
    main()
