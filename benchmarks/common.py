"""Shared pieces of the benchmarks: timing, tables, JSON, and an engine whose outputs have
exactly the lengths we ask for.

Why forced lengths: a random-weight model writes noise, and noise stops wherever it likes.
Both arms of a comparison must do the same work, so every phase produces a fixed number of
tokens, like `min_new_tokens == max_new_tokens` in HF generate().
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from corgi import prompts
from corgi.boxes import BoxConvention
from corgi.engine.decode import MinLength
from corgi.engine.engine import Engine
from corgi.engine.loading import LoadedModel, SpecialTokens

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "out"
os.environ.setdefault("CORGI_CACHE", str(ROOT / ".cache" / "corgi"))   # the tests' tiny-model cache


# ---- timing -------------------------------------------------------------------------------

def ui_args(doc: str, out_name: str, count: str, default: int) -> argparse.Namespace:
    """The UI benchmarks' arguments: --model (a twin by default), how many repeats or turns
    (`--<count>`), and --out (benchmarks/results/<out_name>.json)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    parser.add_argument(f"--{count}", type=int, default=default)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"{out_name}.json"))
    return parser.parse_args()


def sync(device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device="cpu"):
    """(seconds, result) of one call, GPU work included."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def timed_cpu(fn: Callable, device="cpu"):
    """(wall seconds, process CPU seconds, result). CPU seconds (all threads) are a second
    reading that other processes on a shared machine disturb less than wall time."""
    c0 = time.process_time()
    seconds, result = timed(fn, device)
    return seconds, time.process_time() - c0, result


def median(values) -> float:
    return float(statistics.median(values))


def median_of(fn: Callable, repeats: int, device="cpu", warmup: int = 0) -> tuple[float, list[float]]:
    """Median seconds of `repeats` calls (after `warmup` untimed ones) and all the samples."""
    for _ in range(warmup):
        fn()
    samples = [timed(fn, device)[0] for _ in range(repeats)]
    return median(samples), samples


@contextlib.contextmanager
def threads(n: int | None):
    """Torch intra-op threads for the block (None: leave as is). Why 1 on a shared CPU: with 2
    threads every matmul waits for the slower thread, and when another process takes a core
    that thread stalls; measured on this 2-core machine, the same decode loop took 25-85 ms per
    token at 2 threads and 19-26 ms at 1 thread within the same minute."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- output -------------------------------------------------------------------------------

def environment(device="cpu") -> dict:
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
           "load_average_1m": os.getloadavg()[0]}     # other work on the machine, when this ran
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table (pastes straight into RESULTS.md); floats with 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


# ---- forced output lengths ----------------------------------------------------------------

class Forced:
    """A constraint (the duck type Engine.generate takes: mask/accept/is_finished) that makes
    the model write exactly `token_ids`: every other logit is -inf. Costs one fill per token,
    negligible next to a forward pass."""

    def __init__(self, token_ids: list[int]):
        self.ids, self.pos = list(token_ids), 0

    @torch.inference_mode()     # the engine's logits are inference tensors
    def mask(self, logits: torch.Tensor) -> None:       # logits [1, V]
        logits.fill_(float("-inf"))
        logits[..., self.ids[self.pos]] = 0.0

    def accept(self, token: int) -> bool:
        assert token == self.ids[self.pos], "forced token not taken"
        self.pos += 1
        return True

    def is_finished(self) -> bool:
        return self.pos >= len(self.ids)


class NoStop(MinLength):
    """Free decoding that cannot end early: only the stop tokens are masked out, on every token."""

    def __init__(self, stop_ids):
        super().__init__(float("inf"), stop_ids)


@dataclasses.dataclass(frozen=True)
class _NeverStop(SpecialTokens):
    """Special tokens with no reachable stop id (-1), so phase-3 rows run to max_new_tokens."""

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (-1,)


class ForcedEngine(Engine):
    """The real Engine, with phase 1+2 and phase 4 writing scripted token sequences (set
    `scripts` before a turn) and phase 3 rows never stopping early. Use it with
    `pipeline.structured_output: true` (that is what makes ChatSession ask for a constraint);
    the grammar itself is never built. Counts every token it yields in `generated`."""

    def __init__(self, loaded: LoadedModel, config):
        loaded = dataclasses.replace(loaded, special=_NeverStop(**dataclasses.asdict(loaded.special)))
        super().__init__(loaded, config)
        self.scripts: dict[str, list[int]] = {}
        self.generated = 0

    def constraint(self, phase, settings, convention, images=()):
        return Forced(self.scripts[phase])

    def generate(self, *args, **kwargs):
        for token in super().generate(*args, **kwargs):
            self.generated += 1
            yield token

    def generate_batch(self, *args, **kwargs):
        for row, token in super().generate_batch(*args, **kwargs):
            self.generated += 1
            yield row, token


FILLER = ("The red car is parked next to the blue bicycle near the window and a small dog is "
          "sitting on the chair in the kitchen while the clock on the tower says seven ")


def _exact(engine: Engine, head: str, tail: str, n_tokens: int) -> list[int]:
    """ids(head) + filler ids + ids(tail), exactly n_tokens long. Token-level concatenation
    decodes to the concatenated text (byte-level BPE), so the parser sees valid JSON."""
    head_ids, tail_ids = engine.encode_text(head), engine.encode_text(tail)
    need = n_tokens - len(head_ids) - len(tail_ids)
    if need < 0:
        raise ValueError(f"{n_tokens} tokens are too few for this script "
                         f"(the fixed part alone is {len(head_ids) + len(tail_ids)})")
    filler = engine.encode_text(FILLER)
    while len(filler) < need:
        filler = filler + filler
    return head_ids + filler[:need] + tail_ids


def region_boxes(n: int) -> list[tuple[float, float, float, float]]:
    """n distinct boxes (fractions of the image), left to right along a diagonal."""
    return [(0.05 + 0.8 * i / max(n, 1), 0.1 + 0.5 * i / max(n, 1),
             0.05 + 0.8 * i / max(n, 1) + 0.25, 0.1 + 0.5 * i / max(n, 1) + 0.3) for i in range(n)]


def _native(box, convention: BoxConvention) -> list[int]:
    return [min(round(box[0] * convention.x_range), convention.x_range),
            min(round(box[1] * convention.y_range), convention.y_range),
            min(round(box[2] * convention.x_range), convention.x_range),
            min(round(box[3] * convention.y_range), convention.y_range)]


def _reasoning_parts(convention: BoxConvention, n_regions: int, boxes=None) -> tuple[str, str]:
    boxes = region_boxes(n_regions) if boxes is None else [tuple(b) for b in boxes]
    steps = [{"statement": f"Look at region {i + 1}.", "kind": "object",   # naive.py uses the same statement
              "bbox_2d": _native(b, convention)} for i, b in enumerate(boxes)]
    return prompts.THINK_OPEN, prompts.THINK_CLOSE + "\n" + json.dumps({"steps": steps})


def reasoning_script(engine: Engine, convention: BoxConvention, n_tokens: int, n_regions: int,
                     boxes=None) -> list[int]:
    """<think>filler</think>\\n{"steps": [...]} of exactly n_tokens, with n_regions object steps
    (at `boxes`, fractions (x1, y1, x2, y2) of the image; default region_boxes(n_regions))."""
    head, tail = _reasoning_parts(convention, n_regions, boxes)
    return _exact(engine, head, tail, n_tokens)


def reasoning_script_min_tokens(engine: Engine, convention: BoxConvention, n_regions: int, boxes=None) -> int:
    """The fewest tokens a reasoning script with these regions can have (no filler)."""
    head, tail = _reasoning_parts(convention, n_regions, boxes)
    return len(engine.encode_text(head)) + len(engine.encode_text(tail))


def synthesis_script_min_tokens(engine: Engine, convention: BoxConvention) -> int:
    head, tail = _synthesis_parts(convention)
    return len(engine.encode_text(head)) + len(engine.encode_text(tail))


def _synthesis_parts(convention: BoxConvention) -> tuple[str, str]:
    # key_evidence left empty: the fixed part stays short (the filler makes up the budget)
    return '{"answer": "red", "explanation": "', '", "key_evidence": []}'


def synthesis_script(engine: Engine, convention: BoxConvention, n_tokens: int) -> list[int]:
    """{"answer": ..., "explanation": "filler", "key_evidence": [...]} of exactly n_tokens."""
    head, tail = _synthesis_parts(convention)
    return _exact(engine, head, tail, n_tokens)


def run_script(parse_args, run, print_report, argv=None) -> dict:
    """The shared main() of the CPU benchmark scripts: parse, run (thread count pinned on
    CPU), print the tables, write the JSON."""
    args = parse_args(argv)
    with threads(args.threads if args.device == "cpu" else None):
        data = run(args)
    print_report(data)
    print(f"wrote {write_json(args.out, data)}")
    return data


# ---- scripted output under the real grammar (jump-forward measurements) --------------------

class GrammarScript:
    """A constraint that makes the model write `text` (the canonical tokens of what is left of
    it: every other logit is -inf) while the phase's real grammar decoder follows along: so
    jump-forward (`forced()`, from the real grammar) and prompt-lookup drafts (kept when they
    match the script) act exactly as they would on a model that wrote this text. The same text
    whichever way it is decoded, so arms with the switches on and off do the same work."""

    def __init__(self, decoder, tokenizer, text: str):
        self.decoder, self.tokenizer = decoder, tokenizer
        self.data, self.pos = text.encode("utf-8"), 0
        self.pieces = decoder.cache.decoded_vocab
        self._next: dict[int, int] = {}          # byte position -> the script's token there

    def _token(self) -> int:
        token = self._next.get(self.pos)
        if token is None:       # after a forced chunk that ended inside one of our tokens
            ids = self.tokenizer.encode(self.data[self.pos:].decode("utf-8"), add_special_tokens=False)
            at = self.pos
            for tid in ids:
                self._next.setdefault(at, tid)
                at += len(self.pieces[tid])
            token = self._next[self.pos]
        return token

    @torch.inference_mode()
    def mask(self, logits: torch.Tensor) -> None:       # logits [1, V]
        token = self._token()
        logits.fill_(float("-inf"))
        logits[..., token] = 0.0

    def accept(self, token: int) -> bool:
        piece = self.pieces[token]
        if self.data[self.pos:self.pos + len(piece)] != piece or not self.decoder.accept(token):
            return False
        self.pos += len(piece)
        return True

    def forced(self) -> list[int]:
        return self.decoder.forced()

    def is_finished(self) -> bool:
        return self.decoder.is_finished()

    def __getattr__(self, name):        # text(), completion_text(), finish(): the decoder's
        return getattr(self.decoder, name)


def _grown(engine: Engine, n_tokens: int, build, limits: list[int]) -> list[str]:
    """Filler words into text slots, in order, each slot at most its limit in characters, until
    build(slots) is n_tokens canonical tokens long or every slot is full (then it is shorter:
    the grammar's limits allow no more, as they would not for a real model)."""
    words, slots, w = FILLER.split(), ["" for _ in limits], 0
    for j, limit in enumerate(limits):
        while len(engine.encode_text(build(slots))) < n_tokens:
            grown = f"{slots[j]} {words[w % len(words)]}".lstrip()
            if len(grown) > limit:
                break
            slots[j], w = grown, w + 1
    return slots


def reasoning_text(engine: Engine, convention: BoxConvention, n_tokens: int, boxes,
                   max_thinking_chars: int) -> str:
    """<think>filler</think>\n{"steps": [...]} of about n_tokens (canonical tokens), one object
    step per box, within the grammar's limits: the thinking takes filler up to
    max_thinking_chars, then each statement up to its limit (json.dumps spells the grammar's
    separators the same way)."""
    from corgi.formats import MAX_STRING_CHARS

    def build(slots: list[str]) -> str:
        think, statements = slots[0], slots[1:]
        steps = [{"statement": f"Look at region {i + 1}. {extra}".rstrip(), "kind": "object",
                  "bbox_2d": _native(b, convention)} for i, (b, extra) in enumerate(zip(boxes, statements))]
        return prompts.THINK_OPEN + think + prompts.THINK_CLOSE + "\n" + json.dumps({"steps": steps})

    limits = [max(max_thinking_chars - 10, 0)] + [MAX_STRING_CHARS - 30] * len(boxes)
    return build(_grown(engine, n_tokens, build, limits))


def synthesis_text(engine: Engine, convention: BoxConvention, n_tokens: int, boxes) -> str:
    """{"answer", "explanation", "key_evidence": [up to 3 items with boxes]} of about n_tokens,
    within the grammar's string limits: the explanation takes filler up to its limit, then each
    item's description."""
    from corgi.formats import MAX_EXPLANATION_CHARS, MAX_KEY_EVIDENCE, MAX_STRING_CHARS
    n_items = min(MAX_KEY_EVIDENCE, len(boxes))

    def build(slots: list[str]) -> str:
        expl, descs = slots[0], slots[1:]
        items = [{"description": d or "x", "bbox_2d": _native(b, convention)} for d, b in zip(descs, boxes)]
        return json.dumps({"answer": "red", "explanation": expl or "x", "key_evidence": items})

    limits = [MAX_EXPLANATION_CHARS - 10] + [MAX_STRING_CHARS - 10] * n_items
    return build(_grown(engine, n_tokens, build, limits))


class GrammarScriptEngine(ForcedEngine):
    """ForcedEngine whose phase 1+2 / 4 scripts run under the real grammar where `texts[phase]`
    is set, and as forced token sequences (`scripts[phase]`) where it is not."""

    def __init__(self, loaded: LoadedModel, config):
        super().__init__(loaded, config)
        self.texts: dict[str, str] = {}

    def constraint(self, phase, settings, convention, images=()):
        if phase not in self.texts:
            return super().constraint(phase, settings, convention, images)
        return GrammarScript(Engine.constraint(self, phase, settings, convention, images),
                             self.lm.tokenizer, self.texts[phase])
