"""Box coordinate conventions -> one canonical form, and crops.

Canonical: normalised 0..1 of the original image, origin top-left (`types.Box`).
Each Qwen family writes boxes its own way (see shared notes):
  Qwen2.5-VL  absolute pixels of the *resized* model input (0..grid_w*14, 0..grid_h*14)
  Qwen3-VL    integers 0..1000 relative to the image
  Qwen2-VL    integers 0..1000 relative to the image
Resizing keeps the aspect ratio up to rounding, so pixel/resized_size is the normalised value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from .images import fit_aspect
from .types import Box, Step, StepKind

MIN_SIDE = 0.01   # canonical units; a zero-area box is widened to this around its centre


@dataclass(frozen=True)
class BoxConvention:
    """How one model writes coordinates: integers in [0, x_range] x [0, y_range]."""
    name: str          # "pixels" | "rel1000"
    x_range: int
    y_range: int

    def describe(self) -> str:
        if self.name == "pixels":
            return (f"integer pixel coordinates of the image as you see it, "
                    f"x in 0..{self.x_range}, y in 0..{self.y_range}")
        return "integer coordinates relative to the image, scaled 0..1000 on both axes"


REL1000 = BoxConvention("rel1000", 1000, 1000)


def pixel_convention(resized_width: int, resized_height: int) -> BoxConvention:
    return BoxConvention("pixels", resized_width, resized_height)


def convention_for(box_style: str, resized: tuple[int, int]) -> BoxConvention:
    """The convention of a family's box style (families.Family.box_style) for an image the
    model sees at `resized` = (width, height) pixels."""
    if box_style == "pixels":
        return pixel_convention(*resized)
    if box_style == "rel1000":
        return REL1000
    raise ValueError(f"unknown box style {box_style!r}")


def to_canonical(coords: Sequence[float], convention: BoxConvention) -> tuple[Box | None, str | None]:
    """Model coordinates -> canonical Box, repairing what can be repaired.

    Returns (box, warning). box is None when the input cannot be read as a box at all.
    Values that are all within 0..1 with a fractional part are taken as already normalised,
    whatever the family: small models drift between conventions.
    """
    try:
        values = [float(v) for v in coords]
    except (TypeError, ValueError):
        return None, f"box {coords!r} is not numeric"
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None, f"box {coords!r} does not have four finite numbers"
    warnings = []
    if all(0.0 <= v <= 1.0 for v in values) and any(v != int(v) for v in values):
        x1, y1, x2, y2 = values
    else:
        x1, x2 = values[0] / convention.x_range, values[2] / convention.x_range
        y1, y2 = values[1] / convention.y_range, values[3] / convention.y_range
    if x1 > x2 or y1 > y2:
        warnings.append("reversed corners swapped")
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
    if x1 > 1.0 or y1 > 1.0 or x2 < 0.0 or y2 < 0.0:
        return None, f"box {_short(coords)} lies entirely outside the image"
    clamped = [min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2)]
    if clamped != [x1, y1, x2, y2]:
        warnings.append("went partly outside the image, clamped")
        x1, y1, x2, y2 = clamped
    if x2 - x1 < MIN_SIDE or y2 - y1 < MIN_SIDE:
        warnings.append("zero area, widened around its centre")
        x1, x2 = _widen(x1, x2)
        y1, y2 = _widen(y1, y2)
    warning = f"box {_short(coords)}: {'; '.join(warnings)}" if warnings else None
    return Box(x1, y1, x2, y2), warning


def _short(coords: Sequence[float]) -> str:
    text = repr(list(coords)) if isinstance(coords, (list, tuple)) else repr(coords)
    return text if len(text) <= 60 else text[:57] + "..."


def _widen(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo >= MIN_SIDE:
        return lo, hi
    centre = min(max((lo + hi) / 2, MIN_SIDE / 2), 1 - MIN_SIDE / 2)
    return centre - MIN_SIDE / 2, centre + MIN_SIDE / 2


def pad(box: Box, fraction: float) -> Box:
    """Grow the box by `fraction` of its size (split evenly on each side), clipped to the image."""
    dx = (box.x2 - box.x1) * fraction / 2
    dy = (box.y2 - box.y1) * fraction / 2
    return Box(max(0.0, box.x1 - dx), max(0.0, box.y1 - dy),
               min(1.0, box.x2 + dx), min(1.0, box.y2 + dy))


def crop(image: Image.Image, box: Box, padding: float) -> Image.Image:
    """The padded region of the original image: at least 1x1 pixel, aspect ratio at most
    images.MAX_ASPECT (a thin region is centred on a white canvas so the processor accepts it)."""
    x1, y1, x2, y2 = pad(box, padding).to_pixels(image.width, image.height)
    x1, y1 = min(x1, image.width - 1), min(y1, image.height - 1)
    x2, y2 = min(max(x2, x1 + 1), image.width), min(max(y2, y1 + 1), image.height)
    return fit_aspect(image.crop((x1, y1, x2, y2)))


def grounded_steps(steps: list[Step], max_regions: int | None) -> list[Step]:
    """The steps whose regions phase 3 examines, in order: those with a box that look at an
    object or read text, at most `max_regions`."""
    grounded = [s for s in steps if s.bbox is not None and s.kind != StepKind.REASONING]
    return grounded if max_regions is None else grounded[:max_regions]
