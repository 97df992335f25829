"""The constrained decoder: xgrammar matchers plus the length masks, per sequence; compiled
grammars and the per-tokenizer tables they need, shared.

Sharing. What depends only on the tokenizer (xgrammar's TokenizerInfo, the decoded vocabulary,
the special-token mask, the length tables: ~2-3.5 s at Qwen's 151k/248k vocabularies) is built
once per tokenizer object, kept on disk for the next process (tables_cache.py), and reused by
every `GrammarCache` over it (a weak-keyed registry: it goes away with the tokenizer). `GrammarCache.for_tokenizer()` also shares the compiled
grammars, so every engine over one tokenizer compiles each schema once. A tokenizer that gets
new tokens after that (len() changes) gets fresh tables.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Sequence

import torch
import xgrammar as xgr

from ...boxes import BoxConvention
from ...formats import KIND_REASONING, THINK_CLOSE
from .lengths import LengthTables, Lexer, LexState, incomplete_need, incomplete_tail, pack
from . import tables_cache
from .schemas import GrammarSpec, reasoning_spec, synthesis_spec

COMPILE_THREADS = 2
# Jump-forward: tokens of a forced text left to normal steps, and the continuations tried after it.
JUMP_HOLD = 1
JUMP_PROBES = ("a", "A", "0", " ", " a", '"', "'", ",", ".", "(", "[", "{", "}", "]", ":", "\n", "é", "_", "-")


def _token_id(tokenizer, text: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    return tid if isinstance(tid, int) and tid >= 0 and tid != unk else None


def default_stop_token_ids(tokenizer) -> list[int]:
    """<|im_end|> and <|endoftext|> where the tokenizer has them, else its eos token."""
    ids = [t for t in (_token_id(tokenizer, "<|im_end|>"), _token_id(tokenizer, "<|endoftext|>"))
           if t is not None]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


def _special_ids(tokenizer, vocab_size: int) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return {i for i in ids if 0 <= i < vocab_size}


class Vocabulary:
    """What the grammar needs from one tokenizer, without a reference to it (so it can be
    shared in a weak-keyed registry): TokenizerInfo, decoded vocabulary, stop and banned ids,
    the allowed-ids row and the length tables. Immutable after construction but for caches."""

    def __init__(self, tokenizer, vocab_size: int | None, stop_token_ids: Sequence[int]):
        self.stop_token_ids = list(stop_token_ids)
        key = tables_cache.cache_key(tokenizer, vocab_size, self.stop_token_ids)
        cached = tables_cache.load(key) if key else None
        if cached is not None:
            self.tokenizer_info, self.decoded_vocab, measured = cached
        else:
            self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids or None)
            self.decoded_vocab: list[bytes] = self.tokenizer_info.decoded_vocab
            measured = None
        self.vocab_size = self.tokenizer_info.vocab_size
        self.banned_ids = frozenset(_special_ids(tokenizer, self.vocab_size) - set(self.stop_token_ids))
        self.words = (self.vocab_size + 31) // 32
        allow = torch.ones(self.words * 32, dtype=torch.bool)
        allow[self.vocab_size:] = False
        if self.banned_ids:
            allow[torch.tensor(sorted(self.banned_ids), dtype=torch.long)] = False
        self.allow_row = pack(allow)                        # int32 [words]
        self.lengths = LengthTables(self.decoded_vocab, self.words, measured)
        if key and cached is None:
            tables_cache.store(key, self.tokenizer_info, self.decoded_vocab, self.lengths.measured)
        self._byte_token: dict[int, int] | None = None
        self._chunks: dict[str, list[int]] = {}       # forced text -> its jump-forward tokens

    def chunk(self, tokenizer, text: str, hold: int = JUMP_HOLD) -> list[int]:
        """The tokens of forced `text` that are safe to append without model steps (jump-forward).

        Canonical: the tokenizer's own tokens of the text. Safe: the chunk ends where the
        tokenisation of `text` followed by anything stops changing, so a token the model would
        have written across the end is never split. Found as the tokens that the text alone and
        the text followed by each of `JUMP_PROBES` (letters, digits, space, quotes, brackets, a
        newline, a non-ASCII letter) share at the start, less the last `hold` tokens of the
        text, which are left to normal (masked) steps. Cached per text."""
        key = f"{hold}\0{text}"
        found = self._chunks.get(key)
        if found is None:
            encode = lambda t: tokenizer.encode(t, add_special_tokens=False)   # noqa: E731
            base = encode(text)
            common = len(base) - hold
            for probe in JUMP_PROBES:
                ids = encode(text + probe)
                same = 0
                while same < min(common, len(ids)) and ids[same] == base[same]:
                    same += 1
                common = same
            found = base[:max(common, 0)]
            if len(self._chunks) < 4096:
                self._chunks[key] = found
        return found

    def byte_token(self, byte: int) -> int:
        """A token whose text is exactly this one byte (byte-level vocabularies have all 256)."""
        found = self._byte_token
        if found is None:
            found = {}
            for tid, piece in enumerate(self.decoded_vocab):
                if len(piece) == 1 and piece[0] not in found and tid not in self.banned_ids:
                    found[piece[0]] = tid
            self._byte_token = found
        try:
            return found[byte]
        except KeyError:
            raise ValueError(f"the vocabulary has no single-byte token for {byte:#04x}") from None


class _PerTokenizer:
    """Registry entry of one tokenizer: its vocabularies and shared caches, each built once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.vocabularies: dict[tuple, Vocabulary] = {}
        self.caches: dict[tuple, GrammarCache] = {}


_registry: "weakref.WeakKeyDictionary[object, _PerTokenizer]" = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _entry(tokenizer) -> _PerTokenizer:
    with _registry_lock:
        try:
            entry = _registry.get(tokenizer)
            if entry is None:
                entry = _registry[tokenizer] = _PerTokenizer()
        except TypeError:          # not hashable or not weak-referenceable: nothing is shared
            entry = _PerTokenizer()
        return entry


def vocabulary(tokenizer, vocab_size: int | None = None,
               stop_token_ids: Sequence[int] | None = None) -> Vocabulary:
    """The shared Vocabulary of this tokenizer object (built on first use; thread-safe)."""
    if stop_token_ids is None:
        stop_token_ids = default_stop_token_ids(tokenizer)
    key = (vocab_size, tuple(stop_token_ids), len(tokenizer))
    entry = _entry(tokenizer)
    with entry.lock:       # one build per tokenizer at a time; other tokenizers are not held up
        vocab = entry.vocabularies.get(key)
        if vocab is None:
            vocab = entry.vocabularies[key] = Vocabulary(tokenizer, vocab_size, stop_token_ids)
        return vocab


class GrammarCache:
    """An xgrammar compiler over a tokenizer's shared `Vocabulary`, and compiled grammars by
    source (LRU, `max_entries`).

    `vocab_size` is the model's vocabulary (lm_head rows); it may exceed len(tokenizer), the
    extra ids are never allowed. Building one over a tokenizer that already has a Vocabulary
    costs milliseconds; `for_tokenizer()` returns one shared cache per tokenizer (the engine's
    way). Thread-safe; compiles are serialised.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None, *,
                 stop_token_ids: Sequence[int] | None = None, max_entries: int = 16,
                 max_threads: int = COMPILE_THREADS):
        self._tokenizer: object = tokenizer
        self.vocab = vocabulary(tokenizer, vocab_size, stop_token_ids)
        self.stop_token_ids = self.vocab.stop_token_ids
        self.tokenizer_info = self.vocab.tokenizer_info
        self.vocab_size = self.vocab.vocab_size
        self.decoded_vocab = self.vocab.decoded_vocab
        self.banned_ids = self.vocab.banned_ids
        self.words = self.vocab.words
        self.allow_row = self.vocab.allow_row
        # xgrammar's own cache is off: ours is the one place compiled grammars live.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads,
                                            cache_enabled=False)
        self.max_entries = max_entries
        self._compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> "GrammarCache":
        """The one shared cache for this tokenizer object and vocab_size (compiled grammars
        included); it holds the tokenizer weakly, so it goes away with it."""
        entry = _entry(tokenizer)
        key = (vocab_size, len(tokenizer))
        with entry.lock:
            cache = entry.caches.get(key)
        if cache is None:
            built = cls(tokenizer, vocab_size)           # takes entry.lock itself (vocabulary)
            built._tokenizer = weakref.ref(tokenizer)    # the registry must not keep it alive
            with entry.lock:
                cache = entry.caches.setdefault(key, built)
        return cache

    @property
    def tokenizer(self):
        tok = self._tokenizer
        if isinstance(tok, weakref.ref):
            tok = tok()
            if tok is None:
                raise RuntimeError("the tokenizer of this shared GrammarCache no longer exists")
        return tok

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
                          max_thinking_chars: int, images=()) -> "ConstrainedDecoder":
        return self.decoder(reasoning_spec(max_steps, convention, max_thinking_chars, images))

    def synthesis_decoder(self, convention: BoxConvention, images=()) -> "ConstrainedDecoder":
        return self.decoder(synthesis_spec(convention, images))

    # length tables (see lengths.py)
    def cost(self, table: int, token_id: int) -> int:
        return self.vocab.lengths.cost(table, token_id)

    def length_row(self, table: int, remaining: int) -> torch.Tensor | None:
        """Bitmask row of the tokens adding at most `remaining` characters (None: all of them)."""
        return self.vocab.lengths.row(table, remaining)

    def byte_token(self, byte: int) -> int:
        return self.vocab.byte_token(byte)


# -- per-sequence decoder -------------------------------------------------------------------

# Tried in this order when closing a structure; each is checked against the grammar.
_CLOSERS = (THINK_CLOSE + "\n", "\"", "]", "}", KIND_REASONING, ", ", "null", *"0123456789")   # digits: box numbers, image numbers
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
        self._lexer = Lexer(spec)
        self._history: list[LexState] = []
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

    def forced(self) -> list[int]:
        """Tokens to append without model steps: the canonical, safe start of the text the
        grammar allows as the only continuation (`Vocabulary.chunk`), checked against this
        sequence's limits; not accepted here. Empty when nothing is forced, at the end, or
        inside a split UTF-8 character."""
        if self.matcher.is_terminated() or incomplete_need(self._bytes):
            return []
        text = self.matcher.find_jump_forward_string()
        if not text:
            return []
        ids = self.cache.vocab.chunk(self.cache.tokenizer, text)
        # Every forced token must pass this sequence's checks (banned ids, length limits).
        probe, taken = self.matcher.fork(), []
        for tid in ids:
            if tid in self.cache.banned_ids or not probe.accept_token(tid):
                break
            taken.append(tid)
        return taken

    @property
    def num_tokens(self) -> int:
        return len(self._lengths)

    def text(self) -> str:
        """The accepted text, without a trailing incomplete UTF-8 character (see completion_text)."""
        return bytes(self._bytes[:len(self._bytes) - incomplete_tail(self._bytes)]).decode("utf-8")

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
        for _ in range(incomplete_need(self._bytes)):
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
        tail = incomplete_tail(self._bytes)
        partial = bytes(self._bytes[len(self._bytes) - tail:]) if tail else b""
        return (partial + self.completion_bytes()).decode("utf-8")

    def closed_text(self) -> str:
        """The complete output: the accepted text closed by `completion_text()`."""
        return self.text() + self.completion_text()

    def completion_token_ids(self) -> list[int]:
        """Token ids whose bytes are exactly `completion_bytes()` (to append to the sequence)."""
        data = self.completion_bytes()
        need = incomplete_need(self._bytes)
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


def _apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int | None,
                   indices: list[int] | None) -> None:
    try:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=indices)
    except ImportError:    # no triton on this CUDA install: xgrammar's pure-torch kernel
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=indices,
                                        backend="torch_native")


def _apply(logits: torch.Tensor, bitmask: torch.Tensor, owner: ConstrainedDecoder) -> None:
    if logits.device.type != "cpu":
        dev = owner._device_mask
        if dev is None or dev.device != logits.device or dev.shape != bitmask.shape:
            dev = owner._device_mask = torch.empty(bitmask.shape, dtype=bitmask.dtype,
                                                   device=logits.device)
        dev.copy_(bitmask, non_blocking=True)
        bitmask = dev
    _apply_bitmask(logits, bitmask, owner.cache.vocab_size, None)


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
    _apply_bitmask(logits, mask, cache.vocab_size, indices)
    if logits.shape[-1] > cache.vocab_size:
        logits[indices, cache.vocab_size:] = float("-inf")
    return bitmask
