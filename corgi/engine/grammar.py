"""Grammar-constrained decoding for the two structured phases, on xgrammar 0.2.8.

What the grammars accept (see `prompts.py` for the formats the parser reads):

  phase 1+2 (`reasoning_grammar_source`):
      <think>THINK</think>\\n{"steps": [STEP, STEP, ...]}
      THINK  up to `max_thinking_chars` characters, any character except "<" (newlines allowed)
      STEP   {"statement": STR, "kind": "object", "bbox_2d": BOX}
           | {"statement": STR, "kind": "text", "bbox_2d": BOX}
           | {"statement": STR, "kind": "reasoning", "bbox_2d": null}
      1..max_steps steps.
  phase 4 (`synthesis_grammar_source`):
      {"answer": STR, "explanation": STR400, "key_evidence": [ITEM, ...]}
      ITEM   {"description": STR, "bbox_2d": BOX | null}, 0..3 items.

  STR    a JSON string of at most MAX_STRING_CHARS characters (STR400: MAX_EXPLANATION_CHARS).
         A character is any code point except '"', '\\\\' and control characters (< 0x20, 0x7f),
         or one of the escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t. No \\u escapes.
  BOX    [x1, y1, x2, y2]: integers without leading zeros, x in 0..x_range, y in 0..y_range of
         the `BoxConvention` (exact ranges, written digit by digit). The grammar does not enforce
         x1 <= x2; `boxes.to_canonical` repairs reversed corners.

One fixed whitespace style (", " and ": ", nothing else), so the text is predictable. Every
part is bounded, so any token sequence the mask allows ends within `*_max_bytes(...)` bytes,
hence within that many tokens (each allowed token is at least one byte).

Termination / EOS: the grammars contain no end-of-sequence token. Matchers are built with
`terminate_without_stop_token=True`, so `ConstrainedDecoder.is_finished()` is True right after
the final "}" has been accepted. The engine then stops and appends <|im_end|> itself (it must
not call `accept` with <|im_end|>: xgrammar rejects any token after termination). If the engine
does call `mask()` after the end, the mask allows only the stop tokens (<|im_end|>,
<|endoftext|>), which is xgrammar's own behaviour.

Special tokens: xgrammar 0.2.8 treats added special tokens such as <|image_pad|> or
<|im_start|> as ordinary text (their bytes are their literal names), so the grammar alone would
allow them inside a JSON string. `ConstrainedDecoder.mask` therefore also removes every special
token of the tokenizer (stop tokens stay with xgrammar, which allows them only at the end).

Out of budget: `completion_text()` / `completion_token_ids()` give a short text that closes the
structure validly from wherever the output stopped (see `ConstrainedDecoder.completion_bytes`).
Inside <think> the completion is
    </think>\\n{"steps": [{"statement": "", "kind": "reasoning", "bbox_2d": null}]}
i.e. one empty reasoning step (no region to look at); inside a step it closes the current string,
picks "reasoning" (or finishes the open box with zeros) and closes the arrays and objects.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
import xgrammar as xgr

from ..boxes import BoxConvention

MAX_STRING_CHARS = 200        # statement, answer, description
MAX_EXPLANATION_CHARS = 400   # synthesis explanation
MAX_EVIDENCE_ITEMS = 3        # synthesis key_evidence
COMPILE_THREADS = 2

_UTF8_MAX = 4                 # bytes per code point, worst case

# -- grammar sources ------------------------------------------------------------------------

_STRING_CHAR = r'''[^"\\\0-\x1f\x7f] | "\\" ["\\/bfnrt]'''


def _lit(text: str) -> str:
    """An EBNF string literal for `text` (only what our literals need: quotes, backslash, newline)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _int_range_alternatives(n: int) -> list[str]:
    """EBNF alternatives matching the decimal integers 0..n, without leading zeros."""
    if n < 0:
        raise ValueError(f"range upper bound must be >= 0, got {n}")
    digits = str(n)
    length = len(digits)
    alts: list[str] = []
    # every shorter length in full
    for size in range(1, length):
        alts.append("[0-9]" if size == 1 else "[1-9]" + " [0-9]" * (size - 1))
    # the same length as n: walk n's digits, taking a smaller digit at position i
    if length == 1:
        alts.append(f"[0-{n}]")
        return alts
    for i, ch in enumerate(digits):
        low = 1 if i == 0 else 0
        high = int(ch) - 1
        if high >= low:
            parts = [_lit(digits[:i])] if i else []
            parts.append(f"[{low}-{high}]" if high > low else f"[{low}]")
            parts.extend(["[0-9]"] * (length - i - 1))
            alts.append(" ".join(parts))
    alts.append(_lit(digits))
    return alts


def _int_rule(name: str, n: int) -> str:
    return f"{name} ::= " + " | ".join(f"({a})" for a in _int_range_alternatives(n))


def _box_rules(convention: BoxConvention) -> list[str]:
    rules = [_int_rule("xint", convention.x_range)]
    y_name = "xint"
    if convention.y_range != convention.x_range:
        rules.append(_int_rule("yint", convention.y_range))
        y_name = "yint"
    rules.append(f'box ::= "[" xint ", " {y_name} ", " xint ", " {y_name} "]"')
    return rules


def _string_rules() -> list[str]:
    return [
        f"schar ::= {_STRING_CHAR}",
        f'str ::= "\\"" schar{{0,{MAX_STRING_CHARS}}} "\\""',
        f'longstr ::= "\\"" schar{{0,{MAX_EXPLANATION_CHARS}}} "\\""',
    ]


def _list_of(item: str, min_items: int, max_items: int) -> str:
    """EBNF for `item` repeated min..max times, separated by ", " (min is 0 or 1)."""
    if max_items < 1:
        return '""'
    sep = '", "'
    more = f" ({sep} {item}){{0,{max_items - 1}}}" if max_items > 1 else ""
    one_or_more = f"({item}{more})"
    return one_or_more if min_items >= 1 else f"({one_or_more})?"


def reasoning_grammar_source(max_steps: int, convention: BoxConvention,
                             max_thinking_chars: int) -> str:
    """EBNF (xgrammar dialect) for phase 1+2: <think>...</think>\\n{"steps": [...]}."""
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    if max_thinking_chars < 0:
        raise ValueError("max_thinking_chars must be >= 0")
    steps = _list_of("step", 1, max_steps)
    rules = [
        f'root ::= "<think>" tchar{{0,{max_thinking_chars}}} "</think>\\n{{\\"steps\\": [" {steps} "]}}"',
        "tchar ::= [^<]",
        'step ::= "{\\"statement\\": " str ", \\"kind\\": " kindbox "}"',
        'kindbox ::= ("\\"object\\", \\"bbox_2d\\": " box) | ("\\"text\\", \\"bbox_2d\\": " box)'
        ' | "\\"reasoning\\", \\"bbox_2d\\": null"',
        *_string_rules(),
        *_box_rules(convention),
    ]
    return "\n".join(rules) + "\n"


def synthesis_grammar_source(convention: BoxConvention) -> str:
    """EBNF (xgrammar dialect) for phase 4: {"answer": ..., "explanation": ..., "key_evidence": [...]}."""
    items = _list_of("item", 0, MAX_EVIDENCE_ITEMS)
    rules = [
        'root ::= "{\\"answer\\": " str ", \\"explanation\\": " longstr ", \\"key_evidence\\": ["'
        f' {items} "]}}"',
        'item ::= "{\\"description\\": " str ", \\"bbox_2d\\": " (box | "null") "}"',
        *_string_rules(),
        *_box_rules(convention),
    ]
    return "\n".join(rules) + "\n"


# -- worst-case lengths (bytes; an allowed token is >= 1 byte, so also a token bound) ---------

def _str_max_bytes(chars: int) -> int:
    return 2 + chars * _UTF8_MAX


def _box_max_bytes(convention: BoxConvention) -> int:
    return len("[, , , ]") + 2 * len(str(convention.x_range)) + 2 * len(str(convention.y_range))


def reasoning_max_bytes(max_steps: int, convention: BoxConvention, max_thinking_chars: int) -> int:
    """Upper bound on the UTF-8 length of any text `reasoning_grammar_source(...)` accepts."""
    step = (len('{"statement": , "kind": "reasoning", "bbox_2d": }')
            + _str_max_bytes(MAX_STRING_CHARS) + max(_box_max_bytes(convention), len("null")))
    return (len('<think></think>\n{"steps": []}') + max_thinking_chars * _UTF8_MAX
            + max_steps * step + (max_steps - 1) * len(", "))


def synthesis_max_bytes(convention: BoxConvention) -> int:
    """Upper bound on the UTF-8 length of any text `synthesis_grammar_source(...)` accepts."""
    item = (len('{"description": , "bbox_2d": }') + _str_max_bytes(MAX_STRING_CHARS)
            + max(_box_max_bytes(convention), len("null")))
    return (len('{"answer": , "explanation": , "key_evidence": []}')
            + _str_max_bytes(MAX_STRING_CHARS) + _str_max_bytes(MAX_EXPLANATION_CHARS)
            + MAX_EVIDENCE_ITEMS * item + (MAX_EVIDENCE_ITEMS - 1) * len(", "))


# -- compiled-grammar cache -----------------------------------------------------------------

def _token_id(tokenizer, text: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    return tid if isinstance(tid, int) and tid != unk else None


class GrammarCache:
    """One xgrammar compiler per tokenizer, and compiled grammars by source (LRU).

    `vocab_size` is the model's vocabulary (lm_head rows); it may exceed len(tokenizer), the
    extra ids are never allowed. Thread-safe; compiles are serialised.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None, *,
                 stop_token_ids: Sequence[int] | None = None, max_entries: int = 16,
                 max_threads: int = COMPILE_THREADS):
        if stop_token_ids is None:
            stop_token_ids = [t for t in (_token_id(tokenizer, "<|im_end|>"),
                                          _token_id(tokenizer, "<|endoftext|>")) if t is not None]
            if not stop_token_ids and tokenizer.eos_token_id is not None:
                stop_token_ids = [tokenizer.eos_token_id]
        self.stop_token_ids = list(stop_token_ids)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids or None)
        self.vocab_size = self.tokenizer_info.vocab_size
        # xgrammar's own cache is off: ours is the one place compiled grammars live.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads,
                                            cache_enabled=False)
        self.decoded_vocab: list[bytes] = self.tokenizer_info.decoded_vocab
        self.banned_ids = sorted(self._special_ids(tokenizer) - set(self.stop_token_ids))
        self.allow_row = _allow_row(self.vocab_size, self.banned_ids)
        self._byte_token: dict[int, int] = {}
        for tid, b in enumerate(self.decoded_vocab):
            if len(b) == 1 and b[0] not in self._byte_token and tid not in set(self.banned_ids):
                self._byte_token[b[0]] = tid
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def _special_ids(self, tokenizer) -> set[int]:
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        for tid, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(added, "special", False):
                ids.add(int(tid))
        return {i for i in ids if 0 <= i < self.vocab_size}

    def get(self, source: str) -> xgr.CompiledGrammar:
        """The compiled grammar for this EBNF source (compiled on first use)."""
        with self._lock:
            compiled = self._compiled.get(source)
            if compiled is not None:
                self._compiled.move_to_end(source)
                return compiled
            compiled = self.compiler.compile_grammar(source)
            self._compiled[source] = compiled
            while len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
            return compiled

    def __contains__(self, source: str) -> bool:
        with self._lock:
            return source in self._compiled

    def __len__(self) -> int:
        with self._lock:
            return len(self._compiled)

    def decoder(self, source: str) -> "ConstrainedDecoder":
        """A fresh per-sequence decoder for this grammar."""
        return ConstrainedDecoder(self, self.get(source))

    def reasoning_decoder(self, max_steps: int, convention: BoxConvention,
                          max_thinking_chars: int) -> "ConstrainedDecoder":
        return self.decoder(reasoning_grammar_source(max_steps, convention, max_thinking_chars))

    def synthesis_decoder(self, convention: BoxConvention) -> "ConstrainedDecoder":
        return self.decoder(synthesis_grammar_source(convention))

    def byte_token(self, byte: int) -> int:
        """A token whose text is exactly this one byte (byte-level vocabularies have all 256)."""
        try:
            return self._byte_token[byte]
        except KeyError:
            raise ValueError(f"the vocabulary has no single-byte token for {byte:#04x}") from None


def _allow_row(vocab_size: int, banned: Iterable[int]) -> torch.Tensor:
    """An int32 bitmask row with every bit set except the banned ids (and ids >= vocab_size)."""
    words = (vocab_size + 31) // 32
    bits = torch.ones(words * 32, dtype=torch.bool)
    bits[vocab_size:] = False
    banned = list(banned)
    if banned:
        bits[torch.tensor(banned, dtype=torch.long)] = False
    weights = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int64)
    row = (bits.view(words, 32).to(torch.int64) * weights).sum(dim=1)
    return row.to(torch.int32)


# -- per-sequence decoder -------------------------------------------------------------------

# Tried in this order when closing a structure; each is checked against the grammar.
_CLOSERS = ("</think>\n", '"', "]", "}", "reasoning", ", ", "0", "null")
_MAX_CLOSING_MOVES = 200


class ConstrainedDecoder:
    """The grammar state of one sequence: mask logits, accept tokens, close early if needed."""

    def __init__(self, cache: GrammarCache, compiled: xgr.CompiledGrammar):
        self.cache = cache
        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=cache.stop_token_ids or None,
                                          terminate_without_stop_token=True)
        self.bitmask = xgr.allocate_token_bitmask(1, cache.vocab_size)
        self._bytes = bytearray()
        self._lengths: list[int] = []
        self._device_mask: torch.Tensor | None = None

    # decoding -----------------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        """Write this sequence's allowed tokens into row `index` of a CPU int32 bitmask."""
        self.matcher.fill_next_token_bitmask(bitmask, index)
        if not self.matcher.is_terminated():
            bitmask[index].bitwise_and_(self.cache.allow_row)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place. logits: [vocab] or [1, vocab],
        float32/float16/bfloat16, CPU or CUDA (the bitmask is copied to the logits' device)."""
        if logits.shape[-1] < self.cache.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries, grammar vocab is "
                             f"{self.cache.vocab_size}")
        self.fill_bitmask(self.bitmask, 0)
        _apply(logits if logits.dim() == 2 else logits.view(1, -1), self.bitmask,
               self.cache.vocab_size, self)

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar does not allow it."""
        token_id = int(token_id)
        if token_id in self.cache.banned_ids or not self.matcher.accept_token(token_id):
            return False
        piece = self.cache.decoded_vocab[token_id]
        self._bytes += piece
        self._lengths.append(len(piece))
        return True

    def rollback(self, num_tokens: int = 1) -> None:
        self.matcher.rollback(num_tokens)
        for _ in range(num_tokens):
            n = self._lengths.pop()
            if n:
                del self._bytes[-n:]

    def is_finished(self) -> bool:
        """The whole structure has been accepted (stop here; the engine appends <|im_end|>)."""
        return self.matcher.is_terminated()

    @property
    def num_tokens(self) -> int:
        return len(self._lengths)

    @property
    def output_bytes(self) -> bytes:
        return bytes(self._bytes)

    def text(self) -> str:
        """The accepted text, without a trailing incomplete UTF-8 character (see completion_text)."""
        return bytes(self._bytes[:len(self._bytes) - _incomplete_tail(self._bytes)]).decode("utf-8")

    # closing early ------------------------------------------------------------------------
    def completion_bytes(self) -> bytes:
        """The bytes to append to the accepted bytes so the output is complete and valid.

        Greedy and grammar-checked: first finish a split UTF-8 character, then repeatedly take
        xgrammar's jump-forward string (what the grammar forces) or else the first of
        `_CLOSERS` that the grammar accepts. Empty when already finished.
        """
        if self.matcher.is_terminated():
            return b""
        probe = self.matcher.fork()
        out = bytearray()
        for _ in range(_incomplete_need(self._bytes)):
            for cont in range(0x80, 0xC0):
                trial = probe.fork()
                if trial.accept_string(bytes([cont])):
                    probe = trial
                    out.append(cont)
                    break
            else:
                raise RuntimeError("cannot finish a split UTF-8 character under the grammar")
        for _ in range(_MAX_CLOSING_MOVES):
            if probe.is_terminated() or probe.is_completed():
                return bytes(out)
            forced = probe.find_jump_forward_string()
            if forced:
                if not probe.accept_string(forced):
                    raise RuntimeError(f"grammar refused its own jump-forward string {forced!r}")
                out += forced.encode("utf-8")
                continue
            for closer in _CLOSERS:
                trial = probe.fork()
                if trial.accept_string(closer):
                    probe = trial
                    out += closer.encode("utf-8")
                    break
            else:
                raise RuntimeError(f"no way to close the structure after {bytes(self._bytes + out)!r}")
        raise RuntimeError("closing the structure did not finish")

    def completion_text(self) -> str:
        """Text that closes the structure: `text() + completion_text()` is a complete, valid output.

        Normally this is just the suffix to append. If the budget ran out in the middle of a
        multi-byte character, `text()` leaves that partial character out and this starts with it,
        finished (to feed the model, use `completion_token_ids()`, which continues the bytes).
        """
        tail = _incomplete_tail(self._bytes)
        partial = bytes(self._bytes[len(self._bytes) - tail:]) if tail else b""
        return (partial + self.completion_bytes()).decode("utf-8")

    def completion_token_ids(self) -> list[int]:
        """Token ids whose bytes are exactly `completion_bytes()` (to append to the sequence)."""
        data = self.completion_bytes()
        ids = [self.cache.byte_token(b) for b in data[:_incomplete_need(self._bytes)]]
        rest = data[len(ids):].decode("utf-8")
        if rest:
            ids += self.cache.tokenizer.encode(rest, add_special_tokens=False)
        return ids

    def finish(self) -> list[int]:
        """Accept the closing tokens into this decoder; returns them. Afterwards is_finished()."""
        ids = self.completion_token_ids()
        for i, tid in enumerate(ids):
            if not self.accept(tid):
                self.rollback(i)
                raise RuntimeError(f"closing token {tid} was refused")
        return ids


def _apply(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int,
           owner: ConstrainedDecoder | None = None) -> None:
    if logits.device.type != "cpu":
        if owner is not None:
            if owner._device_mask is None or owner._device_mask.device != logits.device \
                    or owner._device_mask.shape != bitmask.shape:
                owner._device_mask = torch.empty_like(bitmask, device=logits.device)
            owner._device_mask.copy_(bitmask, non_blocking=True)
            bitmask = owner._device_mask
        else:
            bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size)


def mask_batch(decoders: Sequence[ConstrainedDecoder | None], logits: torch.Tensor,
               bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Mask a [B, vocab] logits tensor in place; decoders[i] constrains row i (None: leave it).

    `bitmask` may be passed in to reuse an allocation (CPU, int32, [>=B, ceil(vocab/32)]);
    returns the bitmask used.
    """
    live = [(i, d) for i, d in enumerate(decoders) if d is not None]
    if not live:
        return bitmask
    vocab_size = live[0][1].cache.vocab_size
    if bitmask is None:
        bitmask = xgr.allocate_token_bitmask(len(decoders), vocab_size)
    for i, d in live:
        d.fill_bitmask(bitmask, i)
    indices = [i for i, _ in live]
    mask = bitmask if logits.device.type == "cpu" else bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab_size, indices=indices)
    return bitmask


# -- UTF-8 helpers --------------------------------------------------------------------------

def _incomplete_tail(data: bytes | bytearray) -> int:
    """How many trailing bytes form an unfinished UTF-8 character (0 if none)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:          # continuation byte: keep looking for the lead
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return back if need > back else 0
    return 0


def _incomplete_need(data: bytes | bytearray) -> int:
    """How many continuation bytes the unfinished trailing character still needs."""
    tail = _incomplete_tail(data)
    if not tail:
        return 0
    b = data[-tail]
    need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4
    return need - tail
