"""The model step, sampling and the one decode loop, gpt-fast style: plain functions over tensors.

Shapes: B = batch rows, T = new tokens this step, S = all tokens attended (cache + new),
V = vocabulary. Positions are M-RoPE: three rows (temporal, height, width); text tokens
after the image use the same value on all three rows, `index + rope_delta`.

    logits = forward(model, ids, positions, cache)             # prefill: [B, V] of the last position
    for row, token in decode_rows(logits, rows, stepper, n):   # one loop for 1 row or N rows
        ...

`decode_rows` is the only decode loop: phases 1+2 and 4 run it with one row (the
conversation), phase 3 with one row per region crop. Each row carries its own constraints
(grammar, minimum length) and stop state; the stepper is either the eager HF step over a
DynamicCache or a static compiled bucket (engine/static_decode.py).

Fewer model steps than tokens, in the same loop (greedy output is unchanged by the second):
  - jump-forward: where a row's grammar allows exactly one continuation, its tokens
    (`Constraint.forced()`, canonically tokenised, the last ones held back) go in with the
    sampled token as one multi-token forward, `stepper.extend(ids [B, 1+m])`;
  - prompt lookup: a row's `PromptLookup` drafts the k tokens that followed the latest earlier
    occurrence of its last n-gram; [token, d1..dk] is one forward, draft j is kept while it is
    the masked argmax of the logits before it, and `stepper.keep()` cuts the rest off.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch
from transformers import DynamicCache

from . import state
from .vision import EncoderOutput


def text_positions(start: int, stop: int, delta: int | torch.Tensor, batch: int,
                   device: torch.device) -> torch.Tensor:
    """[3, B, stop-start] positions of text tokens at sequence indices start..stop-1.

    `delta` is the conversation's own rope delta (scalar, or [B, 1] for a batch); it is passed
    in explicitly so the model's shared `rope_deltas` attribute is never consulted."""
    pos = torch.arange(start, stop, device=device).view(1, 1, -1).expand(3, batch, -1)
    if isinstance(delta, torch.Tensor):
        delta = delta.to(device).view(1, -1, 1)
    return pos + delta


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
            attention_mask: torch.Tensor | None = None,
            images: EncoderOutput | None = None, every_position: bool = False) -> torch.Tensor:
    """Run input_ids [B, T] on top of `cache` (extended in place); logits [B, V] of the last position
    ([B, T, V] of every position with every_position: a multi-token decode forward).

    Only the last position goes through lm_head: a 1500-token prefill would otherwise build a
    [1500, 151k] logits tensor nobody reads."""
    return forward_hidden(model, input_ids, position_ids, cache, attention_mask, images, every_position)[0]


@torch.inference_mode()
def forward_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
                   attention_mask: torch.Tensor | None = None, images: EncoderOutput | None = None,
                   every_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward`, and the final-norm hidden states of every position, [B, T, H] (what lm_head
    reads; an MTP head's input)."""
    out = model.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                      attention_mask=attention_mask, use_cache=True,
                      mm_encoder_outputs={"image": images} if images is not None else None)
    hidden = out.last_hidden_state                                      # [B, T, H]
    return model.lm_head(hidden if every_position else hidden[:, -1]).float(), hidden   # [B, (T,) V]


class Sampler:
    """logits [B, V] (masked entries are -inf) -> token ids [B], on the logits' device.

    temperature 0 is greedy. Otherwise the exponential-race form of multinomial sampling
    (argmax of p / Exp(1) noise, as in gpt-fast): the draw stays on the device, so sampling
    never waits for the GPU, and a seeded device generator makes it reproducible."""

    def __init__(self, temperature: float, top_p: float, seed: int, device: torch.device):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.temperature, dim=-1)              # [B, V]
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < self.top_p        # always keeps the top token
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
        noise = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return (probs / noise).argmax(dim=-1)


class Constraint(Protocol):
    """What a row's constraint does each step (grammar.ConstrainedDecoder is one). It may also
    have `forced() -> list[int]`: tokens it allows as the only continuation (jump-forward)."""
    def mask(self, logits: torch.Tensor) -> None: ...          # logits [1, V], in place
    def accept(self, token: int) -> bool: ...
    def is_finished(self) -> bool: ...


class MinLength:
    """Bans the stop tokens until `n` tokens were accepted (benchmarks force exact counts)."""

    def __init__(self, n: int | float, stop_ids: Sequence[int]):
        self.n, self.stop_ids, self.count = n, list(stop_ids), 0
        self._index: torch.Tensor | None = None        # stop_ids on the logits' device

    @torch.inference_mode()       # logits from the model are inference tensors
    def mask(self, logits: torch.Tensor) -> None:
        if self.count < self.n:
            # The ids go to the device once: a Python list as an index is copied there on every
            # call, a blocking copy that waits for the queued step (CUDA), so the overlapped
            # decode loop lost its overlap on every token (0.25-0.3 ms/token at Qwen3.5 shapes).
            if self._index is None or self._index.device != logits.device:
                self._index = torch.tensor(self.stop_ids, dtype=torch.long, device=logits.device)
            logits.index_fill_(-1, self._index, float("-inf"))

    def accept(self, token: int) -> bool:
        self.count += 1
        return True

    def is_finished(self) -> bool:
        return False


DRAFT_TOKENS = 4        # prompt-lookup drafts verified per forward


class PromptLookup:
    """Draft tokens from the row's own context (prompt-lookup decoding, no draft model): the k
    tokens that followed the latest earlier occurrence of the context's last n tokens, for the
    longest n in `ngrams` that occurred before. One dict per n maps an n-gram to the index just
    after its latest occurrence, so `push` and `draft` cost O(n), not a scan of the context."""

    def __init__(self, context: Sequence[int], k: int = 4, ngrams: Sequence[int] = (3, 2)):
        self.k, self.ngrams = k, tuple(sorted(ngrams, reverse=True))
        self.ids: list[int] = []
        self.index: dict[int, dict[tuple, int]] = {n: {} for n in self.ngrams}
        self.found: dict[int, int | None] = {n: None for n in self.ngrams}
        for token in context:
            self.push(token)

    def push(self, token: int) -> None:
        self.ids.append(token)
        end = len(self.ids)
        for n in self.ngrams:
            if end >= n:
                key = tuple(self.ids[end - n:])
                self.found[n] = self.index[n].get(key)     # an earlier occurrence, before this one
                self.index[n][key] = end

    def draft(self, limit: int) -> list[int]:
        """Up to min(k, limit) tokens to verify (empty: no n-gram seen before)."""
        for n in self.ngrams:
            start = self.found[n]
            if start is not None:
                return self.ids[start:start + min(self.k, limit)]
        return []


@dataclass
class Tally:
    """What the decode loop did: model forwards (one step or one multi-token forward each,
    over all rows), tokens yielded (all rows), of which forced by the grammar (jump-forward)
    or drafts accepted; drafts proposed."""
    model_steps: int = 0
    output_tokens: int = 0
    forced_tokens: int = 0
    drafted_tokens: int = 0
    accepted_drafts: int = 0


@dataclass
class Row:
    """One sequence being decoded: its constraints and whether it has stopped. jump_forward:
    take the grammar's forced tokens without model steps; lookup: the row's draft source, verified
    in one forward (greedy only): a PromptLookup, or an mtp.MtpDraft (which also observes the
    hidden states of the positions kept)."""
    constraints: list[Constraint] = field(default_factory=list)
    done: bool = False
    jump_forward: bool = False
    lookup: PromptLookup | None = None        # or mtp.MtpDraft
    count: int = 0                 # tokens yielded


class Stepper(Protocol):
    """Feeds one token per row and returns the next logits; counts what it fed.

    extend(ids [B, T]) feeds T tokens per row in one forward: logits [B, T, V] of every position
    (`spare`: columns a static bucket must leave free after it, for the steps still to come;
    `lengths[b]`: the most row b may keep, the rest being padding; `rewind`: keep() may keep
    fewer, as a draft verify does, so a hybrid stack sets its linear states aside first).
    keep(kept) then keeps the first kept[b] of them in row b (the rest are cut off or masked out);
    `rewindable`: whether keep() can keep fewer than lengths, for an extend() of at most
    `rewind_width` tokens; `last_forwards`: the model forwards the latest extend() + keep() took
    (1, or 2 where the kept tokens had to be fed again); `hidden`: the final-norm hidden states
    of the latest step() [B, H] or extend() [B, T, H] (an MTP draft reads them)."""
    fed: int
    rewindable: bool
    rewind_width: int
    last_forwards: int
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...  # [B] -> [B, V]
    def extend(self, ids: torch.Tensor, spare: int = 0, lengths: list[int] | None = None,
               rewind: bool = False) -> torch.Tensor: ...   # [B, T] -> [B, T, V]
    def keep(self, kept: list[int]) -> None: ...


class EagerStepper:
    """The HF text model over a DynamicCache, one new token per row.

    next_positions [B]: rope position of each row's next token. attention_mask [B, S] or None
    (None: every cached column is attended, the single-conversation case)."""

    def __init__(self, model, cache: DynamicCache, next_positions: torch.Tensor,
                 attention_mask: torch.Tensor | None = None):
        self.model, self.cache, self.mask = model, cache, attention_mask
        self.next_positions = next_positions.clone()
        self.fed = 0
        self.broken = False      # a forward failed part-way: the cache matches no prefix
        self.hybrid = any(state.is_linear(layer) for layer in cache.layers)
        # Hybrid rows cannot cut linear state back: one row goes back to a snapshot and feeds
        # the kept tokens again; a batch of hybrid rows verifies no drafts.
        self.rewindable = not self.hybrid or next_positions.shape[0] == 1
        self.rewind_width = 1 << 30 if self.rewindable else 0
        self._pending = None     # (ids [B, T], columns before, snapshot) of the last extend()
        self.last_forwards = 1   # model forwards of the latest extend() and keep()
        self.hidden: torch.Tensor | None = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        positions = self.next_positions.view(1, -1, 1).expand(3, -1, 1)       # [3, B, 1]
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((rows, 1))], dim=1)
        try:
            logits, hidden = forward_hidden(self.model, tokens.view(-1, 1), positions, self.cache,
                                            attention_mask=self.mask)
            self.hidden = hidden[:, -1]                                # [B, H]
        except BaseException:
            self.broken = True
            raise
        self.next_positions += 1
        self.fed += 1
        return logits

    def extend(self, ids: torch.Tensor, spare: int = 0, lengths: list[int] | None = None,
               rewind: bool = False) -> torch.Tensor:
        rows, width = ids.shape
        if rewind and not self.rewindable:
            raise ValueError("a batch of hybrid rows cannot keep fewer tokens than it fed")
        offsets = torch.arange(width, device=ids.device)
        positions = (self.next_positions.view(-1, 1) + offsets).unsqueeze(0).expand(3, -1, -1)   # [3, B, T]
        columns = self._columns()
        snapshot = state.take_snapshot(self.cache, columns) if self.hybrid and rewind else None
        mask = self.mask
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((rows, width))], dim=1)
        try:
            logits, self.hidden = forward_hidden(self.model, ids, positions, self.cache, attention_mask=mask,
                                                 every_position=True)
        except BaseException:
            self.broken = True
            raise
        self.mask = mask
        self._pending = (ids, columns, snapshot)
        self.last_forwards = 1
        return logits                                                          # [B, T, V]

    def keep(self, kept: list[int]) -> None:
        ids, columns, snapshot = self._pending
        self._pending = None
        rows, width = ids.shape
        if rows == 1:
            n = kept[0]
            if n < width:
                if self.hybrid and snapshot is None:
                    raise ValueError("keep() of fewer tokens after an extend() made without rewind=True")
                if snapshot is not None:      # hybrid: back to the state before, feed the kept tokens again
                    state.restore(self.cache, snapshot)
                    self.last_forwards += 1
                    positions = (self.next_positions + torch.arange(n, device=ids.device)).view(1, 1, -1).expand(3, 1, -1)
                    try:
                        forward(self.model, ids[:, :n], positions, self.cache)
                    except BaseException:
                        self.broken = True
                        raise
                else:
                    state.cut_attention(self.cache, columns + n)
                if self.mask is not None:
                    self.mask = self.mask[:, :columns + n]
            self.next_positions += n
            self.fed += n
            return
        # Several rows share the cache's columns: the ones a row did not keep are masked out.
        if self.mask is None:
            self.mask = torch.ones((rows, columns + width), dtype=torch.long, device=ids.device)
        for b, n in enumerate(kept):
            self.mask[b, columns + n:columns + width] = 0
        self.next_positions += torch.tensor(kept, device=self.next_positions.device)
        self.fed += width

    def _columns(self) -> int:
        for layer in self.cache.layers:
            if not state.is_linear(layer) and getattr(layer, "is_initialized", False):
                return layer.get_seq_length()
        return 0


class StaticStepper:
    """A static bucket (engine/static_decode.py): compiled step, CUDA graph on GPUs."""

    def __init__(self, bucket):
        self.bucket, self.fed, self.broken = bucket, 0, False
        self.rewindable, self.rewind_width = bucket.rewindable, bucket.rewind_width
        self.last_forwards = 1      # model forwards of the latest extend() (and keep())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.bucket.step(tokens)
        self.fed += 1
        return logits

    @property
    def hidden(self) -> torch.Tensor:
        return self.bucket.hidden

    def room(self) -> int:
        """Columns left in the bucket (a multi-token forward must fit)."""
        return self.bucket.room()

    def extend(self, ids: torch.Tensor, spare: int = 0, lengths: list[int] | None = None,
               rewind: bool = False) -> torch.Tensor:
        logits = self.bucket.extend(ids, spare, lengths, rewind)
        self.last_forwards = self.bucket.last_forwards
        return logits

    def keep(self, kept: list[int]) -> None:
        self.bucket.keep(kept)
        self.fed += kept[0] if len(kept) == 1 else self.bucket.last_width


class TokenFetch:
    """Sampled ids -> host, waiting only for the sampling, not for work queued after it."""

    def __init__(self, n: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.empty(n, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def start(self, tokens: torch.Tensor) -> None:
        self.host[:tokens.shape[0]].copy_(tokens, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()

    def wait(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
        return self.host.tolist()


def decode_rows(logits: torch.Tensor, rows: list[Row], stepper: Stepper, max_new_tokens: int,
                sample: Sampler, stop_ids: Sequence[int], pad_id: int,
                overlap: bool = False, tally: Tally | None = None) -> Iterator[tuple[int, int]]:
    """The decode loop. logits [B, V] after each row's prompt. Yields (row, token) for every
    row still running; a row stops at a stop token, when its constraints are finished, or after
    max_new_tokens tokens; the loop ends when all rows stopped.

    Each iteration samples one token per row; then, where a row has more to add, the next model
    call feeds [token, more...] as one multi-token forward instead of a one-token step: the
    grammar's forced tokens (Row.jump_forward) or prompt-lookup drafts (Row.lookup; kept while
    each is the masked argmax before it, so greedy output is what one-token steps give).

    overlap (CUDA, static bucket, rows without jump-forward or lookup): the next step is launched
    before the host reads this step's tokens, so the CPU work per token (grammar, detokenising,
    the caller) runs while the GPU computes. Without it (jump-forward needs the token before it
    knows what to feed), the next step or forced chunk is still queued before this token is
    yielded, so the caller's work overlaps it; only drafts wait for their verify forward.
    Closing the generator stops at once; `stepper.fed` says how many tokens per row reached the
    cache, which can be more than were yielded (a forced chunk queued with its token): the
    caller cuts the cache back to what it took."""
    device = logits.device
    batch = len(rows)
    tally = tally if tally is not None else Tally()
    fetch = TokenFetch(batch, device)
    stop = set(stop_ids)
    greedy = sample.temperature <= 0
    overlap = overlap and not any(row.jump_forward or row.lookup for row in rows)
    done_t = None                                    # [B] bool on the device, once a row ends
    while True:
        for b, row in enumerate(rows):
            if not row.done:
                for constraint in row.constraints:
                    constraint.mask(logits[b:b + 1])
        tokens = sample(logits)                                              # [B]
        if done_t is not None:
            tokens = torch.where(done_t, torch.full_like(tokens, pad_id), tokens)
        fetch.start(tokens)
        last = all(row.done or row.count + 1 >= max_new_tokens for row in rows)
        if overlap and not last:
            logits = stepper.step(tokens)
            tally.model_steps += 1
        values = fetch.wait()
        taken: list[tuple[int, int]] = []            # this iteration's (row, token), yielded below
        for b, row in enumerate(rows):
            if row.done:
                continue
            token = values[b]
            finished = token in stop or not _take(row, token, stop)
            row.count += 1          # forced tokens and drafts never reach past the budget
            row.done = finished or row.count >= max_new_tokens
            tally.output_tokens += 1
            taken.append((b, token))
        ended = any(rows[b].done for b, _ in taken)
        if overlap or all(row.done for row in rows):
            yield from taken
            if all(row.done for row in rows):
                return
            if ended:
                done_t = torch.tensor([row.done for row in rows], device=device)
            continue
        if ended:
            done_t = torch.tensor([row.done for row in rows], device=device)
        # What each live row adds after its token: forced tokens (already accepted) or drafts,
        # as many as fit the row's budget and the stepper's columns.
        columns, spare = max_new_tokens, 0
        if hasattr(stepper, "room"):
            # A static bucket: the chunk must fit, and with several rows the columns a row does
            # not keep stay used, so the one-token steps still to come must fit after it.
            need = max((max_new_tokens - row.count for row in rows if not row.done), default=0)
            spare = 0 if batch == 1 else max(need - 1, 0)
            columns = stepper.room() - (1 if batch == 1 else need)
        forced: list[list[int]] = [[] for _ in rows]
        drafts: list[list[int]] = [[] for _ in rows]
        for b, row in enumerate(rows):
            limit = min(max_new_tokens - row.count, columns)
            if row.done or limit <= 0:
                continue
            if row.jump_forward:
                forced[b] = _accept_forced(row, limit, stop)
            if not forced[b] and row.lookup is not None and greedy and stepper.rewindable:
                drafts[b] = row.lookup.draft(min(limit, stepper.rewind_width - 1))
                cut = next((i for i, t in enumerate(drafts[b]) if t in stop), None)
                if cut is not None:
                    drafts[b] = drafts[b][:cut]
        width = 1 + max(len(f) + len(d) for f, d in zip(forced, drafts))
        if any(drafts) and width > stepper.rewind_width:
            # Another row's forced chunk is wider than a verify can be cut back: no drafts now.
            drafts = [[] for _ in rows]
            width = 1 + max(len(f) for f in forced)
        if width == 1:
            logits = stepper.step(tokens)            # queued; the caller's work below overlaps it
            tally.model_steps += 1
            _observe(rows, stepper, [1] * batch)
            yield from taken
            continue
        verify = any(drafts)
        if verify:
            # Drafts are kept or cut after their forward: the tokens go out first, so a caller
            # that stops here leaves no forward pending in the stepper.
            yield from taken
        ids = torch.full((batch, width), pad_id, dtype=torch.long)             # [B, T]
        for b in range(batch):
            extra = forced[b] + drafts[b]
            ids[b, 0] = values[b]
            if extra:
                ids[b, 1:1 + len(extra)] = torch.tensor(extra, dtype=torch.long)
        # What each row can keep at most: its token and forced tokens (and drafts, if any).
        lengths = [1 + len(f) + len(d) for f, d in zip(forced, drafts)]
        every = stepper.extend(ids.to(device), spare, lengths, rewind=verify)   # [B, T, V]
        # Decide every row first, cut the stepper back, then yield (a generator closed while
        # yielding must leave the stepper's count true).
        out: list[list[int]] = [[] for _ in rows]
        kept, nxt = [], []
        for b, row in enumerate(rows):
            if forced[b]:
                out[b] = forced[b]
                tally.forced_tokens += len(forced[b])
            elif drafts[b]:
                tally.drafted_tokens += len(drafts[b])
                for j, token in enumerate(drafts[b]):
                    here = every[b, j:j + 1].clone()                         # [1, V] before draft j
                    for constraint in row.constraints:
                        constraint.mask(here)
                    if int(sample(here)[0]) != token:
                        break
                    out[b].append(token)
                    if not _take(row, token, stop):
                        break
                tally.accepted_drafts += len(out[b])
            kept.append(1 + len(out[b]))
            nxt.append(every[b, len(out[b])])
        stepper.keep(kept)
        tally.model_steps += stepper.last_forwards
        _observe(rows, stepper, kept)
        logits = torch.stack(nxt)                                            # [B, V]
        if not verify:
            yield from taken        # a forced chunk is queued: the caller's work overlaps it
        for b, row in enumerate(rows):
            for token in out[b]:
                row.count += 1
                tally.output_tokens += 1
                row.done = row.count >= max_new_tokens or _finished(row)
                yield b, token
        if all(row.done for row in rows):
            return
        if any(row.done for row in rows):
            done_t = torch.tensor([row.done for row in rows], device=device)


def _observe(rows: list[Row], stepper: Stepper, kept: list[int]) -> None:
    """Hand a draft source that reads hidden states (mtp.MtpDraft) those of the positions its
    row kept in the latest forward."""
    for b, row in enumerate(rows):
        observe = getattr(row.lookup, "observe", None)
        if observe is not None and not row.done:
            hidden = stepper.hidden                                 # [B, H] or [B, T, H]
            observe(hidden[b:b + 1] if hidden.dim() == 2 else hidden[b, :kept[b]])


def _take(row: Row, token: int, stop: set) -> bool:
    """Accept a sampled token into the row's constraints and lookup; False: the row is finished."""
    for constraint in row.constraints:
        if not constraint.accept(token):   # cannot happen after mask(); never silently
            raise RuntimeError(f"a constraint refused token {token} that its own mask allowed")
    if row.lookup is not None:
        row.lookup.push(token)
    return not _finished(row)


def _finished(row: Row) -> bool:
    return any(constraint.is_finished() for constraint in row.constraints)


def _accept_forced(row: Row, room: int, stop: set) -> list[int]:
    """The row's forced continuation (at most `room` tokens), accepted into every constraint."""
    if not row.constraints or _finished(row):
        return []
    source = row.constraints[0]
    forced = getattr(source, "forced", None)
    ids = forced()[:room] if forced is not None else []
    taken = []
    for token in ids:
        if token in stop or not source.accept(token):    # a limit the grammar does not know: stop here
            break
        if not all(constraint.accept(token) for constraint in row.constraints[1:]):
            raise RuntimeError(f"a constraint refused forced token {token}")
        taken.append(token)
        if row.lookup is not None:
            row.lookup.push(token)
        if _finished(row):
            break
    return taken
