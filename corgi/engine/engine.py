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

import contextlib
import logging
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import torch
from PIL import Image

from ..config import Config
from ..types import CacheStats, OutOfMemory, Sampling  # noqa: F401  (Sampling: re-exported)
from . import decode, state
from .conversation import Conversation
from .loading import LoadedModel, load_model
from .mtp import HeadState, MtpDraft, load_mtp_head
from .vision import EncoderOutput, VisionEncoder, compile_tower_blocks

@contextlib.contextmanager
def out_of_memory_as_error():
    """torch's OutOfMemoryError inside the block as corgi's OutOfMemory, after the failed work's
    cached blocks have gone back to the device (the next turn needs them)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "out of memory") from exc


# Text chunks up to this long after a cached prefix go through the static bucket (captured
# graphs, 64 tokens a forward): every phase prompt and follow-up of a turn. HF's eager prefill
# paid a first-use cost there on the H200 (3B shape: the first W1's phase-4 prompt of ~300
# tokens took 1.3 s against 0.4 s warm, RESULTS.md) that a captured graph does not. A longer
# chunk (a pasted document) is one HF forward, which is compute-bound anyway. A hybrid model's
# text chunks go through the bucket at any length it holds: HF's linear-attention prefill
# (flash-linear-attention's Triton kernels) autotunes and compiles on the first call of each
# new shape class, which stalled a turn's phase 4 by 15-20 s on the H200 (RESULTS.md).
STATIC_PREFILL_TOKENS = 1024
# The HF prefills a hybrid model's warm-up runs on CUDA (`warm_up_prefill`): every batch size a
# caption batch takes, two lengths (Triton specialises integer arguments on divisibility by 16),
# from an empty state and on top of one.
WARMUP_PREFILL_ROWS = tuple(range(1, 9))
WARMUP_PREFILL_LENGTHS = (61, 64)

MB = 1024 * 1024


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
        self._grammars = None     # GrammarCache, built on first use (compiles the tokenizer once)
        # constraint_ahead's compiles, one at a time (its thread starts at the first one)
        self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="corgi-grammar")
        # pipeline.mtp_drafts: the checkpoint's MTP head (Qwen3.5), read from its files
        self.mtp = load_mtp_head(loaded) if config.pipeline.mtp_drafts else None
        # model.compile: decode steps over static KV buffers (CUDA: compiled + CUDA graphs;
        # CPU: the same step, eager, which is how the tests check it against the HF path).
        self.static = None
        int8 = config.model.quantization == "int8-decode"
        if int8 and not (config.model.compile and loaded.family.static_decode):
            logging.getLogger(__name__).warning("model.quantization int8-decode needs model.compile and a "
                                                "dense text stack; decoding from the model's own weights")
        if config.model.compile and config.model.quantization in ("8bit", "4bit"):
            # The static step reads plain weight tensors; bitsandbytes layers keep the HF path.
            logging.getLogger(__name__).warning("model.compile is ignored with quantization")
        elif config.model.compile and not loaded.family.static_decode:
            logging.getLogger(__name__).warning("model.compile: the compiled step does not cover %s "
                                                "(MoE text MLP); decoding on the eager path", loaded.family.name)
        elif config.model.compile:
            from .static_decode import StaticDecoder
            cuda = loaded.device.type == "cuda"
            self.static = StaticDecoder(loaded.model, loaded.device, loaded.dtype,
                                        use_graphs=cuda, compile_layers=cuda, int8=int8,
                                        attention=config.model.decode_attention, gemv=config.model.decode_gemv)
            if config.model.warmup:
                self.static.warm_up(self.warmup_shapes(), self.warmup_widths())
        # The vision blocks compiled like the decode step: CUDA only (the CPU has no launches to
        # save, and the tests' CPU twins would pay the compile), not under bitsandbytes layers.
        self.vision_compiled = (config.model.compile and config.model.compile_vision
                                and loaded.device.type == "cuda"
                                and config.model.quantization not in ("8bit", "4bit")
                                and compile_tower_blocks(loaded.model))
        if config.model.warmup and loaded.family.hybrid and loaded.device.type == "cuda":
            self.warm_up_prefill()
        if config.model.warmup and loaded.device.type == "cuda":
            self.warm_up_captions()
        if config.model.warmup and config.pipeline.structured_output:
            self.grammars()     # the vocabulary tables (seconds when not on disk yet), not mid-turn

    def grammars(self):
        """The GrammarCache of this tokenizer (built on first use: the vocabulary tables)."""
        from .grammar import GrammarCache
        if self._grammars is None:
            self._grammars = GrammarCache.for_tokenizer(self.lm.tokenizer, self.lm.vocab_size)
        return self._grammars

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

    def constraint_ahead(self, phase: str, settings, convention, images=()) -> Future:
        """`constraint()` on the engine's grammar thread. A grammar is compiled per box range,
        so per new image size (Qwen2.5-VL's pixel boxes: 15-32 ms a grammar on a 2-core CPU):
        handed to `generate()` as this Future, it compiles while the prefill runs on the GPU
        (xgrammar's compiler does not hold the GIL) instead of before it."""
        return self._grammar_thread.submit(self.constraint, phase, settings, convention, images)

    def constraint(self, phase: str, settings, convention, images=()):
        """A fresh grammar-constrained decoder for phase "reasoning" or "synthesis"; the
        compiled grammar is cached per (schema, tokenizer). images: several images in the
        turn, ((N of "Image N", its convention), ...): every box names its image."""
        if phase == "reasoning":
            return self.grammars().reasoning_decoder(settings.max_steps, convention, settings.max_thinking_chars,
                                                    images)
        return self.grammars().synthesis_decoder(convention, images)

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
                            rope_delta=int(delta[0]), head_len=len(ids), token_ids=ids,
                            hybrid=self.lm.family.hybrid)
        conv.images, conv.grids, conv.sizes = [image], [grid], [conv.resized]
        conv.blocks = [self._block_span(0, ids, n_tokens, head[1])]
        with self._conversations_lock:
            self._conversations.add(conv)
        return conv

    def add_images(self, conv: Conversation, images: list[Image.Image], texts: list[tuple[str, str]],
                   in_head: bool = False) -> list[int]:
        """Append one image block per image, texts[i] = (text before its pads, text after).
        No model work: the next prefill encodes every image it meets in one vision-tower call
        and places them with the model's own get_rope_index over the whole sequence (the
        positions of several images, as HF computes them). in_head: part of the conversation
        head (the images of the first turn). Returns the images' conversation indices.
        Raises ValueError for shapes the processor refuses."""
        cfg = self.config.image
        grids = [self.image_grid(image, cfg.min_pixels, cfg.max_pixels) for image in images]
        indices = []
        for image, grid, (before, after) in zip(images, grids, texts):
            n_tokens = grid[0] * grid[1] * grid[2] // self.lm.merge_size ** 2
            block = self._image_block(before, n_tokens, after)
            base = len(conv.token_ids)
            conv.token_ids.extend(block)
            indices.append(len(conv.images))
            conv.images.append(image)
            conv.grids.append(grid)
            conv.sizes.append((grid[2] * self.lm.patch_size, grid[1] * self.lm.patch_size))
            conv.blocks.append(self._block_span(base, block, n_tokens, after))
        _, delta = self._image_positions(torch.tensor([conv.token_ids]), conv.grids)
        conv.rope_delta = int(delta[0])
        if in_head:
            conv.head_len = len(conv.token_ids)
        return indices

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
        first, prefilled = conv.kv_len, [] if self.mtp is not None else None
        logits = self._advance(conv, stats, hidden=prefilled)
        if prefilled:       # the MTP head pairs these positions when the next call decodes
            self._head_context(conv).wait(first, torch.cat(prefilled))
        return logits

    def _head_context(self, conv: Conversation) -> HeadState:
        if conv.mtp is None:
            conv.mtp = HeadState(self.mtp)
        return conv.mtp

    def generate(self, conv: Conversation, max_new_tokens: int, sampling: Sampling | None = None,
                 constraint=None, stats: CacheStats | None = None, min_new_tokens: int = 0) -> Iterator[int]:
        """Yield new tokens, appending each to the conversation. Stops at an end-of-message
        token, when `constraint` (a ConstrainedDecoder, or constraint_ahead's Future of one,
        awaited once the prefill is launched) is finished, or at max_new_tokens;
        `min_new_tokens` bans the end tokens before that many (benchmarks force counts).
        Closing the generator stops the model at once; the caller truncates what it must."""
        sampling = sampling or Sampling()
        stats = stats if stats is not None else CacheStats()
        if not self.cache_enabled:
            conv.drop_kv()       # the naive pipeline: every phase reads the whole prompt again
        first = conv.kv_len                                                # the prefill starts here
        # The prefill's hidden states, [T, H] chunks: the MTP head's context starts with them.
        prefilled = [] if self.mtp is not None and sampling.temperature <= 0 else None
        logits = self._advance(conv, stats, hidden=prefilled)              # [1, V]
        if isinstance(constraint, Future):
            constraint = constraint.result()    # compiled meanwhile (constraint_ahead)
        start = conv.kv_len
        bucket = self.static.bucket(1, start + max_new_tokens) if self.static else None
        if bucket is not None:
            bucket.load(conv.kv, start, torch.tensor([start + conv.rope_delta], device=self.lm.device), valid=None)
            stepper = decode.StaticStepper(bucket)
        else:
            stepper = decode.EagerStepper(self.lm.model, conv.kv,
                                          torch.tensor([start + conv.rope_delta], device=self.lm.device))
        row = decode.Row(self._row_constraints(constraint, min_new_tokens),
                         jump_forward=self.jump_forward and hasattr(constraint, "forced")
                         and (bucket is None or bucket.multi_token),
                         lookup=self._drafts(conv, first, prefilled, sampling) if stepper.rewindable else None)
        tally = decode.Tally()
        try:
            for _, token in decode.decode_rows(logits, [row], stepper, max_new_tokens,
                                               self._sampler(sampling), self.lm.special.stop_ids,
                                               self.lm.special.end_of_text, overlap=self._overlap(bucket),
                                               tally=tally):
                conv.token_ids.append(token)
                yield token
        finally:
            self._count(stats, tally)
            if stepper.broken:
                conv.kv_len = start + stepper.fed      # a step failed part-way: cut what it wrote
                conv.rewind_kv(conv.kv_len, dirty=True)
            elif bucket is not None and stepper.fed:
                # The static buffers computed the state of `fed` tokens: hand it to the conversation.
                bucket.append_to(conv.kv, start, start + stepper.fed)
                conv.kv_len = start + stepper.fed
            else:
                conv.kv_len = start + stepper.fed
            if conv.kv_len > len(conv.token_ids):
                # Closed while yielding a forced chunk the stepper had already fed: the cache
                # goes back to what the conversation took (hybrid: to its boundary snapshot).
                conv.rewind_kv(len(conv.token_ids))
            if isinstance(row.lookup, MtpDraft) and conv.mtp is row.lookup.context:
                row.lookup.close(conv.kv_len)      # what the head has not paired waits for the next call
            # Memory bookkeeping once per phase, not per decoded token.
            if conv.kv is not None:
                conv.kv_bytes = conv.nbytes()
                self._enforce_kv_budget(keep=conv)

    def warmup_shapes(self) -> list[tuple[int, int]]:
        """Static buckets a default conversation touches: one row up to 8k columns, and the
        region-caption batches."""
        return [(1, c) for c in (1536, 2048, 3072, 4096, 6144, 8192)] + [(b, 512) for b in (1, 2, 4, 8)]

    def warmup_widths(self) -> tuple[int, ...]:
        """Multi-token widths the one-row buckets capture at warm-up: the short prefill's, and
        every padded width when jump-forward or drafts make multi-token forwards mid-turn."""
        from .static_decode import PREFILL_WIDTH, WIDTH_BUCKETS
        pipeline = self.config.pipeline
        drafts = pipeline.prompt_lookup or pipeline.mtp_drafts
        return WIDTH_BUCKETS if pipeline.jump_forward or drafts else (PREFILL_WIDTH,)

    @property
    def jump_forward(self) -> bool:
        """pipeline.jump_forward: the grammar's forced tokens go in without model steps."""
        return self.config.pipeline.jump_forward

    def _drafts(self, conv: Conversation, first: int, prefilled: list[torch.Tensor] | None, sampling: Sampling):
        """A conversation row's draft source: the MTP head (pipeline.mtp_drafts, a checkpoint
        that has one; greedy only), else prompt lookup. The head starts from the positions this
        call prefilled (first..kv_len-1, their hidden states `prefilled`); each is paired with
        the token after it, the last with the row's first token."""
        if self.mtp is not None and prefilled:
            return MtpDraft(self.mtp, self.lm.model, self._head_context(conv), first, torch.cat(prefilled),
                            conv.token_ids, conv.rope_delta)
        return self._lookup(conv.token_ids, sampling)

    def _lookup(self, context: list[int], sampling: Sampling) -> decode.PromptLookup | None:
        """pipeline.prompt_lookup (greedy only): drafts from the row's own context."""
        if not self.config.pipeline.prompt_lookup or sampling.temperature > 0:
            return None
        return decode.PromptLookup(context, k=self.draft_tokens)

    draft_tokens = decode.DRAFT_TOKENS

    @staticmethod
    def _count(stats: CacheStats, tally: decode.Tally) -> None:
        stats.decode_model_steps += tally.model_steps
        stats.decode_output_tokens += tally.output_tokens
        stats.forced_tokens += tally.forced_tokens
        stats.drafted_tokens += tally.drafted_tokens
        stats.accepted_drafts += tally.accepted_drafts

    def _sampler(self, sampling: Sampling) -> decode.Sampler:
        return decode.Sampler(sampling.temperature, sampling.top_p, sampling.seed, self.lm.device)

    def _row_constraints(self, constraint, min_new_tokens: int) -> list:
        constraints = [constraint] if constraint is not None else []
        if min_new_tokens > 0:
            constraints.append(decode.MinLength(min_new_tokens, self.lm.special.stop_ids))
        return constraints

    def _overlap(self, bucket) -> bool:
        # On CUDA the next step is launched before the host reads this token, so the CPU work
        # per token (grammar, detokenising, the caller) overlaps the GPU's forward pass.
        return bucket is not None and self.lm.device.type == "cuda"

    def _advance(self, conv: Conversation, stats: CacheStats, hidden: list | None = None) -> torch.Tensor:
        """Prefill every token of the conversation the cache does not cover yet. `hidden`: a list
        that gets the final-norm hidden states of the prefilled positions ([T, H] chunks)."""
        conv.last_used = time.monotonic()
        conv.mark_boundary()                   # hybrid: the linear state here, to come back to
        start, stop = conv.kv_len, len(conv.token_ids)
        assert stop > start, "nothing to compute"
        ids = torch.tensor([conv.token_ids[start:stop]], device=self.lm.device)   # [1, T]
        images = None
        if conv.kv is None:
            conv.kv = state.new_cache(self.lm.text_config, self.lm.family.hybrid)
        # The images whose blocks lie in this chunk (all of them from scratch; one that joined
        # since the last prefill otherwise): their features in one call (cache hits or one
        # vision-tower batch), their positions from get_rope_index over the whole sequence.
        chunk_images = [i for i, (block_start, _) in enumerate(conv.blocks) if block_start >= start]
        if chunk_images:
            hits, misses = self.vision.hits, self.vision.misses
            features = self.vision.encode([conv.images[i] for i in chunk_images], conv.min_pixels, conv.max_pixels)
            assert [f.grid_thw for f in features] == [conv.grids[i] for i in chunk_images], \
                "image processor and grid estimate disagree"
            stats.vision_hits += self.vision.hits - hits
            stats.vision_misses += self.vision.misses - misses
            every, _ = self._image_positions(torch.tensor([conv.token_ids[:stop]]), conv.grids)  # [3, 1, stop]
            positions = every[:, :, start:stop]
            images = EncoderOutput(features)
        else:
            positions = decode.text_positions(start, stop, conv.rope_delta, 1, self.lm.device)
        stats.prompt_tokens += stop
        stats.prefix_tokens_reused += start
        stats.prefill_tokens_computed += stop - start
        logits = None
        short = stop - start <= STATIC_PREFILL_TOKENS or self.lm.family.hybrid
        if images is None and start > 0 and short and self.static is not None:
            logits = self._prefill_static(conv, start, stop, hidden)
        if logits is None:
            try:
                logits, states = decode.forward_hidden(self.lm.model, ids, positions, conv.kv, images=images)
                if hidden is not None:
                    hidden.append(states[0])                               # [T, H]
            except BaseException:
                # A forward that failed part-way (out of memory, a kernel error, an interrupt) has
                # written state into some layers and not others: go back to where it started (or
                # drop everything); the next prefill rebuilds from the tokens.
                conv.rewind_kv(start, dirty=True) if start else conv.drop_kv()
                raise
        conv.kv_len = stop
        conv.kv_bytes = conv.nbytes()
        self._enforce_kv_budget(keep=conv)
        return logits

    @torch.inference_mode()
    def warm_up_prefill(self, rows=WARMUP_PREFILL_ROWS, lengths=WARMUP_PREFILL_LENGTHS) -> None:
        """HF prefills of filler text, so that the first turn does not pay for the kernels' first
        calls (a hybrid model's linear-attention kernels autotune per batch size and specialise per
        length class). Left-padded rows for a batch, as generate_batch makes them; each cache
        then takes one more chunk on top (a prefill that starts from a state). Nothing is kept."""
        device, pad = self.lm.device, self.lm.special.end_of_text
        filler = (self.encode_text(" the") or [pad])[0]
        for batch in rows:
            for length in lengths:
                ids = torch.full((batch, length), filler, dtype=torch.long, device=device)   # [B, T]
                mask = torch.ones((batch, length), dtype=torch.long, device=device)
                mask[1:, :3] = 0                         # rows after the first: left padding
                ids[mask == 0] = pad
                cache = state.new_cache(self.lm.text_config, self.lm.family.hybrid)
                decode.forward(self.lm.model, ids, decode.text_positions(0, length, 0, batch, device), cache,
                               attention_mask=mask)
                more = torch.cat((mask, torch.ones_like(mask)), dim=1)                    # [B, 2T]
                decode.forward(self.lm.model, torch.full_like(ids, filler),
                               decode.text_positions(length, 2 * length, 0, batch, device), cache,
                               attention_mask=more)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def warm_up_captions(self, batch_sizes=None) -> None:
        """Caption batches as a turn makes them (crops at pipeline.crop_max_pixels, rows of
        different lengths, so left padding; two tokens a row) through generate_batch itself, for
        every batch size from 1 to pipeline.max_regions (at most 8): one crop too, because the
        compiled vision blocks take one graph per range of patch counts (inductor's choices
        differ below 1280 and from 3420 patches), each compiled on its range's first call, 4-6 s
        on the H100. The first left-padded prefill
        of a process paid 1.1 s on the H100 (the first turn whose step statements differ in
        length paid it in phase 3; RESULTS.md 2026-12-06), once on the 3B shape; the 4B hybrid
        paid it after a 4-row warm-up batch of small crops, so the warm-up takes the real sizes."""
        pipeline = self.config.pipeline
        if batch_sizes is None:
            batch_sizes = range(1, min(pipeline.max_regions, 8) + 1)
        side = max(32, int(pipeline.crop_max_pixels ** 0.5))
        crop = Image.new("RGB", (side, side), (128, 128, 128))
        for rows in batch_sizes:
            heads = [("", " region" * (4 + 6 * row)) for row in range(rows)]
            for _ in self.generate_batch([crop] * rows, heads, 2, pipeline.crop_max_pixels):
                pass
        if self.lm.device.type == "cuda":
            torch.cuda.synchronize(self.lm.device)

    def _prefill_static(self, conv: Conversation, start: int, stop: int, hidden: list | None = None) -> torch.Tensor | None:
        """A short text chunk after a cached prefix (a follow-up question, the next phase's
        prompt) through the static bucket's multi-token forward, PREFILL_WIDTH tokens a forward:
        on CUDA captured graphs instead of an eager HF forward, which launches every layer's
        small kernels from the host (the follow-up's time to first token). The conversation's
        cache gets the new state only once every chunk has gone through, so a failure leaves it
        where it was. None: no bucket fits; the caller prefills through HF."""
        from .static_decode import PREFILL_WIDTH
        bucket = self.static.bucket(1, stop + PREFILL_WIDTH)
        if bucket is None or not bucket.multi_token:
            return None
        device = self.lm.device
        bucket.load(conv.kv, start, torch.tensor([start + conv.rope_delta], device=device), valid=None)
        for first in range(start, stop, PREFILL_WIDTH):
            chunk = conv.token_ids[first:min(stop, first + PREFILL_WIDTH)]
            # Every forward is PREFILL_WIDTH wide, the last chunk padded: its captured graph
            # serves, where a narrower width would compile and capture mid-turn (the H200's W2
            # first follow-up: a 26-token tail took 6 s). keep() drops the padding's columns.
            ids = torch.zeros((1, PREFILL_WIDTH), dtype=torch.long, device=device)      # [1, W]
            ids[0, :len(chunk)] = torch.tensor(chunk, device=device)
            logits = bucket.extend(ids, lengths=[len(chunk)])[:, :len(chunk)]           # [1, T, V]
            bucket.keep([len(chunk)])
            if hidden is not None:
                hidden.append(bucket.hidden[0, :len(chunk)].clone())                   # [T, H]
        bucket.append_to(conv.kv, start, stop)
        return logits[:, -1]                                                               # [1, V]

    def _enforce_kv_budget(self, keep: Conversation) -> None:
        """Evict the least recently used conversations' state (never `keep`'s) while the
        conversations plus the static decode buffers exceed the budget."""
        with self._conversations_lock:
            live = sorted(self._conversations, key=lambda c: c.last_used)
        total = sum(c.kv_bytes for c in live) + self.static_bytes()
        for conv in live:
            if total <= self.kv_budget:
                break
            if conv is keep or conv.kv is None:
                continue
            total -= conv.kv_bytes
            conv.drop_kv()

    def kv_bytes_total(self) -> int:
        """Bytes of every conversation's cache and snapshots (not the static buffers)."""
        with self._conversations_lock:
            return sum(c.kv_bytes for c in self._conversations)

    def snapshot_bytes_total(self) -> int:
        with self._conversations_lock:
            return sum(sum(s.nbytes for s in c.snapshots) for c in self._conversations)

    def static_bytes(self) -> int:
        """Bytes of the compiled decoder's buffers (see StaticDecoder.nbytes)."""
        return self.static.nbytes() if self.static is not None else 0

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
        tower call for all images, one prefill, then the same decode loop over B rows.
        Yields (row, token); a row stops at its end-of-message token."""
        sampling = sampling or Sampling()
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
        cache = state.new_cache(lm.text_config, lm.family.hybrid)
        logits = decode.forward(lm.model, ids, positions, cache, attention_mask=mask,
                                images=EncoderOutput(features))              # [B, V]
        next_pos = torch.tensor([len(r) for r in rows], device=device) + deltas.view(-1).to(device)  # [B]
        bucket = self.static.bucket(batch, width + max_new_tokens) if self.static else None
        if bucket is not None:
            bucket.load(cache, width, next_pos, valid=mask)
            stepper = decode.StaticStepper(bucket)
        else:
            stepper = decode.EagerStepper(lm.model, cache, next_pos, attention_mask=mask)
        # Drafts only where the stepper can take rejected tokens back (not an eager batch of hybrid rows).
        decode_rows = [decode.Row(self._row_constraints(None, min_new_tokens),
                                  lookup=self._lookup(row, sampling) if stepper.rewindable else None)
                       for row in rows]
        tally = decode.Tally()
        try:
            yield from decode.decode_rows(logits, decode_rows, stepper, max_new_tokens, self._sampler(sampling),
                                          lm.special.stop_ids, pad, overlap=self._overlap(bucket), tally=tally)
        finally:
            self._count(stats, tally)

    # ---- helpers ---------------------------------------------------------------------
    def _image_block(self, before: str, n_image_tokens: int, after: str) -> list[int]:
        sp = self.lm.special
        ids = self.encode_text(before)
        if not ids or ids[-1] != sp.vision_start:
            ids.append(sp.vision_start)
        return ids + [sp.image_pad] * n_image_tokens + self.encode_text(after)

    def _block_span(self, base: int, block: list[int], n_tokens: int, after: str) -> tuple[int, int]:
        """[vision_start, end of the pads) of an image block appended at `base`."""
        pads_end = base + len(block) - len(self.encode_text(after))
        return pads_end - n_tokens - 1, pads_end

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
