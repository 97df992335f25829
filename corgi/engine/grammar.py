"""Grammar-constrained decoding for the two structured phases, on xgrammar 0.2.8.

Accepted outputs (the formats of `prompts.py`, which `parsing.py` reads):

  phase 1+2 (`reasoning_spec` / `reasoning_grammar_source`):
      <think>THINK</think>\\n{"steps": [STEP, STEP, ...]}
      THINK  at most `max_thinking_chars` characters, anything but "<" (newlines allowed)
      STEP   {"statement": STR, "kind": "object", "bbox_2d": BOX}
           | {"statement": STR, "kind": "text", "bbox_2d": BOX}
           | {"statement": STR, "kind": "reasoning", "bbox_2d": null}
      1..max_steps steps.
  phase 4 (`synthesis_spec` / `synthesis_grammar_source`):
      {"answer": STR, "explanation": STR, "key_evidence": [ITEM, ...]}
      ITEM   {"description": STR, "bbox_2d": BOX | null}, 0..MAX_EVIDENCE_ITEMS items.

  STR    a JSON string: any code point except '"', '\\\\' and control characters (< 0x20, 0x7f),
         or one of the escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t (no \\u escapes); at most
         MAX_STRING_CHARS characters (the explanation: MAX_EXPLANATION_CHARS); an escape counts 2.
  BOX    [x1, y1, x2, y2]: integers without leading zeros, x in 0..x_range and y in 0..y_range of
         the `BoxConvention`, as exact digit-by-digit ranges. x1 <= x2 is not enforced
         (`boxes.to_canonical` repairs reversed corners).

One whitespace style only (", " and ": "), so the text is predictable.

Where the bounds live. The structure, the step/item counts and the box ranges are in the EBNF.
The *lengths* (thinking text, strings) are enforced by `ConstrainedDecoder`, not by the EBNF:
in xgrammar 0.2.8 a bounded repetition is expensive at a Qwen-sized vocabulary (151,936 ids):
`[^<]{0,256}` takes ~8 s to compile, `[^"...]{0,200}` ~4 s, and `("\\" [..] | [^..]){0,200}`
makes every mask cost 0.3-0.8 s, while the unbounded recursive forms used here compile in ~0.02 s
and fill a mask in ~0.01-0.05 ms. The decoder follows the accepted bytes with a small lexer and,
near a limit, also masks out every token that would write past it (per-token tables of
"characters before the closing delimiter", compared with what is left). The thinking bound is
exact (also for tokens that run past "<think>"); a string bound is exact except that the token
which *opens* a string may put up to its own length into it before the mask can act, so it can
only be exceeded with tokens longer than the limit. Hence any token sequence the decoder allows
ends within `spec.max_bytes` bytes, so within that many tokens (each allowed token is >= 1 byte).

Unicode. The character classes exclude U+D800..U+DFFF: xgrammar 0.2.8's negated classes otherwise
accept UTF-8-encoded surrogates, which Python's decoder and `json.loads` refuse.

Termination / EOS. The grammars contain no end-of-sequence token. Matchers are built with
`terminate_without_stop_token=True`, so `ConstrainedDecoder.is_finished()` is True right after
the final "}" is accepted; the engine stops and appends <|im_end|> itself. Do not `accept`
<|im_end|> (xgrammar refuses every token after termination; `accept` returns False). A `mask()`
after the end allows only the stop tokens (<|im_end|>, <|endoftext|>), xgrammar's own behaviour,
and stop tokens are never allowed before the end.

Special tokens. xgrammar 0.2.8 decodes added special tokens such as <|image_pad|> or <|im_start|>
to their literal names and treats them as text, so the grammar alone would allow them inside a
JSON string; `ConstrainedDecoder` masks out every special token of the tokenizer.

Out of budget. `completion_text()` / `completion_token_ids()` / `finish()` close the structure
validly from wherever the output stopped (greedy, checked against the grammar). Inside <think>
the closing is
    </think>\n{"steps": [{"statement": "", "kind": "reasoning", "bbox_2d": null}]}
(one empty reasoning step: no region to look at; `parsing.py` drops empty statements, so this
reads as "no steps"); inside a step it closes the open string, picks "reasoning" if the kind is
not written yet, finishes an open box with zeros, then closes the arrays and objects. In phase 4
it closes the strings, writes "null" for an unwritten box and ends key_evidence there.
If the budget ran out inside a multi-byte character, `text()` leaves that character out and
`completion_text()` starts with it, finished; `closed_text()` is always the whole valid output and
`completion_token_ids()` the exact tokens to append (they continue the split bytes, whereas
re-encoding `completion_text()` would repeat them).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import xgrammar as xgr

from ..boxes import BoxConvention

MAX_STRING_CHARS = 200        # statement, answer, description (and the fixed keys / kinds)
MAX_EXPLANATION_CHARS = 400   # synthesis explanation
MAX_EVIDENCE_ITEMS = 3        # synthesis key_evidence
COMPILE_THREADS = 2
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_UTF8_MAX = 4                 # bytes per code point, worst case

__all__ = [
    "MAX_STRING_CHARS", "MAX_EXPLANATION_CHARS", "MAX_EVIDENCE_ITEMS", "GrammarSpec",
    "reasoning_grammar_source", "synthesis_grammar_source", "reasoning_spec", "synthesis_spec",
    "reasoning_max_bytes", "synthesis_max_bytes", "GrammarCache", "ConstrainedDecoder",
    "mask_batch",
]


# -- grammar sources ------------------------------------------------------------------------

def _lit(text: str) -> str:
    """An EBNF string literal for `text` (quotes, backslashes and newlines escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _int_range_alternatives(n: int) -> list[str]:
    """EBNF alternatives matching exactly the decimal integers 0..n, without leading zeros."""
    if n < 0:
        raise ValueError(f"range upper bound must be >= 0, got {n}")
    digits = str(n)
    length = len(digits)
    if length == 1:
        return [f"[0-{n}]"]
    alts = ["[0-9]"] + ["[1-9]" + " [0-9]" * (size - 1) for size in range(2, length)]
    for i, ch in enumerate(digits):          # same length as n: smaller digit at position i
        low, high = (1 if i == 0 else 0), int(ch) - 1
        if high >= low:
            parts = [_lit(digits[:i])] if i else []
            parts.append(f"[{low}-{high}]")
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


# xgrammar 0.2.8's negated classes accept UTF-8-encoded surrogates (ED A0..BF ..), which are not
# valid UTF-8 (Python's decode and json.loads refuse them): exclude them explicitly.
_SURROGATES = r"\uD800-\uDFFF"

# A JSON string, written recursively like xgrammar's own builtin JSON grammar (cheapest form).
_STRING_RULES = [
    'str ::= "\\"" strtail',
    'strtail ::= "\\"" | [^"\\\\\\0-\\x1f\\x7f' + _SURROGATES + '] strtail'
    ' | "\\\\" ["\\\\/bfnrt] strtail',
]


def _list_of(item: str, min_items: int, max_items: int) -> str:
    """EBNF for `item` repeated min..max times, separated by ", " (min is 0 or 1)."""
    if max_items < 1:
        return '""'
    more = f' (", " {item}){{0,{max_items - 1}}}' if max_items > 1 else ""
    one_or_more = f"({item}{more})"
    return one_or_more if min_items >= 1 else f"({one_or_more})?"


def reasoning_grammar_source(max_steps: int, convention: BoxConvention,
                             max_thinking_chars: int) -> str:
    """EBNF (xgrammar dialect) for phase 1+2: <think>...</think>\\n{"steps": [...]}.

    The thinking and string lengths are enforced by the decoder (module docstring), so the
    source does not depend on `max_thinking_chars` (one compile serves every limit).
    """
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    if max_thinking_chars < 0:
        raise ValueError("max_thinking_chars must be >= 0")
    steps = _list_of("step", 1, max_steps)
    rules = [
        f'root ::= "<think>" [^<{_SURROGATES}]* "</think>\\n{{\\"steps\\": [" {steps} "]}}"',
        'step ::= "{\\"statement\\": " str ", \\"kind\\": " kindbox "}"',
        'kindbox ::= ("\\"object\\", \\"bbox_2d\\": " box) | ("\\"text\\", \\"bbox_2d\\": " box)'
        ' | "\\"reasoning\\", \\"bbox_2d\\": null"',
        *_STRING_RULES,
        *_box_rules(convention),
    ]
    return "\n".join(rules) + "\n"


def synthesis_grammar_source(convention: BoxConvention) -> str:
    """EBNF (xgrammar dialect) for phase 4: {"answer": ..., "explanation": ..., "key_evidence": [...]}."""
    items = _list_of("item", 0, MAX_EVIDENCE_ITEMS)
    rules = [
        'root ::= "{\\"answer\\": " str ", \\"explanation\\": " str ", \\"key_evidence\\": ["'
        f' {items} "]}}"',
        'item ::= "{\\"description\\": " str ", \\"bbox_2d\\": " (box | "null") "}"',
        *_STRING_RULES,
        *_box_rules(convention),
    ]
    return "\n".join(rules) + "\n"


# -- worst-case lengths (bytes; an allowed token is >= 1 byte, so also a token bound) ---------

def _str_max_bytes(chars: int) -> int:
    return 2 + chars * _UTF8_MAX        # an escape: 2 counted characters, 2 bytes


def _box_max_bytes(convention: BoxConvention) -> int:
    return len("[, , , ]") + 2 * len(str(convention.x_range)) + 2 * len(str(convention.y_range))


def reasoning_max_bytes(max_steps: int, convention: BoxConvention, max_thinking_chars: int) -> int:
    """Upper bound on the UTF-8 length of any output the reasoning decoder allows."""
    step = (len('{"statement": , "kind": "reasoning", "bbox_2d": }')
            + _str_max_bytes(MAX_STRING_CHARS) + max(_box_max_bytes(convention), len("null")))
    return (len('<think></think>\n{"steps": []}') + max_thinking_chars * _UTF8_MAX
            + max_steps * step + (max_steps - 1) * len(", "))


def synthesis_max_bytes(convention: BoxConvention) -> int:
    """Upper bound on the UTF-8 length of any output the synthesis decoder allows."""
    item = (len('{"description": , "bbox_2d": }') + _str_max_bytes(MAX_STRING_CHARS)
            + max(_box_max_bytes(convention), len("null")))
    return (len('{"answer": , "explanation": , "key_evidence": []}')
            + _str_max_bytes(MAX_STRING_CHARS) + _str_max_bytes(MAX_EXPLANATION_CHARS)
            + MAX_EVIDENCE_ITEMS * item + (MAX_EVIDENCE_ITEMS - 1) * len(", "))


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar plus the length limits its decoder enforces.

    think_chars: None when the output has no <think> block, else its limit in characters.
    string_chars: limit for every JSON string; key_chars: per-key overrides for value strings.
    """
    source: str
    think_chars: int | None
    string_chars: int
    key_chars: tuple[tuple[str, int], ...]
    max_bytes: int


def reasoning_spec(max_steps: int, convention: BoxConvention, max_thinking_chars: int) -> GrammarSpec:
    return GrammarSpec(reasoning_grammar_source(max_steps, convention, max_thinking_chars),
                       think_chars=max_thinking_chars, string_chars=MAX_STRING_CHARS, key_chars=(),
                       max_bytes=reasoning_max_bytes(max_steps, convention, max_thinking_chars))


def synthesis_spec(convention: BoxConvention) -> GrammarSpec:
    return GrammarSpec(synthesis_grammar_source(convention), think_chars=None,
                       string_chars=MAX_STRING_CHARS,
                       key_chars=(("explanation", MAX_EXPLANATION_CHARS),),
                       max_bytes=synthesis_max_bytes(convention))


# -- per-token length costs -----------------------------------------------------------------

_QUOTE, _BACKSLASH, _LT = 0x22, 0x5C, 0x3C
_THINK, _STR, _ESC = 0, 1, 2      # length tables: thinking text, string, string after a backslash
_OPENING_TABLE = -1               # -1 - k: "<think>" has k bytes left (tokens may run past it)


def _is_lead(b: int) -> bool:
    return b & 0xC0 != 0x80


def _think_cost(piece: bytes) -> int:
    """Characters a token adds to the thinking text (those before its first '<')."""
    end = piece.find(b"<")
    return sum(1 for b in (piece if end < 0 else piece[:end]) if _is_lead(b))


def _opening_cost(piece: bytes, left: int) -> int:
    """Thinking characters a token adds when "<think>" still has `left` bytes to come (tokens
    that do not continue "<think>" get 0: the grammar refuses them anyway)."""
    if len(piece) <= left or not piece.startswith(THINK_OPEN.encode()[-left:]):
        return 0
    return _think_cost(piece[left:])


def _string_cost(piece: bytes, escaped: bool) -> int:
    """Characters a token adds to an open JSON string, up to its closing quote. An escape
    counts 2 at its backslash; `escaped`: the string's previous byte was an escape's backslash."""
    cost = 0
    for b in piece:
        if escaped:
            escaped = False
        elif b == _QUOTE:
            break
        elif b == _BACKSLASH:
            escaped = True
            cost += 2
        elif _is_lead(b):
            cost += 1
    return cost


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """bool [32 * k] -> int32 [k], bit i of word j = bits[32 * j + i] (xgrammar's layout)."""
    packed = np.packbits(bits.numpy(), bitorder="little")       # byte j bit i = bits[8j + i]
    return torch.from_numpy(packed.view("<i4").astype(np.int32))


# -- compiled-grammar cache -----------------------------------------------------------------

def _token_id(tokenizer, text: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    return tid if isinstance(tid, int) and tid >= 0 and tid != unk else None


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
        self.tokenizer = tokenizer
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids or None)
        self.vocab_size = self.tokenizer_info.vocab_size
        # xgrammar's own cache is off: ours is the one place compiled grammars live.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads,
                                            cache_enabled=False)
        self.decoded_vocab: list[bytes] = self.tokenizer_info.decoded_vocab
        self.banned_ids = frozenset(self._special_ids(tokenizer) - set(self.stop_token_ids))
        self.words = (self.vocab_size + 31) // 32
        allow = torch.ones(self.words * 32, dtype=torch.bool)
        allow[self.vocab_size:] = False
        if self.banned_ids:
            allow[torch.tensor(sorted(self.banned_ids), dtype=torch.long)] = False
        self.allow_row = _pack(allow)                       # int32 [words]
        self.max_entries = max_entries
        self._compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._costs: list[torch.Tensor] | None = None       # [_THINK/_STR/_ESC] -> int32 [V]
        self._max_cost: list[int] = []
        self._rows: dict[tuple[int, int], torch.Tensor] = {}
        self._byte_token: dict[int, int] | None = None
        self._ensure_costs()       # ~0.3 s at 151k tokens: paid here, not on the first mask

    def _special_ids(self, tokenizer) -> set[int]:
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        for tid, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(added, "special", False):
                ids.add(int(tid))
        return {i for i in ids if 0 <= i < self.vocab_size}

    # compiled grammars
    def get(self, source: str) -> xgr.CompiledGrammar:
        """The compiled grammar for this EBNF source (compiled on first use, then cached)."""
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

    # decoders
    def decoder(self, spec: GrammarSpec) -> "ConstrainedDecoder":
        """A fresh per-sequence decoder for this grammar and its limits."""
        return ConstrainedDecoder(self, self.get(spec.source), spec)

    def reasoning_decoder(self, max_steps: int, convention: BoxConvention,
                          max_thinking_chars: int) -> "ConstrainedDecoder":
        return self.decoder(reasoning_spec(max_steps, convention, max_thinking_chars))

    def synthesis_decoder(self, convention: BoxConvention) -> "ConstrainedDecoder":
        return self.decoder(synthesis_spec(convention))

    # length tables
    def _ensure_costs(self) -> None:
        with self._lock:
            if self._costs is not None:
                return
            think, plain, esc = [], [], []
            for piece in self.decoded_vocab:
                think.append(_think_cost(piece))
                plain.append(_string_cost(piece, False))
                esc.append(_string_cost(piece, True))
            pad = self.words * 32 - len(think)
            tables = [torch.tensor(t + [0] * pad, dtype=torch.int32) for t in (think, plain, esc)]
            self._max_cost = [int(t.max()) for t in tables]
            self._costs = tables

    def cost(self, table: int, token_id: int) -> int:
        if table < 0:
            return _opening_cost(self.decoded_vocab[token_id], _OPENING_TABLE - table)
        self._ensure_costs()
        return int(self._costs[table][token_id])

    def length_row(self, table: int, remaining: int) -> torch.Tensor | None:
        """Bitmask row of the tokens adding at most `remaining` characters (None: all of them)."""
        remaining = max(remaining, 0)
        key = (table, remaining)
        row = self._rows.get(key)
        if row is not None:
            return row
        if table < 0:        # rare (the first token or two): a pass over the vocabulary
            left = _OPENING_TABLE - table
            bits = torch.ones(self.words * 32, dtype=torch.bool)
            for tid, piece in enumerate(self.decoded_vocab):
                if len(piece) > left and _opening_cost(piece, left) > remaining:
                    bits[tid] = False
        else:
            self._ensure_costs()
            if remaining >= self._max_cost[table]:
                return None
            bits = self._costs[table] <= remaining
        row = _pack(bits)
        with self._lock:
            self._rows[key] = row
        return row

    def byte_token(self, byte: int) -> int:
        """A token whose text is exactly this one byte (byte-level vocabularies have all 256)."""
        if self._byte_token is None:
            found: dict[int, int] = {}
            for tid, piece in enumerate(self.decoded_vocab):
                if len(piece) == 1 and piece[0] not in found and tid not in self.banned_ids:
                    found[piece[0]] = tid
            self._byte_token = found
        try:
            return self._byte_token[byte]
        except KeyError:
            raise ValueError(f"the vocabulary has no single-byte token for {byte:#04x}") from None


# -- the lexer that follows the output for the length limits --------------------------------

# modes
_OPENING, _THINKING, _OUTSIDE, _IN_STRING = range(4)


@dataclass
class _LexState:
    mode: int
    opening_left: int = 0      # bytes of "<think>" still to come
    count: int = 0             # characters in the current bounded region
    limit: int | None = None   # of the current region
    escaped: bool = False      # inside a string, right after a backslash
    last_sig: int = 0          # last non-space byte outside strings
    current: bytes = b""       # the open string's first bytes (to know keys)
    last_string: bytes = b""

    def copy(self) -> "_LexState":
        return _LexState(**self.__dict__)


class _Lexer:
    """Just enough of the output's syntax to know which bounded region we are in."""

    def __init__(self, spec: GrammarSpec):
        self.think_chars = spec.think_chars
        self.string_chars = spec.string_chars
        self.key_chars: Mapping[bytes, int] = {k.encode(): v for k, v in spec.key_chars}
        if spec.think_chars is None:
            self.state = _LexState(_OUTSIDE)
        else:
            self.state = _LexState(_OPENING, opening_left=len(THINK_OPEN), limit=spec.think_chars)

    def feed(self, piece: bytes) -> None:
        s = self.state
        for b in piece:
            if s.mode == _OPENING:
                s.opening_left -= 1
                if s.opening_left == 0:
                    s.mode, s.count = _THINKING, 0
            elif s.mode == _THINKING:
                if b == _LT:
                    s.mode, s.limit, s.last_sig = _OUTSIDE, None, b
                elif _is_lead(b):
                    s.count += 1
            elif s.mode == _OUTSIDE:
                if b == _QUOTE:
                    is_value = s.last_sig == ord(":")
                    s.mode, s.count, s.escaped, s.current = _IN_STRING, 0, False, b""
                    s.limit = self.key_chars.get(s.last_string, self.string_chars) if is_value \
                        else self.string_chars
                elif b not in b" \t\r\n":
                    s.last_sig = b
            else:  # in a string
                if s.escaped:
                    s.escaped = False
                elif b == _QUOTE:
                    s.mode, s.limit, s.last_string, s.last_sig = _OUTSIDE, None, s.current, b
                    continue
                elif b == _BACKSLASH:
                    s.escaped = True
                    s.count += 2
                elif _is_lead(b):
                    s.count += 1
                if len(s.current) < 32:
                    s.current += bytes([b])

    def bound(self) -> tuple[int, int] | None:
        """(cost table, characters left) when inside a bounded region, else None.
        While "<think>" is being written: (_OPENING_TABLE, characters allowed after it)."""
        s = self.state
        if s.mode == _THINKING:
            return _THINK, s.limit - s.count
        if s.mode == _OPENING:
            return _OPENING_TABLE - s.opening_left, s.limit
        if s.mode == _IN_STRING:
            return (_ESC if s.escaped else _STR), s.limit - s.count
        return None


# -- per-sequence decoder -------------------------------------------------------------------

# Tried in this order when closing a structure; each is checked against the grammar.
_CLOSERS = (THINK_CLOSE + "\n", '"', "]", "}", "reasoning", ", ", "0", "null")
_MAX_CLOSING_MOVES = 200


class ConstrainedDecoder:
    """The grammar state of one sequence: mask logits, accept tokens, close early if needed."""

    def __init__(self, cache: GrammarCache, compiled: xgr.CompiledGrammar, spec: GrammarSpec):
        self.cache = cache
        self.compiled = compiled
        self.spec = spec
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=cache.stop_token_ids or None,
                                          terminate_without_stop_token=True)
        self.bitmask = xgr.allocate_token_bitmask(1, cache.vocab_size)
        self._lexer = _Lexer(spec)
        self._history: list[_LexState] = []
        self._bytes = bytearray()
        self._lengths: list[int] = []
        self._device_mask: torch.Tensor | None = None

    # decoding -----------------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        """Write this sequence's allowed tokens into row `index` of a CPU int32 bitmask."""
        self.matcher.fill_next_token_bitmask(bitmask, index)
        if self.matcher.is_terminated():
            return
        row = bitmask[index]
        row.bitwise_and_(self.cache.allow_row)
        bound = self._lexer.bound()
        if bound is not None:
            limit_row = self.cache.length_row(*bound)
            if limit_row is not None:
                row.bitwise_and_(limit_row)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place. logits: [vocab] or [1, vocab]
        (the last dim may be padded beyond the grammar's vocab: those ids are masked too),
        float32/float16/bfloat16, on CPU or CUDA (the bitmask is then copied to that device)."""
        if logits.shape[-1] < self.cache.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries, the grammar's vocab "
                             f"{self.cache.vocab_size}")
        self.fill_bitmask(self.bitmask, 0)
        rows = logits if logits.dim() == 2 else logits.view(1, -1)
        _apply(rows, self.bitmask, self)
        if rows.shape[-1] > self.cache.vocab_size:
            rows[:, self.cache.vocab_size:] = float("-inf")

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (and no change) if the grammar or a limit forbids it."""
        token_id = int(token_id)
        if token_id in self.cache.banned_ids or not 0 <= token_id < self.cache.vocab_size:
            return False
        bound = self._lexer.bound()
        if bound is not None and self.cache.cost(bound[0], token_id) > max(bound[1], 0):
            return False
        if not self.matcher.accept_token(token_id):
            return False
        piece = self.cache.decoded_vocab[token_id]
        self._history.append(self._lexer.state.copy())
        self._lexer.feed(piece)
        self._bytes += piece
        self._lengths.append(len(piece))
        return True

    def rollback(self, num_tokens: int = 1) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        if num_tokens <= 0:
            return
        if num_tokens > len(self._lengths):
            raise ValueError(f"cannot roll back {num_tokens} of {len(self._lengths)} tokens")
        self.matcher.rollback(num_tokens)
        for _ in range(num_tokens):
            n = self._lengths.pop()
            if n:
                del self._bytes[-n:]
            self._lexer.state = self._history.pop()

    def is_finished(self) -> bool:
        """The whole structure has been accepted: stop here (the engine appends <|im_end|>)."""
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
        """The bytes that, appended to the accepted bytes, make a complete valid output.

        Greedy and grammar-checked: first finish a split UTF-8 character, then repeatedly take
        xgrammar's jump-forward string (what the grammar forces) or else the first of
        `_CLOSERS` the grammar accepts. Empty when already finished. Adds no characters to an
        open string or to the thinking text, so the length limits hold.
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
        """Text that closes the structure: `text() + completion_text()` is a complete valid output.

        Normally just the suffix to append to the text so far. Only if the budget ran out in the
        middle of a multi-byte character does `text()` leave that character out, and this starts
        with it, finished. To extend the token sequence, prefer `completion_token_ids()`.
        """
        tail = _incomplete_tail(self._bytes)
        partial = bytes(self._bytes[len(self._bytes) - tail:]) if tail else b""
        return (partial + self.completion_bytes()).decode("utf-8")

    def closed_text(self) -> str:
        """The complete output: the accepted text closed by `completion_text()`."""
        return self.text() + self.completion_text()

    def completion_token_ids(self) -> list[int]:
        """Token ids whose bytes are exactly `completion_bytes()` (to append to the sequence)."""
        data = self.completion_bytes()
        need = _incomplete_need(self._bytes)
        ids = [self.cache.byte_token(b) for b in data[:need]]
        rest = data[need:].decode("utf-8")
        if rest:
            ids += self.cache.tokenizer.encode(rest, add_special_tokens=False)
        return ids

    def finish(self) -> list[int]:
        """Accept the closing tokens into this decoder and return them; then is_finished()."""
        ids = self.completion_token_ids()
        for i, tid in enumerate(ids):
            if not self.accept(tid):
                self.rollback(i)
                raise RuntimeError(f"closing token {tid} was refused")
        return ids


def _apply(logits: torch.Tensor, bitmask: torch.Tensor, owner: ConstrainedDecoder | None = None,
           indices: list[int] | None = None) -> None:
    vocab_size = (owner.cache.vocab_size if owner is not None else None)
    if logits.device.type != "cpu":
        if owner is not None:
            dev = owner._device_mask
            if dev is None or dev.device != logits.device or dev.shape != bitmask.shape:
                dev = owner._device_mask = torch.empty(bitmask.shape, dtype=bitmask.dtype,
                                                       device=logits.device)
            dev.copy_(bitmask, non_blocking=True)
            bitmask = dev
        else:
            bitmask = bitmask.to(logits.device, non_blocking=True)
    try:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=indices)
    except ImportError:    # no triton on this CUDA install: xgrammar's pure-torch kernel
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=indices,
                                        backend="torch_native")


def mask_batch(decoders: Sequence[ConstrainedDecoder | None], logits: torch.Tensor,
               bitmask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mask a [B, vocab] logits tensor in place; decoders[i] constrains row i (None: leave it).

    All decoders must come from one GrammarCache. `bitmask` may be passed in to reuse an
    allocation (CPU int32 [>= B, ceil(vocab / 32)]); returns the bitmask used.
    """
    live = [(i, d) for i, d in enumerate(decoders) if d is not None]
    if not live:
        return bitmask
    cache = live[0][1].cache
    if bitmask is None:
        bitmask = xgr.allocate_token_bitmask(len(decoders), cache.vocab_size)
    for i, d in live:
        d.fill_bitmask(bitmask, i)
    indices = [i for i, _ in live]
    mask = bitmask if logits.device.type == "cpu" else bitmask.to(logits.device, non_blocking=True)
    try:
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=cache.vocab_size, indices=indices)
    except ImportError:
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=cache.vocab_size, indices=indices,
                                        backend="torch_native")
    if logits.shape[-1] > cache.vocab_size:
        logits[indices, cache.vocab_size:] = float("-inf")
    return bitmask


# -- UTF-8 helpers --------------------------------------------------------------------------

def _lead_need(b: int) -> int:
    return 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1


def _incomplete_tail(data: bytes | bytearray) -> int:
    """How many trailing bytes form an unfinished UTF-8 character (0 if none)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if not _is_lead(b):            # continuation byte: keep looking for the lead
            continue
        return back if _lead_need(b) > back else 0
    return 0


def _incomplete_need(data: bytes | bytearray) -> int:
    """How many continuation bytes the unfinished trailing character still needs."""
    tail = _incomplete_tail(data)
    return _lead_need(data[-tail]) - tail if tail else 0
