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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch
from transformers import DynamicCache

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
            images: EncoderOutput | None = None) -> torch.Tensor:
    """Run input_ids [B, T] on top of `cache` (extended in place); logits [B, V] of the last position.

    Only the last position goes through lm_head: a 1500-token prefill would otherwise build a
    [1500, 151k] logits tensor nobody reads."""
    out = model.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                      attention_mask=attention_mask, use_cache=True,
                      mm_encoder_outputs={"image": images} if images is not None else None)
    hidden = out.last_hidden_state[:, -1]          # [B, hidden]
    return model.lm_head(hidden).float()           # [B, V]


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
    """What a row's constraint does each step (grammar.ConstrainedDecoder is one)."""
    def mask(self, logits: torch.Tensor) -> None: ...          # logits [1, V], in place
    def accept(self, token: int) -> bool: ...
    def is_finished(self) -> bool: ...


class MinLength:
    """Bans the stop tokens until `n` tokens were accepted (benchmarks force exact counts)."""

    def __init__(self, n: int, stop_ids: Sequence[int]):
        self.n, self.stop_ids, self.count = n, list(stop_ids), 0

    @torch.inference_mode()       # logits from the model are inference tensors
    def mask(self, logits: torch.Tensor) -> None:
        if self.count < self.n:
            logits[..., self.stop_ids] = float("-inf")

    def accept(self, token: int) -> bool:
        self.count += 1
        return True

    def is_finished(self) -> bool:
        return False


@dataclass
class Row:
    """One sequence being decoded: its constraints and whether it has stopped."""
    constraints: list[Constraint] = field(default_factory=list)
    done: bool = False


class Stepper(Protocol):
    """Feeds one token per row and returns the next logits; counts what it fed."""
    fed: int
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...  # [B] -> [B, V]


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

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0]
        positions = self.next_positions.view(1, -1, 1).expand(3, -1, 1)       # [3, B, 1]
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((rows, 1))], dim=1)
        try:
            logits = forward(self.model, tokens.view(-1, 1), positions, self.cache, attention_mask=self.mask)
        except BaseException:
            self.broken = True
            raise
        self.next_positions += 1
        self.fed += 1
        return logits


class StaticStepper:
    """A static bucket (engine/static_decode.py): compiled step, CUDA graph on GPUs."""

    def __init__(self, bucket):
        self.bucket, self.fed, self.broken = bucket, 0, False

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.bucket.step(tokens)
        self.fed += 1
        return logits


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
                overlap: bool = False) -> Iterator[tuple[int, int]]:
    """The decode loop. logits [B, V] after each row's prompt. Yields (row, token) for every
    row still running; a row stops at a stop token or when its constraints are finished; the
    loop ends when all rows stopped or after max_new_tokens steps.

    overlap (CUDA, static bucket): the next step is launched before the host reads this
    step's tokens, so the CPU work per token (grammar, detokenising, the caller) runs while
    the GPU computes. Closing the generator stops at once; `stepper.fed` says how many
    tokens per row reached the cache."""
    device = logits.device
    batch = len(rows)
    fetch = TokenFetch(batch, device)
    stop = set(stop_ids)
    done_t = None                                    # [B] bool on the device, once a row ends
    for i in range(max_new_tokens):
        last = i == max_new_tokens - 1
        for b, row in enumerate(rows):
            if not row.done:
                for constraint in row.constraints:
                    constraint.mask(logits[b:b + 1])
        tokens = sample(logits)                                              # [B]
        if done_t is not None:
            tokens = torch.where(done_t, torch.full_like(tokens, pad_id), tokens)
        fetch.start(tokens)
        if overlap and not last:
            logits = stepper.step(tokens)
        values = fetch.wait()
        ended = False
        for b, row in enumerate(rows):
            if row.done:
                continue
            token = values[b]
            finished = token in stop
            if not finished:
                for constraint in row.constraints:
                    if not constraint.accept(token):   # cannot happen after mask(); never silently
                        raise RuntimeError(f"a constraint refused token {token} that its own mask allowed")
                    finished = finished or constraint.is_finished()
            row.done = finished
            ended = ended or finished
            yield b, token
        if all(row.done for row in rows) or last:
            return
        if ended:
            done_t = torch.tensor([row.done for row in rows], device=device)
        if not overlap:
            logits = stepper.step(tokens)
