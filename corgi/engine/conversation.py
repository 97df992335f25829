"""A conversation's state: its images, every token so far, and the K/V of a prefix of them.

Images: the first is in the conversation head; more can join later (`Engine.add_images`), each
as its own block of vision_start, image pads, vision_end appended to the token list.

The token list is the source of truth; the KV cache is only an acceleration that can be
dropped at any time (memory budget, cache disabled) and rebuilt from the tokens, giving
the same result. The rope delta lives here, not on the model object, so conversations on
different images can be interleaved turn by turn without mixing positions.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from PIL import Image
from transformers import DynamicCache

from . import state

_ids = itertools.count(1)
# Hybrid models: linear-attention snapshots kept per conversation (each ~18-48 MiB for the
# real 0.8B-9B shapes). The pipeline takes one at every prefill (turn and phase starts), so
# three cover the current turn's start and its phases; older boundaries rebuild from tokens.
MAX_SNAPSHOTS = 3


@dataclass(eq=False)   # identity semantics: conversations live in a WeakSet
class Conversation:
    image: Image.Image
    min_pixels: int
    max_pixels: int
    grid_thw: tuple[int, int, int]     # the image's patch grid (t, h, w)
    resized: tuple[int, int]           # (width, height) of the model's input image
    rope_delta: int                    # text position = sequence index + rope_delta
    head_len: int                      # tokens of system + image message
    token_ids: list[int] = field(default_factory=list)
    hybrid: bool = False               # linear-attention layers: see engine/state.py
    # Every image of the conversation, in order (images[0] is `image`), its patch grid, its
    # model-input size and where its block (vision_start .. vision_end) sits in token_ids.
    images: list[Image.Image] = field(default_factory=list)
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    blocks: list[tuple[int, int]] = field(default_factory=list)     # [start, end) in token_ids
    kv: DynamicCache | None = None     # covers token_ids[:kv_len]
    kv_len: int = 0
    kv_bytes: int = 0                  # the cache and its snapshots
    snapshots: list[state.Snapshot] = field(default_factory=list)   # hybrid only, by length
    mtp: object | None = None          # mtp.HeadState: the MTP head's context (pipeline.mtp_drafts)
    last_used: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))

    def drop_kv(self) -> None:
        self.kv, self.kv_len, self.kv_bytes = None, 0, 0
        self.snapshots.clear()
        self.mtp = None

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (Stop, Regenerate, a failed turn)."""
        length = max(length, 0)
        del self.token_ids[length:]
        # Images whose block was cut leave with their tokens (a turn that attached them was undone).
        keep = sum(1 for start, _ in self.blocks if start < length) or 1
        del self.images[keep:], self.grids[keep:], self.sizes[keep:], self.blocks[keep:]
        self.rewind_kv(length)

    def rewind_kv(self, length: int, dirty: bool = False) -> None:
        """Make the cache cover at most token_ids[:length]: attention layers are cut; linear
        layers go back to the latest snapshot at or before `length` (or everything is dropped
        and rebuilt from the tokens). The image's positions need a prefill from token 0, so
        nothing is kept inside the conversation head. dirty: a forward failed part-way, so
        some layers hold state past kv_len."""
        if self.kv is None or (self.kv_len <= length and not dirty):
            return
        length = min(length, self.kv_len)
        if length < self.head_len or any(start < length < end for start, end in self.blocks):
            self.drop_kv()       # an image's positions come from its whole block: never cut inside one
            return
        if self.hybrid:
            usable = [s for s in self.snapshots if self.head_len <= s.length <= length]
            if not usable:
                self.drop_kv()
                return
            snapshot = usable[-1]
            state.restore(self.kv, snapshot)
            self.snapshots = [s for s in self.snapshots if s.length <= snapshot.length]
            length = snapshot.length
        else:
            state.cut_attention(self.kv, length)
        self.kv_len = length
        if self.mtp is not None:
            self.mtp.cut(length)
        self.kv_bytes = self.nbytes()

    def mark_boundary(self) -> None:
        """Hybrid models: remember the linear layers' state at kv_len (a phase or turn start)."""
        if not self.hybrid or self.kv is None or self.kv_len < self.head_len:
            return
        if self.snapshots and self.snapshots[-1].length == self.kv_len:
            return
        self.snapshots.append(state.take_snapshot(self.kv, self.kv_len))
        del self.snapshots[:-MAX_SNAPSHOTS]

    def nbytes(self) -> int:
        return (state.cache_nbytes(self.kv) + sum(s.nbytes for s in self.snapshots)
                + (self.mtp.nbytes() if self.mtp is not None else 0))
