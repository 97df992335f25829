"""Typed configuration loaded from YAML, validated with clear errors.

Every key is declared here with its type and default; an unknown key, a wrong type or
an out-of-range value raises ConfigError naming the key, so a typo never silently does
nothing (a defect of the implementation this replaces).
"""
from __future__ import annotations

import dataclasses
import reprlib
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .families import BY_NAME


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
MAX_CONFIG_BYTES = 1024 * 1024      # a config is a few hundred bytes; this bounds what is read

# Values in error messages: short whatever the YAML built (an alias bomb is a small file that
# expands to an exponentially large structure, and so would its repr).
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxtuple, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 60, 60, 40


def _show(value: Any) -> str:
    return _repr.repr(value)


def _key(key: Any) -> str:
    return key if isinstance(key, str) and len(key) <= 60 else _show(key)


def _short_path(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-57:]}"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem."""


@dataclass
class ModelConfig:
    # "tiny-qwen2.5-vl" / "tiny-qwen3-vl" (built offline), a hub id, or a local folder.
    id: str = "tiny-qwen2.5-vl"
    dtype: str = "auto"                  # auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    attn_implementation: str = "auto"    # auto (sdpa) | sdpa | eager | flash_attention_2
    trust_remote_code: bool = False
    # none | 8bit | 4bit (bitsandbytes, CUDA only: less memory, slower decode) | int8-decode (the
    # compiled step reads weight-only int8 copies: faster decode, more memory; needs compile)
    quantization: str = "none"
    compile: bool = False                # CUDA: static KV + CUDA-graph decoding
    # With compile on CUDA in bf16/fp16: one-token attention as the split-KV Triton kernels
    # (auto | triton) or torch ops (torch); one-row linear layers as a Triton GEMV where it times
    # faster than cuBLAS at load (auto) or always cuBLAS (cublas).
    decode_attention: str = "auto"
    decode_gemv: str = "auto"
    warmup: bool = True                  # with compile: run the shapes once at load time
    # With compile on CUDA: the vision tower's blocks torch.compile'd too (dynamic shapes, one
    # compile at load for every image and crop size).
    compile_vision: bool = True
    # local: load the model here. openai: drive an OpenAI-compatible server (vLLM, SGLang,
    # transformers serve) that serves `id`; the options above are then the server's business.
    backend: str = "local"
    base_url: str = "http://127.0.0.1:8000/v1"       # openai: the server's API root
    api_key_env: str = "OPENAI_API_KEY"  # openai: the environment variable holding the key (may be unset)
    # openai: the served model's family (its box convention, its thinking); auto: from `id`.
    family: str = "auto"
    timeout_s: float = 120.0             # openai: per request, connect to last token


@dataclass
class ImageConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 1280 * 28 * 28     # bounds the resolution fed to the model
    max_input_pixels: int = 40_000_000   # larger uploads are refused before decoding
    # Larger images are reduced at load to this many pixels: what a session keeps of an upload
    # (about 4 bytes a pixel) is bounded by it, whatever the file declares.
    max_kept_pixels: int = 2048 * 2048
    max_file_mb: float = 30.0            # larger image files are refused (CLI and UI)


@dataclass
class PipelineConfig:
    max_steps: int = 6
    max_regions: int = 6
    crop_padding: float = 0.25
    crop_max_pixels: int = 448 * 448     # resolution bound for region crops
    reasoning_max_new_tokens: int = 512
    evidence_max_new_tokens: int = 48
    synthesis_max_new_tokens: int = 256
    max_thinking_chars: int = 600
    # Phase 1+2 thinks (<think>...</think>) before its steps. false: an empty think block
    # (structured output) or the family's no-thinking prompt form (Qwen3.5 opens <think> itself).
    thinking: bool = True
    structured_output: bool = True       # grammar-constrained phases 1+2 and 4
    # Jump-forward: where the grammar allows one continuation only (keys, quotes, brackets), its
    # tokens go in as one multi-token forward instead of one model step each.
    jump_forward: bool = True
    # Prompt-lookup drafts (greedy only): tokens copied from the context are verified several
    # per forward; the output is what one-token steps give.
    prompt_lookup: bool = True
    # Qwen3.5 / 3.6: the checkpoint's MTP head drafts the token after next for phases 1+2 and 4
    # (greedy only; instead of prompt lookup there; engine/mtp.py). Off by default: random
    # weights accept no drafts, and its speed on a real checkpoint is not measured yet.
    mtp_drafts: bool = False
    temperature: float = 0.0             # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    max_question_chars: int = 4000
    # Also answer each question plainly (one phase, no steps or evidence) for comparison. It
    # runs before phase 1+2 from the same warm prefix and its tokens leave the conversation.
    plain_answer: bool = False
    plain_max_new_tokens: int = 128


@dataclass
class CacheConfig:
    enabled: bool = True                 # false: every phase re-encodes and re-reads everything
    vision_cache_mb: float = 512.0
    kv_cache_mb: float = 4096.0


@dataclass
class UIConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    idle_timeout_s: int = 1800
    max_sessions: int = 32
    max_upload_mb: float = 30.0
    # All files the UI holds (uploads, examples, outputs) together; uploads past it are refused.
    upload_quota_mb: float = 1024.0
    # Per client (its address: on loopback or behind a reverse proxy every client is one; 0 turns
    # a limit off): sessions held in the store (half of it: one client cannot hold every slot),
    # model events (turns, uploads) waiting or running at once.
    max_sessions_per_client: int = 16
    max_queued_turns_per_client: int = 8
    # Uploads one session may attach, in total (0: no cap beyond upload_quota_mb).
    session_upload_mb: float = 256.0
    # Turns running at once: the local backend runs one (one model); a server batches, so with
    # model.backend: openai this many users' turns run together.
    remote_concurrency: int = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    ui: UIConfig = field(default_factory=UIConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": {"auto", "float32", "bfloat16", "float16"},
    "model.attn_implementation": {"auto", "sdpa", "eager", "flash_attention_2"},
    "model.quantization": {"none", "8bit", "4bit", "int8-decode"},
    "model.decode_attention": {"auto", "triton", "torch"},
    "model.decode_gemv": {"auto", "cublas"},
    "model.backend": {"local", "openai"},
    "model.family": {"auto", *BY_NAME},
}
_POSITIVE = {"image.min_pixels", "image.max_pixels", "image.max_input_pixels", "image.max_file_mb",
             "image.max_kept_pixels",
             "pipeline.max_steps", "pipeline.max_regions", "pipeline.crop_max_pixels",
             "pipeline.reasoning_max_new_tokens", "pipeline.evidence_max_new_tokens",
             "pipeline.synthesis_max_new_tokens", "pipeline.max_thinking_chars", "pipeline.plain_max_new_tokens",
             "pipeline.max_question_chars", "cache.vision_cache_mb", "cache.kv_cache_mb",
             "ui.port", "ui.idle_timeout_s", "ui.max_sessions", "ui.max_upload_mb", "ui.upload_quota_mb",
             "ui.remote_concurrency", "model.timeout_s"}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{_key(unknown[0])} "
                          f"(known: {', '.join(sorted(names))})")
    values = {}
    for name, raw in data.items():
        key = f"{where}.{name}" if where else name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw, key)
        else:
            values[name] = _check_scalar(key, kind, raw)
    return cls(**values)


def _check_scalar(key: str, kind: type, raw: Any) -> Any:
    # bool is a subclass of int in Python: reject it explicitly for numeric keys.
    if kind is bool:
        ok = isinstance(raw, bool)
    elif kind is int:
        ok = isinstance(raw, int) and not isinstance(raw, bool)
    elif kind is float:
        ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
        raw = float(raw) if ok else raw
    else:
        ok = isinstance(raw, str) and raw.strip() != ""
    if not ok:
        raise ConfigError(f"config key {key} must be {kind.__name__}"
                          f"{' (non-empty)' if kind is str else ''}, got {_show(raw)}")
    if key in _CHOICES and raw not in _CHOICES[key]:
        raise ConfigError(f"config key {key} must be one of {sorted(_CHOICES[key])}, got {_show(raw)}")
    if key in _POSITIVE and raw <= 0:
        raise ConfigError(f"config key {key} must be positive, got {_show(raw)}")
    return raw


def _validate(cfg: Config) -> Config:
    if cfg.image.min_pixels > cfg.image.max_pixels:
        raise ConfigError("image.min_pixels must not exceed image.max_pixels")
    if not 0.0 <= cfg.pipeline.crop_padding <= 2.0:
        raise ConfigError("pipeline.crop_padding must be within 0..2")
    if cfg.pipeline.temperature < 0:
        raise ConfigError("pipeline.temperature must be >= 0")
    if not 0.0 < cfg.pipeline.top_p <= 1.0:
        raise ConfigError("pipeline.top_p must be within (0, 1]")
    if cfg.pipeline.max_steps > 20 or cfg.pipeline.max_regions > 20:
        raise ConfigError("pipeline.max_steps and pipeline.max_regions must be at most 20")
    for key in ("max_sessions_per_client", "max_queued_turns_per_client", "session_upload_mb"):
        if getattr(cfg.ui, key) < 0:
            raise ConfigError(f"config key ui.{key} must be 0 (no limit) or positive, got {getattr(cfg.ui, key)}")
    if cfg.model.backend == "openai" and not cfg.model.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"model.base_url must start with http:// or https://, got {_show(cfg.model.base_url)}")
    if cfg.ui.port > 65535:
        raise ConfigError("ui.port must be at most 65535")
    return cfg


def from_dict(data: dict[str, Any] | None) -> Config:
    return _validate(_build(Config, data or {}, ""))


def _read_config(path: Path) -> str:
    """The file's text. Only a regular file is read (a FIFO would block forever, /dev/zero never
    end), and at most MAX_CONFIG_BYTES of it."""
    shown = _short_path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file {shown} is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {shown} is {info.st_size:,} bytes; a config is at most "
                              f"{MAX_CONFIG_BYTES:,}")
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {shown}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {shown} is over {MAX_CONFIG_BYTES:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config file {shown}: it is not UTF-8 text") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load YAML (configs/default.yaml when path is None) and apply dotted overrides like
    {"model.id": ...}."""
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is not None:
        path = Path(path)
        text = _read_config(path)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {_short_path(path)} is not valid YAML: "
                              f"{_show(str(exc).splitlines()[0])}") from None
        except RecursionError:
            raise ConfigError(f"config file {_short_path(path)} is nested too deeply") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {_short_path(path)} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"config section {section} must be a mapping")
        data[section][key] = value
    return from_dict(data)
