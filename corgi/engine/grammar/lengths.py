"""Length enforcement: per-token character costs, the budget masks, and the small lexer that
knows which bounded region (thinking text, a JSON string) the output is in.

Near a limit the decoder masks out every token that would write past it: per-token tables of
"characters before the closing delimiter" are compared with what is left. The thinking bound is
exact (also for tokens that run past "<think>"); a string bound is exact except that the token
which *opens* a string may put up to its own length into it before the mask can act, so it can
only be exceeded with tokens longer than the limit.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ...formats import THINK_OPEN
from .schemas import GrammarSpec

_QUOTE, _BACKSLASH, _LT = 0x22, 0x5C, 0x3C
THINK, STR, ESC = 0, 1, 2         # cost tables: thinking text, string, string after a backslash
OPENING_TABLE = -1                # -1 - k: "<think>" has k bytes left (tokens may run past it)
_THINK_OPEN = THINK_OPEN.encode()


# -- UTF-8 ------------------------------------------------------------------------------------

def is_lead(b: int) -> bool:
    return b & 0xC0 != 0x80


def _lead_need(b: int) -> int:
    return 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1


def incomplete_tail(data: bytes | bytearray) -> int:
    """How many trailing bytes form an unfinished UTF-8 character (0 if none)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if not is_lead(b):             # continuation byte: keep looking for the lead
            continue
        return back if _lead_need(b) > back else 0
    return 0


def incomplete_need(data: bytes | bytearray) -> int:
    """How many continuation bytes the unfinished trailing character still needs."""
    tail = incomplete_tail(data)
    return _lead_need(data[-tail]) - tail if tail else 0


# -- per-token costs --------------------------------------------------------------------------

def think_cost(piece: bytes) -> int:
    """Characters a token adds to the thinking text (those before its first '<')."""
    end = piece.find(b"<")
    return sum(1 for b in (piece if end < 0 else piece[:end]) if is_lead(b))


def opening_cost(piece: bytes, left: int) -> int:
    """Thinking characters a token adds when "<think>" still has `left` bytes to come (tokens
    that do not continue "<think>" get 0: the grammar refuses them anyway)."""
    if len(piece) <= left or not piece.startswith(_THINK_OPEN[-left:]):
        return 0
    return think_cost(piece[left:])


def string_cost(piece: bytes, escaped: bool) -> int:
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
        elif is_lead(b):
            cost += 1
    return cost


def pack(bits: torch.Tensor) -> torch.Tensor:
    """bool [32 * k] -> int32 [k], bit i of word j = bits[32 * j + i] (xgrammar's layout)."""
    packed = np.packbits(bits.numpy(), bitorder="little")       # byte j bit i = bits[8j + i]
    return torch.from_numpy(packed.view("<i4").astype(np.int32))


class LengthTables:
    """Per-token costs over one vocabulary, and bitmask rows "at most N characters" (cached).

    Thread-safe; shared by every decoder over the same vocabulary. `passes` counts the
    Python-level passes over the whole vocabulary: one, here (none when the tables came from the
    disk cache, tables_cache.py); rows are tensor comparisons, and
    an opening row looks only at the tokens whose first byte can continue "<think>".
    """

    def __init__(self, decoded_vocab: Sequence[bytes], words: int,
                 measured: Mapping[str, np.ndarray] | None = None):
        """`measured`: `LengthTables.measure(decoded_vocab)` kept from an earlier process (the
        grammar's disk cache); measured here when None."""
        self.decoded_vocab = decoded_vocab
        self.words = words
        self.passes = 0 if measured is not None else 1
        self.measured = measured = measured if measured is not None else self.measure(decoded_vocab)
        self._first_byte = torch.from_numpy(np.asarray(measured["first"], dtype=np.int16))
        pad = words * 32 - len(decoded_vocab)
        self._costs = [torch.from_numpy(np.pad(np.asarray(measured[name], dtype=np.int32), (0, pad)))
                       for name in ("think", "plain", "esc")]
        self._max_cost = [int(t.max()) for t in self._costs]
        self._rows: dict[tuple[int, int], torch.Tensor | None] = {}
        self._lock = threading.Lock()

    @staticmethod
    def measure(decoded_vocab: Sequence[bytes]) -> dict[str, np.ndarray]:
        """The per-token tables, one Python pass over the vocabulary (~2 s at 248k tokens)."""
        think, plain, esc, first = [], [], [], []
        for piece in decoded_vocab:
            think.append(think_cost(piece))
            plain.append(string_cost(piece, False))
            esc.append(string_cost(piece, True))
            first.append(piece[0] if piece else -1)
        return {"think": np.array(think, dtype=np.int32), "plain": np.array(plain, dtype=np.int32),
                "esc": np.array(esc, dtype=np.int32), "first": np.array(first, dtype=np.int16)}

    def cost(self, table: int, token_id: int) -> int:
        if table < 0:
            return opening_cost(self.decoded_vocab[token_id], OPENING_TABLE - table)
        return int(self._costs[table][token_id])

    def row(self, table: int, remaining: int) -> torch.Tensor | None:
        """Bitmask row of the tokens adding at most `remaining` characters (None: all of them)."""
        remaining = max(remaining, 0)
        key = (table, remaining)
        try:
            return self._rows[key]
        except KeyError:
            pass
        if table < 0:        # rare (the first token or two)
            left = OPENING_TABLE - table
            bits = torch.ones(self.words * 32, dtype=torch.bool)
            lead = _THINK_OPEN[-left]         # opening_cost is 0 unless the token starts with it
            for tid in torch.nonzero(self._first_byte == lead).flatten().tolist():
                piece = self.decoded_vocab[tid]
                if len(piece) > left and opening_cost(piece, left) > remaining:
                    bits[tid] = False
            row = pack(bits)
        elif remaining >= self._max_cost[table]:
            row = None
        else:
            row = pack(self._costs[table] <= remaining)
        with self._lock:
            return self._rows.setdefault(key, row)


# -- the lexer that follows the output for the length limits --------------------------------

# modes
_OPENING, _THINKING, _OUTSIDE, _IN_STRING = range(4)


@dataclass
class LexState:
    mode: int
    opening_left: int = 0      # bytes of "<think>" still to come
    count: int = 0             # characters in the current bounded region
    limit: int | None = None   # of the current region
    escaped: bool = False      # inside a string, right after a backslash
    last_sig: int = 0          # last non-space byte outside strings
    current: bytes = b""       # the open string's first bytes (to know keys)
    last_string: bytes = b""

    def copy(self) -> "LexState":
        return LexState(**self.__dict__)


class Lexer:
    """Just enough of the output's syntax to know which bounded region we are in."""

    def __init__(self, spec: GrammarSpec):
        self.think_chars = spec.think_chars
        self.string_chars = spec.string_chars
        self.key_chars: Mapping[bytes, int] = {k.encode(): v for k, v in spec.key_chars}
        if spec.think_chars is None:
            self.state = LexState(_OUTSIDE)
        else:
            self.state = LexState(_OPENING, opening_left=len(_THINK_OPEN), limit=spec.think_chars)

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
                elif is_lead(b):
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
                elif is_lead(b):
                    s.count += 1
                if len(s.current) < 32:
                    s.current += bytes([b])

    def bound(self) -> tuple[int, int] | None:
        """(cost table, characters left) when inside a bounded region, else None.
        While "<think>" is being written: (OPENING_TABLE, characters allowed after it)."""
        s = self.state
        if s.mode == _THINKING:
            return THINK, s.limit - s.count
        if s.mode == _OPENING:
            return OPENING_TABLE - s.opening_left, s.limit
        if s.mode == _IN_STRING:
            return (ESC if s.escaped else STR), s.limit - s.count
        return None
