"""Where a model id points, decided without importing torch or transformers, so that a wrong id
is answered in a fraction of a second (the CLI checks it before loading anything heavy)."""
from __future__ import annotations

import os

from .tiny import is_tiny_name


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why in one line."""


def model_source(model_id: str) -> str:
    """"tiny" (an embedded twin, built once into the cache), "folder" (a local checkpoint), or
    "hub" (an id shaped like org/name, for from_pretrained); anything else is ModelLoadError."""
    if is_tiny_name(model_id):
        return "tiny"
    if os.path.isdir(model_id):
        return "folder"
    looks_like_hub_id = model_id.count("/") == 1 and not model_id.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"model folder not found: {model_id}")
    return "hub"
