"""Pictures for the browser as files this app writes once: named by their content, written
atomically, never rewritten.

Handing Gradio a file path (instead of a PIL image) means its own postprocess only copies the
file into its cache, by a hash of the bytes and with a rename into place; a PIL image would be
re-encoded, and (6.31) rewritten in place, on every streamed update, while a browser may be
reading the previous copy."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image


def save_jpeg(image: Image.Image, folder: str | Path, name: str = "image", quality: int = 88) -> str:
    """`image` as a JPEG file under `folder`, named by its content; an existing one is reused."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    path = Path(folder) / f"{name}-{hashlib.sha256(data).hexdigest()[:20]}.jpg"
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    return str(path)
