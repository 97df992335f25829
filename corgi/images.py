"""Load a user's image safely into plain RGB, and fingerprint it for the vision cache.

Sizes are checked from the file header before any pixels are decoded, so an oversized
image or a decompression bomb costs nothing. PIL's own bomb protection is left as it is.

Only the formats in ALLOWED_FORMATS are opened, chosen by content (Pillow's `formats=`), never
by the file's name: Pillow's other plugins include EPS (which runs Ghostscript), PSD, TIFF and a
long tail of rarely used parsers, none of which a chat upload needs. Error messages never carry
a path (beyond the file's own name) or a command line.

An image larger than `max_kept_pixels` is reduced at load (JPEGs decode at a reduced scale
directly), so what is kept per image is bounded by that, not by what the file declares: a few-KB
6300x6300 1-bit PNG would otherwise become a 160 MB RGB image held for the whole session.
"""
from __future__ import annotations

import errno
import hashlib
import io
import re
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]

# PNG, JPEG, WebP, GIF. (Many camera JPEGs come back as "MPO", a JPEG with extra multi-picture
# frames: Pillow's JPEG opener makes those, and the first frame is read as a plain JPEG.)
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
FORMAT_NAMES = "PNG, JPEG, WebP or GIF"
# Past this many pixels an image is reduced at load (see the module docstring). 2048x2048: a
# region a quarter of the image wide and high still has pipeline.crop_max_pixels (448x448).
DEFAULT_MAX_KEPT_PIXELS = 2048 * 2048
_PATH_LIKE = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\"]*")

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class ImageError(ValueError):
    """The input cannot be used as an image; the message is one sentence for the user."""


def load_image(source: ImageSource, max_input_pixels: int, *, max_file_mb: float | None = None,
               max_kept_pixels: int | None = DEFAULT_MAX_KEPT_PIXELS) -> Image.Image:
    """A fully loaded RGB copy of `source` (path, bytes or PIL image), upright, first frame,
    reduced to at most `max_kept_pixels` pixels (None: kept at full size).

    Raises ImageError for a missing file, a file over `max_file_mb`, data that is not an image
    in ALLOWED_FORMATS, a decompression bomb, or more than `max_input_pixels` pixels.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, max_input_pixels)
        return _to_rgb(source, max_kept_pixels)
    limit = None if max_file_mb is None else int(max_file_mb * 1024 * 1024)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("The image data is empty.")
        if limit is not None and len(source) > limit:
            raise ImageError(f"The image data is {len(source) / 2**20:.1f} MB; the limit is {max_file_mb:g} MB.")
        return _open(io.BytesIO(bytes(source)), "The image data", max_input_pixels, max_kept_pixels)
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = _short(path.name)
        try:
            if not path.is_file():
                raise ImageError(f"No image file at {_short(str(path))!r}.")
            size = path.stat().st_size
        except OSError as error:        # a name over NAME_MAX / PATH_MAX, a loop of links, ...
            raise ImageError(f"Cannot open the image file {_short(str(path))!r}: "
                             f"{error.strerror or errno.errorcode.get(error.errno, 'error')}.") from None
        if size == 0:
            raise ImageError(f"The image file {name!r} is empty.")
        if limit is not None and size > limit:
            raise ImageError(f"The file {name!r} is {size / 2**20:.1f} MB; the limit is {max_file_mb:g} MB.")
        return _open(path, f"The file {name!r}", max_input_pixels, max_kept_pixels)
    raise ImageError(f"Cannot read an image from a {type(source).__name__}.")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit // 2] + "..." + text[-(limit // 2):]


def _reason(error: BaseException) -> str:
    """An exception's message without paths (a plugin's OSError can name the server's file)."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return _short(_PATH_LIKE.sub("<file>", text), 120) or type(error).__name__


def _open(fp: io.BytesIO | Path, what: str, max_input_pixels: int, max_kept_pixels: int | None) -> Image.Image:
    try:
        # `with` closes the file: the returned image is a converted copy, detached from it.
        with Image.open(fp, formats=ALLOWED_FORMATS) as image:
            _check_size(image.size, max_input_pixels)
            return _to_rgb(image, max_kept_pixels)
    except (ImageError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL raises past twice its limit (and warns past it, an error under `-W error`).
        raise ImageError(f"{what} declares an implausibly large size (a decompression bomb).") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image format that can be read (accepted: {FORMAT_NAMES}).") from None
    except Exception as error:
        # Mostly OSError; plugins can leak other types on odd headers.
        raise ImageError(f"{what} could not be read ({_reason(error)}).") from None


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


MAX_ASPECT = 100   # the Qwen image processor refuses aspect ratios over 200:1; keep a margin


def fit_aspect(image: Image.Image, max_aspect: int = MAX_ASPECT) -> Image.Image:
    """`image`, or (when one side is over max_aspect times the other) `image` centred on a white
    canvas just wide or tall enough: what the processor accepts. Thin uploads and thin region
    crops are padded alike."""
    w, h = image.size
    if max(w, h) <= max_aspect * min(w, h):
        return image
    canvas = Image.new("RGB", (max(w, -(-h // max_aspect)), max(h, -(-w // max_aspect))), "white")
    canvas.paste(image, ((canvas.width - w) // 2, (canvas.height - h) // 2))
    return canvas


def _to_rgb(image: Image.Image, max_kept_pixels: int | None = None) -> Image.Image:
    """Decode, reduce to max_kept_pixels and convert to upright RGB; always returns a new image."""
    target = _kept_size(image.size, max_kept_pixels)
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        if target is not None and image.format in ("JPEG", "MPO"):
            image.draft(image.mode, target)     # decode at 1/2, 1/4 or 1/8 scale (not below target)
        image.load()
    except MemoryError:
        raise
    except Exception as error:
        # PIL plugins raise a zoo of types on corrupt data (OSError, SyntaxError,
        # struct.error, IndexError, ...): all mean the same thing to the user.
        raise ImageError(f"The image data is damaged or truncated ({_reason(error)}).") from None
    source = image
    try:
        if target is not None and image.size != target:
            image = _reduce(image, target)
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:
            upright = image     # malformed EXIF: the pixels are still good, just maybe sideways
        return fit_aspect(_convert(upright if upright is not None else image))
    except ValueError as error:
        raise ImageError(f"The image's colour mode {source.mode} cannot be converted ({_reason(error)}).") from None


def _kept_size(size: tuple[int, int], max_kept_pixels: int | None) -> tuple[int, int] | None:
    """The reduced size of an image over max_kept_pixels (aspect ratio kept), else None."""
    width, height = size
    if max_kept_pixels is None or width * height <= max_kept_pixels:
        return None
    scale = (max_kept_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def _reduce(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """`image` resized to `target` (area-averaged), in a mode that keeps its look: 1-bit and
    wide modes go to 8-bit grey first, palettes to RGB(A); the EXIF travels with it."""
    info, mode = dict(image.info), image.mode
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    reduced = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
    keep = ("exif", "transparency") if image.mode == mode else ("exif",)
    reduced.info = {k: v for k, v in info.items() if k in keep}
    return reduced


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
