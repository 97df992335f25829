"""Load a Qwen-VL checkpoint (tiny offline default, hub id or local folder) for the engine.

One path for every model: the tiny defaults are built into a cache folder first and then
go through the same `from_pretrained` calls as a real checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import families
from ..config import ImageConfig, ModelConfig
from ..families import Family
from .model_source import ModelLoadError, model_source  # noqa: F401  (ModelLoadError: re-exported)



@dataclass(frozen=True)
class SpecialTokens:
    im_start: int
    im_end: int
    end_of_text: int
    vision_start: int
    vision_end: int
    image_pad: int

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.im_end, self.end_of_text)


@dataclass
class LoadedModel:
    model: torch.nn.Module          # a *ForConditionalGeneration
    tokenizer: object
    image_processor: object         # Qwen2VLImageProcessorPil: PIL only, no torchvision
    family: Family
    model_id: str                   # what the user asked for
    path: str                       # what from_pretrained read
    special: SpecialTokens
    device: torch.device
    dtype: torch.dtype
    patch_size: int
    merge_size: int
    # Every added token of the tokenizer (<|im_end|>, <tool_call>, <think>, ...): untrusted
    # text must never encode to one of them (prompts escape these literals).
    added_tokens: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.model.lm_head.out_features

    @property
    def text_config(self):
        return self.model.config.get_text_config()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float64": torch.float64}[name]


def _resolve_path(model_id: str) -> str:
    """Tiny names are built (once) into the cache; folders are used as they are; anything
    else shaped like "org/name" is a hub id for from_pretrained."""
    from .tiny import ensure_tiny_checkpoint
    if model_source(model_id) == "tiny":
        try:
            return str(ensure_tiny_checkpoint(model_id))
        except OSError as exc:      # the cache became unusable (disk full, permissions) while building
            raise ModelLoadError(f"cannot build the twin {model_id} in its cache: "
                                 f"{exc.strerror or type(exc).__name__}") from None
    return model_id


def load_model(model_cfg: ModelConfig, image_cfg: ImageConfig) -> LoadedModel:
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = _resolve_path(model_cfg.id)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as exc:    # OSError, ValueError, huggingface_hub's strict-dataclass validation errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {model_cfg.id!r}: {first}") from None
    try:
        family = families.family_for_model_type(hf_config.model_type, model_cfg.id)
    except families.UnknownFamily as exc:
        raise ModelLoadError(str(exc)) from None

    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    attn = "sdpa" if model_cfg.attn_implementation == "auto" else model_cfg.attn_implementation
    # use_safetensors: weights only from .safetensors, never a pickled pytorch_model.bin (even
    # torch's restricted unpickler is still an unpickler); a .bin-only folder is refused.
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=model_cfg.trust_remote_code,
                  use_safetensors=True)
    bitsandbytes_mode = model_cfg.quantization in ("8bit", "4bit")
    if bitsandbytes_mode:
        if device.type != "cuda":
            raise ModelLoadError("quantization needs a CUDA device")
        try:
            import bitsandbytes  # noqa: F401  (imported only when asked for)
        except ImportError:
            raise ModelLoadError("quantization asked for but bitsandbytes is not installed") from None
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=model_cfg.quantization == "8bit", load_in_4bit=model_cfg.quantization == "4bit",
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0}
    model_class = getattr(transformers, family.model_class)
    try:
        model = model_class.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        # min_pixels/max_pixels, not size=: real Qwen2.5 files carry those keys and would win.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            path, min_pixels=image_cfg.min_pixels, max_pixels=image_cfg.max_pixels)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {model_cfg.id!r}: {first}") from None
    if not bitsandbytes_mode:
        model.to(device)
    model.eval().requires_grad_(False)
    if attn == "sdpa":
        from .vision_attention import use_for_vision
        use_for_vision(model)   # batched windows instead of one SDPA call per window

    def token_id(text: str) -> int:
        ids = tokenizer.convert_tokens_to_ids([text])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ModelLoadError(f"tokenizer of {model_cfg.id!r} lacks the special token {text}")
        return int(ids[0])

    special = SpecialTokens(
        im_start=token_id(families.IM_START), im_end=token_id(families.IM_END),
        end_of_text=token_id(families.END_OF_TEXT), vision_start=token_id(families.VISION_START),
        vision_end=token_id(families.VISION_END), image_pad=token_id(families.IMAGE_PAD))
    if special.image_pad != hf_config.image_token_id:
        raise ModelLoadError(f"tokenizer and model disagree on the image token id "
                             f"({special.image_pad} vs {hf_config.image_token_id})")
    patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
    if (patch, merge) != (family.patch_size, family.merge_size):
        logging.getLogger(__name__).warning(
            "%s: image processor patch %d / merge %d differ from the %s family's %d / %d; using the processor's",
            model_cfg.id, patch, merge, family.name, family.patch_size, family.merge_size)
    added = tuple(sorted({t.content for t in tokenizer.added_tokens_decoder.values()}))
    logging.getLogger(__name__).info("loaded %s (%s) on %s as %s", model_cfg.id, family.name, device, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, image_processor=image_processor, family=family,
                       model_id=model_cfg.id, path=path, special=special, device=device, dtype=dtype,
                       patch_size=patch, merge_size=merge, added_tokens=added)
