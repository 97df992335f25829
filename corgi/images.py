"""Load a user's image safely into plain RGB, and fingerprint it for the vision cache.

Sizes are checked from the file header before any pixels are decoded, so an oversized
image or a decompression bomb costs nothing. PIL's own bomb protection is left as it is.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class ImageError(ValueError):
    """The input cannot be used as an image; the message is one sentence for the user."""


def load_image(source: ImageSource, max_input_pixels: int) -> Image.Image:
    """A fully loaded RGB copy of `source` (path, bytes or PIL image), upright, first frame.

    Raises ImageError for a missing file, data that is not a readable image, a
    decompression bomb, or more than `max_input_pixels` pixels.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, max_input_pixels)
        return _to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("The image data is empty.")
        return _open(io.BytesIO(bytes(source)), "The image data", max_input_pixels)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"No image file at {str(path)!r}.")
        if path.stat().st_size == 0:
            raise ImageError(f"The image file {path.name!r} is empty.")
        return _open(path, f"The file {path.name!r}", max_input_pixels)
    raise ImageError(f"Cannot read an image from a {type(source).__name__}.")


def _open(fp: io.BytesIO | Path, what: str, max_input_pixels: int) -> Image.Image:
    try:
        # `with` closes the file: the returned image is a converted copy, detached from it.
        with Image.open(fp) as image:
            _check_size(image.size, max_input_pixels)
            return _to_rgb(image)
    except (ImageError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL raises past twice its limit (and warns past it, an error under `-W error`).
        raise ImageError(f"{what} declares an implausibly large size (a decompression bomb).") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image format that can be read.") from None
    except Exception as error:
        # Mostly OSError; plugins can leak other types on odd headers.
        raise ImageError(f"{what} could not be read ({error}).") from None


def _check_size(size: tuple[int, int], max_input_pixels: int) -> None:
    width, height = size
    pixels = width * height
    if width <= 0 or height <= 0:
        raise ImageError(f"The image has no pixels ({width}x{height}).")
    # Our own check on PIL's limit: past it (and below twice it) PIL only warns.
    bomb_limit = Image.MAX_IMAGE_PIXELS
    if bomb_limit is not None and pixels > bomb_limit:
        raise ImageError(f"The image declares {width}x{height} pixels, "
                         "an implausibly large size (a decompression bomb).")
    if pixels > max_input_pixels:
        raise ImageError(f"The image is {width}x{height} = {pixels:,} pixels; "
                         f"the limit is {max_input_pixels:,}.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Decode and convert to upright RGB; always returns a new image."""
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        image.load()
    except MemoryError:
        raise
    except Exception as error:
        # PIL plugins raise a zoo of types on corrupt data (OSError, SyntaxError,
        # struct.error, IndexError, ...): all mean the same thing to the user.
        raise ImageError(f"The image data is damaged or truncated ({error}).") from None
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:
        upright = image     # malformed EXIF: the pixels are still good, just maybe sideways
    try:
        return _convert(upright if upright is not None else image)
    except ValueError as error:
        raise ImageError(f"The image's colour mode {image.mode} cannot be converted ({error}).") from None


def _convert(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent areas become white, as they look in a browser on a white page.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    rgb = image.convert("RGB")    # a copy even when already RGB
    rgb.info.pop("transparency", None)
    return rgb


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale -> L, scaled (convert("L") would clip to white)."""
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        low, high = (float(v) for v in image.getextrema())
        if image.mode == "F" and 0.0 <= low and high <= 1.0:
            low, high = 0.0, 1.0             # float images in 0..1
        elif 0.0 <= low and high <= 255.0:
            low, high = 0.0, 255.0           # already 8-bit values in a wide mode
        elif 0.0 <= low and high <= 65535.0:
            low, high = 0.0, 65535.0         # 16-bit PNGs open as "I" in some Pillow versions
    scale = 255.0 / (high - low) if high > low else 0.0
    wide = image.convert("F" if image.mode == "F" else "I")
    return wide.point(lambda v: (v - low) * scale).convert("L")


def image_digest(image: Image.Image) -> str:
    """sha256 hex of mode, size and raw pixel bytes: equal pixels give equal keys."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
