"""The engine: a loaded model plus its caches, and the few operations the pipeline needs.

    conv = engine.start_conversation(image)        # encode the image (cached by content)
    engine.append(conv, text)                      # tokens only, no compute
    for token in engine.generate(conv, 512): ...   # prefill the uncached tail, then decode
    engine.generate_batch(crops, prompts, 48)      # phase 3: all regions as one batch

Everything reused is keyed by content: image features by pixels, prefix K/V by the
conversation's own token list. With `cache.enabled: false` every generate() starts from
an empty KV cache and re-encodes the image: the naive pipeline, kept for equality tests.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from PIL import Image

from ..config import Config
from ..types import CacheStats
from . import decode, kv
from .conversation import Conversation
from .loading import LoadedModel, load_model
from .vision import EncoderOutput, VisionEncoder

MB = 1024 * 1024


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Engine:
    def __init__(self, loaded: LoadedModel, config: Config):
        self.lm = loaded
        self.config = config
        self.cache_enabled = config.cache.enabled
        self.vision = VisionEncoder(loaded, int(config.cache.vision_cache_mb * MB), enabled=self.cache_enabled)
        self.kv_budget = int(config.cache.kv_cache_mb * MB)
        self._conversations: weakref.WeakSet[Conversation] = weakref.WeakSet()
        # The UI closes sessions from other threads (tab close, idle time-out) while a turn
        # may be scanning the set for the KV budget.
        self._conversations_lock = threading.Lock()
        self._num_layers = loaded.model.config.get_text_config().num_hidden_layers
        self._grammars = None     # GrammarCache, built on first use (compiles the tokenizer once)
        # model.compile: decode steps over static KV buffers (CUDA: compiled + CUDA graphs;
        # CPU: the same step, eager, which is how the tests check it against the HF path).
        self.static = None
        if config.model.compile and config.model.quantization != "none":
            # The static step reads plain weight tensors; quantized layers keep the HF path.
            logging.getLogger(__name__).warning("model.compile is ignored with quantization")
        elif config.model.compile:
            from .static_decode import StaticDecoder
            cuda = loaded.device.type == "cuda"
            self.static = StaticDecoder(loaded.model, loaded.device, loaded.dtype,
                                        use_graphs=cuda, compile_layers=cuda)
            if config.model.warmup:
                self.static.warm_up(self.warmup_shapes())

    @classmethod
    def load(cls, config: Config) -> "Engine":
        return cls(load_model(config.model, config.image), config)

    def model_info(self) -> dict[str, str]:
        """What the CLI's --json and the UI's trace report as "model"."""
        lm = self.lm
        return {"id": lm.model_id, "family": lm.family.name,
                "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)}

    # ---- text <-> ids ---------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.lm.tokenizer.encode(text, add_special_tokens=False)

    def decode_text(self, ids: list[int], skip_special: bool = False) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def constraint(self, phase: str, settings, convention):
        """A fresh grammar-constrained decoder for phase "reasoning" or "synthesis"; the
        compiled grammar is cached per (schema, tokenizer)."""
        from .grammar import GrammarCache
        if self._grammars is None:
            self._grammars = GrammarCache(self.lm.tokenizer, self.lm.vocab_size)
        if phase == "reasoning":
            return self._grammars.reasoning_decoder(settings.max_steps, convention, settings.max_thinking_chars)
        return self._grammars.synthesis_decoder(convention)

    # ---- conversations ----------------------------------------------------------------
    def start_conversation(self, image: Image.Image, head: tuple[str, str]) -> Conversation:
        """head = (text before the image, text after it). No model work: the image is encoded
        (or found in the cache) by the first prefill, which `prefill()` can run ahead of time."""
        cfg = self.config.image
        grid = self.image_grid(image, cfg.min_pixels, cfg.max_pixels)
        n_tokens = grid[0] * grid[1] * grid[2] // self.lm.merge_size ** 2
        ids = self._image_block(head[0], n_tokens, head[1])
        _, delta = self._image_positions(torch.tensor([ids]), [grid])
        conv = Conversation(image=image, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                            grid_thw=grid, resized=(grid[2] * self.lm.patch_size, grid[1] * self.lm.patch_size),
                            rope_delta=int(delta[0]), head_len=len(ids), token_ids=ids)
        with self._conversations_lock:
            self._conversations.add(conv)
        return conv

    def image_grid(self, image: Image.Image, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid the image processor will produce, without processing.
        Raises ValueError for shapes the processor refuses (aspect ratio over 200)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        patch = self.lm.patch_size
        height, width = smart_resize(image.height, image.width, factor=patch * self.lm.merge_size,
                                     min_pixels=min_pixels, max_pixels=max_pixels)
        return (1, height // patch, width // patch)

    def append(self, conv: Conversation, text: str) -> None:
        conv.token_ids.extend(self.encode_text(text))

    def prefill(self, conv: Conversation, stats: CacheStats | None = None) -> torch.Tensor:
        """Compute K/V for every token not yet cached; logits [1, V] after the last token."""
        stats = stats if stats is not None else CacheStats()
        return self._advance(conv, stats, count_prompt=True)

    def generate(self, conv: Conversation, max_new_tokens: int, sampling: Sampling | None = None,
                 constraint=None, stats: CacheStats | None = None, min_new_tokens: int = 0) -> Iterator[int]:
        """Yield new tokens, appending each to the conversation. Stops at an end-of-message
        token, when `constraint` (a ConstrainedDecoder) is finished, or at max_new_tokens;
        `min_new_tokens` bans the end tokens before that many (benchmarks force counts).
        Closing the generator stops the model at once; the caller truncates what it must."""
        sampling = sampling or Sampling()
        stats = stats if stats is not None else CacheStats()
        generator = torch.Generator().manual_seed(sampling.seed)
        stop_ids = self.lm.special.stop_ids
        if not self.cache_enabled:
            conv.drop_kv()       # the naive pipeline: every phase reads the whole prompt again
        logits = self._advance(conv, stats, count_prompt=True)          # [1, V]
        start = conv.kv_len
        bucket = self.static.bucket(1, start + max_new_tokens) if self.static else None
        if bucket is not None:
            position = torch.tensor([start + conv.rope_delta], device=self.lm.device)
            bucket.load(conv.kv, start, position, valid=None)
        # On CUDA the next step is launched before the host reads this token, so the CPU work
        # per token (grammar, detokenising, the caller) overlaps the GPU's forward pass.
        ahead = bucket is not None and self.lm.device.type == "cuda"
        fetch = _TokenFetch(1, self.lm.device)
        stop_tensor = torch.tensor(stop_ids, device=self.lm.device)
        fed = 0
        try:
            for i in range(max_new_tokens):
                last = i == max_new_tokens - 1
                if constraint is not None:
                    constraint.mask(logits)
                if i < min_new_tokens:
                    logits = logits.index_fill(1, stop_tensor, float("-inf"))
                token_t = decode.sample(logits, sampling.temperature, sampling.top_p, generator)   # [1]
                fetch.start(token_t)
                if ahead and not last:
                    logits = bucket.step(token_t)
                    fed += 1
                token = fetch.wait()[0]
                conv.token_ids.append(token)
                finished = token in stop_ids
                if constraint is not None and not finished:
                    if not constraint.accept(token):   # cannot happen after mask(); never silently
                        raise RuntimeError(f"grammar refused token {token} that its own mask allowed")
                    finished = constraint.is_finished()
                yield token
                if finished or last:
                    return
                if bucket is None:
                    logits = self._advance(conv, stats, count_prompt=False)
                elif not ahead:
                    logits = bucket.step(token_t)
                    fed += 1
        finally:
            if bucket is not None and fed:
                # The static buffers computed K/V for `fed` tokens: hand them to the conversation.
                bucket.append_to(conv.kv, start, start + fed)
                conv.kv_len = start + fed
            # Memory bookkeeping once per phase, not per decoded token.
            if conv.kv is not None:
                conv.kv_bytes = kv.cache_nbytes(conv.kv)
                self._enforce_kv_budget(keep=conv)

    def warmup_shapes(self) -> list[tuple[int, int]]:
        """Static buckets a default conversation touches: one row up to 8k columns, and the
        region-caption batches."""
        return [(1, c) for c in (1536, 2048, 3072, 4096, 6144, 8192)] + [(b, 512) for b in (1, 2, 4, 8)]

    def _advance(self, conv: Conversation, stats: CacheStats, count_prompt: bool) -> torch.Tensor:
        conv.last_used = time.monotonic()
        start, stop = conv.kv_len, len(conv.token_ids)
        assert stop > start, "nothing to compute"
        ids = torch.tensor([conv.token_ids[start:stop]], device=self.lm.device)   # [1, T]
        images = None
        if conv.kv is None:
            # From scratch: the image is in this chunk, so bring its features (cache hit or encode).
            hits, misses = self.vision.hits, self.vision.misses
            (features,) = self.vision.encode([conv.image], conv.min_pixels, conv.max_pixels)
            assert features.grid_thw == conv.grid_thw, "image processor and grid estimate disagree"
            stats.vision_hits += self.vision.hits - hits
            stats.vision_misses += self.vision.misses - misses
            positions, _ = self._image_positions(ids, [features.grid_thw])
            images = EncoderOutput([features])
            conv.kv = kv.new_cache(self._num_layers)
        else:
            positions = decode.text_positions(start, stop, conv.rope_delta, 1, self.lm.device)
        if count_prompt:
            stats.prompt_tokens += stop
            stats.prefix_tokens_reused += start
            stats.prefill_tokens_computed += stop - start
        try:
            logits = decode.forward(self.lm.model, ids, positions, conv.kv, images=images)
        except BaseException:
            # A forward that failed part-way (out of memory, a kernel error, an interrupt) has
            # written K/V into some layers and not others: the cache matches no prefix of the
            # tokens any more. Drop it; the next step rebuilds it from the tokens.
            conv.drop_kv()
            raise
        conv.kv_len = stop
        if count_prompt:      # a prefill; decode steps settle the budget when the phase ends
            conv.kv_bytes = kv.cache_nbytes(conv.kv)
            self._enforce_kv_budget(keep=conv)
        return logits

    def _enforce_kv_budget(self, keep: Conversation) -> None:
        """Evict the least recently used conversations' K/V (never `keep`'s) above the budget."""
        with self._conversations_lock:
            live = sorted(self._conversations, key=lambda c: c.last_used)
        total = sum(c.kv_bytes for c in live)
        for conv in live:
            if total <= self.kv_budget:
                break
            if conv is keep or conv.kv is None:
                continue
            total -= conv.kv_bytes
            conv.drop_kv()

    def kv_bytes_total(self) -> int:
        with self._conversations_lock:
            return sum(c.kv_bytes for c in self._conversations)

    def end_conversation(self, conv: Conversation) -> None:
        conv.drop_kv()
        with self._conversations_lock:
            self._conversations.discard(conv)

    # ---- batched region captions (phase 3) --------------------------------------------
    def generate_batch(self, images: list[Image.Image], heads: list[tuple[str, str]],
                       max_new_tokens: int, max_pixels: int,
                       sampling: Sampling | None = None, stats: CacheStats | None = None,
                       min_new_tokens: int = 0) -> Iterator[tuple[int, int]]:
        """Each row is head[0] + image + head[1], rows left-padded into one batch. One vision
        tower call for all images, one prefill, then batched decode. Yields (row, token);
        a row stops at its end-of-message token."""
        sampling = sampling or Sampling()
        generator = torch.Generator().manual_seed(sampling.seed)
        lm, device = self.lm, self.lm.device
        min_pixels = min(self.config.image.min_pixels, max_pixels)
        stats = stats if stats is not None else CacheStats()
        hits, misses = self.vision.hits, self.vision.misses
        features = self.vision.encode(images, min_pixels, max_pixels)
        stats.region_vision_hits += self.vision.hits - hits
        stats.region_vision_misses += self.vision.misses - misses
        rows = [self._image_block(h[0], f.n_tokens, h[1]) for h, f in zip(heads, features)]
        batch, width = len(rows), max(len(r) for r in rows)
        stats.prompt_tokens += sum(len(r) for r in rows)
        stats.prefill_tokens_computed += sum(len(r) for r in rows)
        pad = lm.special.end_of_text
        ids = torch.full((batch, width), pad, dtype=torch.long)            # [B, L], left padded
        mask = torch.zeros((batch, width), dtype=torch.long)               # [B, L]
        for b, row in enumerate(rows):
            ids[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
        positions, deltas = self._image_positions(ids, [f.grid_thw for f in features], mask)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        cache = kv.new_cache(self._num_layers)
        logits = decode.forward(lm.model, ids, positions, cache, attention_mask=mask,
                                images=EncoderOutput(features))              # [B, V]
        next_pos = torch.tensor([len(r) for r in rows], device=device) + deltas.view(-1).to(device)  # [B]
        bucket = self.static.bucket(batch, width + max_new_tokens) if self.static else None
        if bucket is not None:
            bucket.load(cache, width, next_pos, valid=mask)
        stop_ids = torch.tensor(lm.special.stop_ids, device=device)
        ahead = bucket is not None and device.type == "cuda"
        fetch = _TokenFetch(batch, device)
        done = [False] * batch
        done_t = None                                    # [B] bool on the device, once a row ends
        for i in range(max_new_tokens):
            last = i == max_new_tokens - 1
            if i < min_new_tokens:
                logits = logits.index_fill(1, stop_ids, float("-inf"))
            tokens = decode.sample(logits, sampling.temperature, sampling.top_p, generator)   # [B]
            if done_t is not None:
                tokens = torch.where(done_t, torch.full_like(tokens, pad), tokens)
            fetch.start(tokens)
            if ahead and not last:
                logits = bucket.step(tokens)
            values = fetch.wait()
            for b in range(batch):
                if not done[b]:
                    yield b, values[b]
                    if values[b] in lm.special.stop_ids:
                        done[b] = True
                        done_t = torch.tensor(done, device=device)
            if all(done) or last:
                return
            if bucket is None:
                mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
                step_pos = next_pos.view(1, -1, 1).expand(3, -1, 1)                       # [3, B, 1]
                logits = decode.forward(lm.model, tokens.view(-1, 1), step_pos, cache, attention_mask=mask)
                next_pos = next_pos + 1
            elif not ahead:
                logits = bucket.step(tokens)

    # ---- helpers ---------------------------------------------------------------------
    def _image_block(self, before: str, n_image_tokens: int, after: str) -> list[int]:
        sp = self.lm.special
        ids = self.encode_text(before)
        if not ids or ids[-1] != sp.vision_start:
            ids.append(sp.vision_start)
        return ids + [sp.image_pad] * n_image_tokens + self.encode_text(after)

    def _image_positions(self, ids: torch.Tensor, grids: list[tuple[int, int, int]],
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions [3, B, L] and rope deltas [B, 1] of sequences holding images,
        from the model's own get_rope_index (mm_token_type_ids: 1 on image pads, 0 elsewhere)."""
        ids = ids.cpu()
        token_types = (ids == self.lm.special.image_pad).int()
        positions, deltas = self.lm.model.model.get_rope_index(
            ids, mm_token_type_ids=token_types, image_grid_thw=torch.tensor(grids),
            attention_mask=mask.cpu() if mask is not None else None)
        return positions.to(self.lm.device), deltas


class _TokenFetch:
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
