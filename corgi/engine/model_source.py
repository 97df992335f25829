"""Where a model id points, decided without importing torch or transformers, so that a wrong id
is answered in a fraction of a second (the CLI checks it before loading anything heavy)."""
from __future__ import annotations

import os

from .tiny import default_cache_dir, is_tiny_name


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why in one line."""


def model_source(model_id: str) -> str:
    """"tiny" (an embedded twin, built once into the cache), "folder" (a local checkpoint), or
    "hub" (an id shaped like org/name, for from_pretrained); anything else is ModelLoadError."""
    if is_tiny_name(model_id):
        check_twin_cache(model_id)
        return "tiny"
    shown = _short(model_id)
    try:
        if os.path.isdir(model_id):
            return "folder"
        if os.path.lexists(model_id):       # a file, a broken link: not a checkpoint, and not a hub id
            raise ModelLoadError(f"model {shown} is not a folder: give a checkpoint folder, a hub id "
                                 "(org/name) or a twin name")
    except (OSError, ValueError) as exc:    # a name over PATH_MAX, a NUL byte
        raise ModelLoadError(f"model {shown} cannot be used: {getattr(exc, 'strerror', None) or exc}") from None
    looks_like_hub_id = model_id.count("/") == 1 and not model_id.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"model folder not found: {shown}")
    return "hub"


def check_twin_cache(name: str) -> None:
    """The twin cache ($CORGI_CACHE or ~/.cache/corgi) must be a folder this process can write,
    unless the twin is already built there (a read-only cache of built twins is fine)."""
    root = default_cache_dir()
    shown = f"{_short(str(root))} (CORGI_CACHE)" if os.environ.get("CORGI_CACHE") else _short(str(root))
    try:
        built = root / "tiny"
        if built.is_dir() and any(p.name.startswith(f"{name}-v") and (p / "model.safetensors").is_file()
                                  for p in built.iterdir()):
            return
        probe = root
        while not probe.exists():           # the nearest existing ancestor decides
            probe = probe.parent
        if not probe.is_dir():
            raise ModelLoadError(f"cannot build the twin {name}: the cache {shown} is inside a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ModelLoadError(f"cannot build the twin {name}: the cache {shown} is not writable")
    except OSError as exc:
        raise ModelLoadError(f"cannot build the twin {name}: the cache {shown} cannot be used "
                             f"({exc.strerror or type(exc).__name__})") from None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:60]}...{text[-57:]}"

