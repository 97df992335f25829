"""Vision features computed once per image: an LRU cache keyed by image content.

Key = sha256 of the decoded RGB pixels + the processing parameters, never the file name,
so the same picture uploaded twice (or reused across conversations) is encoded once.
All misses of one call go through the vision tower together (one batched call).
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from PIL import Image

from .loading import LoadedModel
from .preprocess import to_patches

log = logging.getLogger(__name__)


@dataclass
class ImageFeatures:
    grid_thw: tuple[int, int, int]      # (t, h, w) in patches, before the 2x2 merge
    embeds: torch.Tensor                # [n_tokens, hidden]: what fills the image-pad positions
    deepstack: list[torch.Tensor] = field(default_factory=list)  # Qwen3-VL: per layer [n_tokens, hidden]
    resized: tuple[int, int] = (0, 0)   # (width, height) in pixels of the model's input

    @property
    def n_tokens(self) -> int:
        return self.embeds.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.embeds, *self.deepstack])


class EncoderOutput:
    """Duck-types the vision tower's output for `mm_encoder_outputs={"image": ...}`:
    per-image tuples, as `get_image_features` returns them (the model concatenates them)."""

    def __init__(self, features: list[ImageFeatures]):
        self.pooler_output = tuple(f.embeds for f in features)
        n_layers = len(features[0].deepstack) if features else 0
        self.deepstack_features = [tuple(f.deepstack[i] for f in features) for i in range(n_layers)]


def compile_tower_blocks(model, backend: str = "inductor") -> bool:
    """torch.compile every vision block in place (`Module.compile`: the module tree and its
    state_dict keys stay as they are), with dynamic shapes so that one graph per block
    serves every image and crop size. Eager, the block's RMSNorm, rotary and MLP elementwise
    kernels each launch from Python and each read the whole activation (six 448x448 crops:
    68.6 ms on the H100 for ~25 ms of GEMMs; RESULTS.md 2026-12-07). The window attention is a
    custom op the graph goes around (vision_attention.segment_attention). Only with that
    attention: the library's own per-segment loop reads lengths back to the host and would
    recompile per image set. The graphs are built here, on a small probe image: a toolchain
    that cannot compile them (inductor, triton, a C compiler) leaves the blocks eager with a
    warning, instead of failing every image later. Returns whether it compiled."""
    from .vision_attention import NAME
    visual = model.model.visual
    if visual.config._attn_implementation != NAME:
        return False
    # The blocks share one forward code object and their weights are graph inputs, so they
    # share the compiled graphs too: a handful of cache entries, far below dynamo's limits.
    # shape_padding off (this compile's option, not the process's): inductor pads a matmul only
    # where it judges it compute-bound, a judgement on the patch count that guards the graph to
    # ranges of it (H100: recompiles at 1280 and at 3420 patches).
    options = {"shape_padding": False} if backend == "inductor" else None
    for block in visual.blocks:
        block.compile(dynamic=True, backend=backend, options=options)
    try:
        _probe(visual)
    except Exception as exc:      # the compile failed: BackendCompilerFailed, InductorError, ...
        for block in visual.blocks:
            block._compiled_call_impl = None          # what Module.compile set: eager again
        root = exc
        while getattr(root, "inner_exception", None) or root.__cause__:    # dynamo wraps the backend's error
            root = getattr(root, "inner_exception", None) or root.__cause__
        reason = (str(root).strip().splitlines() or [""])[0][:300]
        log.warning("the vision blocks could not be compiled (%s: %s); the vision tower runs eagerly "
                    "(model.compile_vision: false skips the attempt)", type(root).__name__, reason)
        return False
    return True


@torch.inference_mode()
def _probe(visual) -> None:
    """One region crop's size (32x32 patches, a 448x448 crop at patch 14) through the tower:
    builds the compiled blocks' graphs. It is the first shape benchmarks/gpu_vision_crops.py
    compiles, after which one graph served every size it tried (RESULTS.md)."""
    weight = visual.patch_embed.proj.weight        # [embed, channels, temporal, patch, patch]
    side = 16 * visual.spatial_merge_size
    pixels = torch.zeros(side * side, weight[0].numel(), device=weight.device, dtype=weight.dtype)
    visual(pixels, grid_thw=torch.tensor([[1, side, side]], device=weight.device))


def image_key(image: Image.Image, min_pixels: int, max_pixels: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.size}:{min_pixels}:{max_pixels}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class VisionEncoder:
    def __init__(self, loaded: LoadedModel, cache_bytes: int, enabled: bool = True):
        self.loaded = loaded
        self.cache_bytes = cache_bytes
        self.enabled = enabled
        self._cache: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.tower_calls = 0     # vision-tower forwards: several images of one prefill are one call
        self.seconds = 0.0       # wall time in the tower, all calls (the timeline reads its deltas)

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def encode(self, images: list[Image.Image], min_pixels: int, max_pixels: int) -> list[ImageFeatures]:
        keys = [image_key(im, min_pixels, max_pixels) for im in images]
        found: dict[str, ImageFeatures] = {}
        missing: dict[str, Image.Image] = {}
        for key, image in zip(keys, images):
            if self.enabled and key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
                self.hits += 1
            elif key not in missing:
                missing[key] = image
                self.misses += 1
        if missing:
            t0 = time.perf_counter()
            encoded = self._run_tower(list(missing.values()), min_pixels, max_pixels)
            if self.loaded.device.type == "cuda":
                torch.cuda.synchronize()    # once per tower call: the time is the tower's, not a launch's
            self.seconds += time.perf_counter() - t0
            for key, features in zip(missing, encoded):
                found[key] = features
                self._store(key, features)
        return [found[key] for key in keys]

    @torch.inference_mode()
    def _run_tower(self, images: list[Image.Image], min_pixels: int, max_pixels: int) -> list[ImageFeatures]:
        lm = self.loaded
        self.tower_calls += 1
        # pixel_values: [sum of patches, C*T*P*P]; grid: [n_images, 3]
        pixel_values, grid = to_patches(images, lm.image_processor, min_pixels, max_pixels, lm.device)
        pixel_values, grid = pixel_values.to(lm.dtype), grid.to(lm.device)
        out = lm.model.model.get_image_features(pixel_values, grid, return_dict=True)
        deepstack = getattr(out, "deepstack_features", None) or []
        features = []
        for i, (t, h, w) in enumerate(grid.tolist()):
            features.append(ImageFeatures(
                grid_thw=(t, h, w),
                embeds=out.pooler_output[i],
                deepstack=[layer[i] for layer in deepstack],
                resized=(w * lm.patch_size, h * lm.patch_size)))
        return features

    def _store(self, key: str, features: ImageFeatures) -> None:
        if not self.enabled or features.nbytes > self.cache_bytes:
            return
        if key in self._cache:
            return
        self._cache[key] = features
        self._bytes += features.nbytes
        while self._bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._bytes -= evicted.nbytes

    def clear(self) -> None:
        self._cache.clear()
        self._bytes = 0
