"""The naive CoRGI turn, as the earlier implementation ran it: every phase is a fresh HF
`model.generate()` from token 0 with `pixel_values` (the image is encoded again each phase),
and the phase-3 crops are captioned one after another, each with its own generate().

Same prompt texts (corgi.prompts) and the same image-pad expansion as the engine, so the
sequences match the engine's token for token in length. Token counts are forced
(min_new_tokens == max_new_tokens, greedy). This is the baseline the engine is measured against:

    .venv/bin/python -m benchmarks.naive --model small-qwen2.5-vl                  # CPU
    .venv/bin/python -m benchmarks.naive --shape qwen2.5-vl-3b --device cuda         # GPU, random weights
"""
from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from corgi import boxes, prompts
from corgi.engine.loading import LoadedModel
from corgi.types import Box, Evidence, StepKind

from . import common


def _encode(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer.encode(text, add_special_tokens=False)


def _image_inputs(lm: LoadedModel, image: Image.Image, min_pixels: int, max_pixels: int):
    """pixel_values, image_grid_thw and the number of image-pad tokens, as the engine's vision path."""
    out = lm.image_processor(images=[image], return_tensors="pt",
                             size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    grid = out["image_grid_thw"]                                       # [1, 3]
    n_pad = int(grid.prod()) // lm.merge_size ** 2
    return out["pixel_values"].to(lm.device, lm.dtype), grid.to(lm.device), n_pad


def _image_block(lm: LoadedModel, before: str, n_pad: int, after: str) -> list[int]:
    """Engine._image_block: text, <|vision_start|>, n_pad x <|image_pad|>, text."""
    ids = _encode(lm, before)
    if not ids or ids[-1] != lm.special.vision_start:
        ids.append(lm.special.vision_start)
    return ids + [lm.special.image_pad] * n_pad + _encode(lm, after)


@torch.inference_mode()
def _generate(lm: LoadedModel, ids: list[int], pixel_values, grid, n_tokens: int) -> list[int]:
    """One fresh generate(): full prefill (vision tower included), then exactly n_tokens."""
    input_ids = torch.tensor([ids], device=lm.device)
    out = lm.model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        # M-RoPE needs the token types; without them Qwen2.5-VL silently uses 1-D positions.
        mm_token_type_ids=(input_ids == lm.special.image_pad).int(),
        pixel_values=pixel_values, image_grid_thw=grid,
        max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None,
        eos_token_id=list(lm.special.stop_ids), pad_token_id=lm.special.end_of_text)
    new = out[0, input_ids.shape[1]:].tolist()
    assert len(new) == n_tokens, f"asked for {n_tokens} tokens, got {len(new)}"
    return new


def naive_turn(lm: LoadedModel, image: Image.Image, question: str, *, reasoning_tokens: int,
               evidence_tokens: int, synthesis_tokens: int, crop_boxes: list[Box],
               min_pixels: int = 56 * 56, max_pixels: int = 1280 * 28 * 28,
               crop_max_pixels: int = 448 * 448, crop_padding: float = 0.25, max_steps: int = 6) -> dict:
    """Run one naive turn; per-phase seconds (GPU-synchronised) and the token counts."""
    dev = lm.device
    seconds, tokens = {}, {}
    head_before, head_after = prompts.conversation_head()
    t_turn = time.perf_counter()

    # Phase 1+2: the conversation so far + the reasoning prompt, image encoded from pixels.
    def phase1():
        pixel_values, grid, n_pad = _image_inputs(lm, image, min_pixels, max_pixels)
        resized = (int(grid[0, 2]) * lm.patch_size, int(grid[0, 1]) * lm.patch_size)
        convention = (boxes.pixel_convention(*resized) if lm.family.box_style == "pixels" else boxes.REL1000)
        ids = _image_block(lm, head_before, n_pad, head_after)
        ids += _encode(lm, prompts.reasoning_prompt(question, max_steps, convention))
        return ids, convention, _generate(lm, ids, pixel_values, grid, reasoning_tokens)
    seconds["reasoning"], (ids, convention, reasoning_ids) = common.timed(phase1, dev)
    tokens["reasoning_prompt"] = len(ids)

    # Phase 3: each crop alone, one generate() per region.
    def phase3():
        crop_before, crop_after = prompts.crop_head()
        texts = []
        for i, box in enumerate(crop_boxes):
            crop = boxes.crop(image, box, crop_padding)
            pv, grid, n_pad = _image_inputs(lm, crop, min(min_pixels, crop_max_pixels), crop_max_pixels)
            row = _image_block(lm, crop_before, n_pad,
                               crop_after + prompts.crop_instruction(StepKind.OBJECT, f"Look at region {i + 1}."))
            texts.append(lm.tokenizer.decode(_generate(lm, row, pv, grid, evidence_tokens), skip_special_tokens=True))
        return texts
    seconds["evidence"], captions = common.timed(phase3, dev)

    # Phase 4: everything again (steps in context), image re-encoded from pixels.
    def phase4():
        pixel_values, grid, _ = _image_inputs(lm, image, min_pixels, max_pixels)
        evidence = [Evidence(i + 1, b, StepKind.OBJECT, c) for i, (b, c) in enumerate(zip(crop_boxes, captions))]
        ids4 = ids + reasoning_ids + _encode(lm, prompts.END_OF_MESSAGE)
        ids4 += _encode(lm, prompts.synthesis_prompt(question, evidence, convention))
        return ids4, _generate(lm, ids4, pixel_values, grid, synthesis_tokens)
    seconds["synthesis"], (ids4, _) = common.timed(phase4, dev)
    tokens["synthesis_prompt"] = len(ids4)
    seconds["total"] = time.perf_counter() - t_turn
    tokens.update(reasoning=reasoning_tokens, evidence=evidence_tokens * len(crop_boxes),
                  synthesis=synthesis_tokens, regions=len(crop_boxes))
    return {"seconds": seconds, "tokens": tokens}
