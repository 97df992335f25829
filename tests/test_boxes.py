"""Box conventions per model family -> canonical boxes, repairs, padding and crops."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from corgi.boxes import MIN_SIDE, REL1000, crop, pad, pixel_convention, to_canonical
from corgi.types import Box

# Qwen2.5-VL writes pixels of its resized input, e.g. a 1288x952 photo seen at 644x476.
QWEN25 = pixel_convention(644, 476)


def approx_box(box: Box | None, expected: list[float]) -> bool:
    return box is not None and all(math.isclose(a, b, abs_tol=1e-9)
                                   for a, b in zip(box.to_list(9), expected))


@pytest.mark.parametrize("coords, convention, expected", [
    # Qwen2.5-VL: pixels of the resized input, x and y scaled separately
    ([322, 119, 644, 476], QWEN25, [0.5, 0.25, 1.0, 1.0]),
    ([0, 0, 161, 238], QWEN25, [0.0, 0.0, 0.25, 0.5]),
    # Qwen3-VL / Qwen2-VL: 0..1000 on both axes whatever the aspect ratio
    ([100, 200, 300, 400], REL1000, [0.1, 0.2, 0.3, 0.4]),
    ([0, 0, 1000, 1000], REL1000, [0.0, 0.0, 1.0, 1.0]),
    # numeric strings and floats in native units
    (["100", "200", "300", "400"], REL1000, [0.1, 0.2, 0.3, 0.4]),
    ([322.0, 119.0, 644.0, 476.0], QWEN25, [0.5, 0.25, 1.0, 1.0]),
    # already normalised 0..1 floats are taken as canonical in every family
    ([0.1, 0.2, 0.3, 0.4], REL1000, [0.1, 0.2, 0.3, 0.4]),
    ([0.1, 0.2, 0.3, 0.4], QWEN25, [0.1, 0.2, 0.3, 0.4]),
    ([0, 0.5, 1, 1.0], QWEN25, [0.0, 0.5, 1.0, 1.0]),
])
def test_to_canonical_per_family(coords, convention, expected):
    box, warning = to_canonical(coords, convention)
    assert approx_box(box, expected), box
    assert warning is None


def test_integer_zero_one_box_is_native_not_normalised():
    # [0, 0, 1, 1] has no fractional part, so it is read as 1/1000 of the image and widened.
    box, warning = to_canonical([0, 0, 1, 1], REL1000)
    assert box is not None and box.x2 - box.x1 == pytest.approx(MIN_SIDE)
    assert "zero area" in (warning or "")


@pytest.mark.parametrize("coords, convention, expected, warning_part", [
    ([300, 400, 100, 200], REL1000, [0.1, 0.2, 0.3, 0.4], "reversed"),
    ([100, 400, 300, 200], REL1000, [0.1, 0.2, 0.3, 0.4], "reversed"),
    ([-50, 100, 1200, 900], REL1000, [0.0, 0.1, 1.0, 0.9], "outside"),
    ([600, 400, 700, 500], QWEN25, [600 / 644, 400 / 476, 1.0, 1.0], "outside"),
    ([500, 500, 500, 600], REL1000, [0.495, 0.5, 0.505, 0.6], "zero area"),
    ([0, 0, 0, 0], REL1000, [0.0, 0.0, MIN_SIDE, MIN_SIDE], "zero area"),
    ([1000, 1000, 1000, 1000], REL1000, [1 - MIN_SIDE, 1 - MIN_SIDE, 1.0, 1.0], "zero area"),
])
def test_to_canonical_repairs(coords, convention, expected, warning_part):
    box, warning = to_canonical(coords, convention)
    assert approx_box(box, expected), box
    assert warning is not None and warning_part in warning


@pytest.mark.parametrize("coords", [
    [1, 2, 3], [1, 2, 3, 4, 5], [], ["a", 2, 3, 4], [None, 1, 2, 3],
    [float("nan"), 0, 1, 1], [0, 0, float("inf"), 1], [[1, 2], [3, 4]],
])
def test_to_canonical_rejects_unreadable(coords):
    box, warning = to_canonical(coords, REL1000)
    assert box is None
    assert warning


def test_boxes_entirely_outside_are_dropped():
    for coords in ([-10, -10, -5, -5], [2000, 10, 3000, 20]):
        box, warning = to_canonical(coords, REL1000)
        assert box is None and "outside" in warning


def test_repaired_boxes_are_always_valid():
    for coords in ([5, 5, 5, 5], [0, 0, 0, 0], [1000, 1000, 1000, 1000], [999, 999, 1001, 1001]):
        box, _ = to_canonical(coords, REL1000)
        assert box is not None
        assert 0.0 <= box.x1 < box.x2 <= 1.0 and 0.0 <= box.y1 < box.y2 <= 1.0
        assert box.area > 0


def test_native_coordinates_map_to_fractions_of_the_range():
    box, _ = to_canonical([322, 119, 644, 476], QWEN25)
    assert box is not None
    assert (box.x1 * QWEN25.x_range, box.y1 * QWEN25.y_range) == pytest.approx((322, 119))
    assert (box.x2 * QWEN25.x_range, box.y2 * QWEN25.y_range) == pytest.approx((644, 476))
    assert to_canonical([100, 200, 300, 400], REL1000)[0] == Box(0.1, 0.2, 0.3, 0.4)


def test_describe_names_the_ranges():
    assert "0..644" in QWEN25.describe() and "0..476" in QWEN25.describe()
    assert "1000" in REL1000.describe()


def test_pad_grows_evenly_and_clips():
    padded = pad(Box(0.4, 0.4, 0.6, 0.5), 0.5)
    assert padded.to_list() == [0.35, 0.375, 0.65, 0.525]
    assert pad(Box(0.0, 0.9, 0.2, 1.0), 1.0).to_list() == [0.0, 0.85, 0.3, 1.0]
    assert pad(Box(0.1, 0.1, 0.2, 0.2), 0.0) == Box(0.1, 0.1, 0.2, 0.2)


def test_crop_takes_the_right_pixels():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 0, 0), (100, 50, 200, 100))       # bottom-right quarter is red
    region = crop(image, Box(0.5, 0.5, 1.0, 1.0), 0.0)
    assert region.size == (100, 50)
    assert region.getcolors() == [(100 * 50, (255, 0, 0))]
    padded = crop(image, Box(0.5, 0.5, 0.75, 0.75), 0.4)   # 50x25 px grown by 40%
    assert padded.size == (70, 35)


def test_crop_is_at_least_one_pixel():
    image = Image.new("RGB", (640, 480))
    box, _ = to_canonical([500, 500, 500, 500], REL1000)
    assert box is not None
    region = crop(image, box, 0.0)
    assert region.width >= 1 and region.height >= 1


def test_crop_at_edge_of_tiny_image_is_not_empty():
    image = Image.new("RGB", (1, 1))
    box, _ = to_canonical([1000, 1000, 1000, 1000], REL1000)
    assert box is not None
    region = crop(image, box, 0.0)
    assert region.width >= 1 and region.height >= 1


def test_crop_of_a_thin_region_stays_within_the_processor_aspect_limit():
    image = Image.new("RGB", (4000, 40), "red")
    region = crop(image, Box(0.0, 0.0, 1.0, 0.05), 0.0)   # 4000 x 2 pixels
    assert max(region.size) <= 100 * min(region.size)
    assert region.getpixel((region.width // 2, region.height // 2)) == (255, 0, 0)
