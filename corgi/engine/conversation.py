"""A conversation's state: one image, every token so far, and the K/V of a prefix of them.

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

_ids = itertools.count(1)


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
    kv: DynamicCache | None = None     # covers token_ids[:kv_len]
    kv_len: int = 0
    kv_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))

    def drop_kv(self) -> None:
        self.kv, self.kv_len, self.kv_bytes = None, 0, 0

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (Stop, Regenerate, a failed turn)."""
        length = max(length, 0)
        del self.token_ids[length:]
        if self.kv is not None and self.kv_len > length:
            if length < self.head_len:
                self.drop_kv()
            else:
                self.kv.crop(length - self.kv_len)   # 5.23: a negative count of tokens to remove
                self.kv_len = length
