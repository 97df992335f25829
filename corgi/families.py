"""What differs between the Qwen vision-language families, in one table.

Everything else in the project asks this registry instead of testing family names:
loading (model class), prompts and parsing (box convention), the engine (what per-layer
state a conversation keeps, whether the compiled decode step covers the text stack),
the tiny twins and the benchmarks. Adding a family is one entry here plus its twin in
`engine/tiny.py`. No torch or transformers import: the CLI can list families cheaply.

Facts per family (transformers 5.23, confirmed by tests/test_families.py and the twins):
  Qwen2-VL     patch 14, merge 2; boxes 0..1000 relative; plain K/V
  Qwen2.5-VL   patch 14, merge 2; boxes in pixels of the resized input; plain K/V
  Qwen3-VL     patch 16, merge 2; boxes 0..1000; deepstack; plain K/V; <think> tokens exist
  Qwen3.5/3.6  patch 16, merge 2; boxes 0..1000 (reported: Qwen3-VL's); 3 of 4 text layers
               Gated DeltaNet (conv + recurrent state, cannot be cut back), every 4th full
               attention; thinks by default (opens <think> itself)
  *-MoE        as their dense family; only the text MLP differs (router + experts)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str                      # user-facing: "qwen2.5-vl"
    model_type: str                # config.json "model_type"
    model_class: str               # transformers class name
    box_style: str                 # "pixels" (resized-input pixels) | "rel1000"
    patch_size: int                # vision patch in pixels; one LM token per (patch*merge)^2
    merge_size: int
    state: str = "kv"              # "kv": K/V per layer | "hybrid": linear-attention state + K/V
    deepstack: bool = False        # vision features also injected into early decoder layers
    moe: bool = False              # text MLP is a mixture of experts
    static_decode: bool = True     # the compiled decode step (engine/static_decode.py) covers it
    thinks_by_default: bool = False  # the model opens <think> itself after "assistant\n"
    tokenizer: str = "qwen2.5-vl"  # twin tokenizer kind (engine/twin_tokenizer.py)
    # The decoder-layer class of the checkpoint's MTP head (`mtp.*`, engine/mtp.py); "": none.
    mtp_layer: str = ""

    @property
    def hybrid(self) -> bool:
        return self.state == "hybrid"


FAMILIES: tuple[Family, ...] = (
    Family("qwen2-vl", "qwen2_vl", "Qwen2VLForConditionalGeneration", "rel1000", 14, 2,
           tokenizer="qwen2-vl"),
    Family("qwen2.5-vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "pixels", 14, 2,
           tokenizer="qwen2.5-vl"),
    Family("qwen3-vl", "qwen3_vl", "Qwen3VLForConditionalGeneration", "rel1000", 16, 2,
           deepstack=True, tokenizer="qwen3-vl"),
    # The MoE text MLP (router softmax -> top-k -> renormalised experts) is not in the
    # compiled step: it decodes on the eager HF path.
    Family("qwen3-vl-moe", "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "rel1000", 16, 2,
           deepstack=True, moe=True, static_decode=False, tokenizer="qwen3-vl"),
    Family("qwen3.5", "qwen3_5", "Qwen3_5ForConditionalGeneration", "rel1000", 16, 2,
           state="hybrid", thinks_by_default=True, tokenizer="qwen3.5",
           mtp_layer="transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5DecoderLayer"),
    Family("qwen3.5-moe", "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "rel1000", 16, 2,
           state="hybrid", moe=True, static_decode=False, thinks_by_default=True, tokenizer="qwen3.5",
           mtp_layer="transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeDecoderLayer"),
)

BY_MODEL_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}

# Control tokens every family's tokenizer has (the ids differ: read them from the tokenizer).
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
STOP_TOKENS = (IM_END, END_OF_TEXT)


class UnknownFamily(ValueError):
    pass


def family_for_model_type(model_type: str, model_id: str = "") -> Family:
    """The family of a checkpoint's config.json model_type, or one clear error naming both
    the model type and what is supported."""
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        what = f"model {model_id!r}" if model_id else "this model"
        raise UnknownFamily(f"{what} is of type {model_type!r}, which CoRGI does not support; supported: "
                            + ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES))
    return family


def family_by_name(name: str) -> Family:
    try:
        return BY_NAME[name]
    except KeyError:
        raise UnknownFamily(f"unknown family {name!r}; expected one of {', '.join(BY_NAME)}") from None
