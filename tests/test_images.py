"""Image loading edge cases, all generated with PIL in tmp_path."""
from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from corgi.images import ImageError, image_digest, load_image

LIMIT = 50_000_000
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def close_to(pixel, expected, tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height; its pixel data is empty."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))          # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6                            # "rotate 90 degrees clockwise to display"
    result = load_image(save(image, tmp_path / "rotated.jpg", exif=exif, quality=95), LIMIT)
    assert result.size == (20, 40)
    assert close_to(result.getpixel((10, 5)), RED)      # left column became the top
    assert close_to(result.getpixel((10, 35)), BLUE)


def test_cmyk_jpeg(tmp_path):
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))    # red in CMYK
    result = load_image(save(image, tmp_path / "cmyk.jpg"), LIMIT)
    assert result.mode == "RGB"
    assert close_to(result.getpixel((8, 8)), RED, 20)


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_transparency_becomes_white(tmp_path, suffix):
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 255, 0] + [0, 0, 255] + [0, 0, 0] * 254)   # index 0 green, 1 blue
    image.paste(1, (5, 0, 10, 10))
    result = load_image(save(image, tmp_path / f"palette.{suffix}", transparency=0), LIMIT)
    assert result.mode == "RGB"
    assert result.getpixel((2, 2)) == WHITE         # transparent green -> white, not green
    assert result.getpixel((7, 2)) == BLUE


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    image = Image.new("I;16", (3, 1))
    for x, value in enumerate([0, 32768, 65535]):
        image.putpixel((x, 0), value)
    result = load_image(save(image, tmp_path / "deep.png"), LIMIT)
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (0, 0, 0)
    assert close_to(result.getpixel((1, 0)), (128, 128, 128), 1)    # convert("L") would give 255
    assert result.getpixel((2, 0)) == WHITE


def test_32bit_and_float_grayscale(tmp_path):
    sixteen = Image.new("I", (2, 1))               # how older Pillows open 16-bit PNGs
    sixteen.putdata([0, 32768])
    assert close_to(load_image(sixteen, LIMIT).getpixel((1, 0)), (128, 128, 128), 1)
    wide = Image.new("I", (2, 1))
    wide.putdata([100_000, 300_000])
    result = load_image(wide, LIMIT)               # beyond 16 bits: min..max -> 0..255
    assert result.getpixel((0, 0)) == (0, 0, 0) and result.getpixel((1, 0)) == WHITE
    floats = Image.new("F", (1, 1), 0.5)
    assert close_to(load_image(floats, LIMIT).getpixel((0, 0)), (128, 128, 128), 1)


def test_rgba_and_la_are_composited_on_white(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    result = load_image(save(image, tmp_path / "alpha.png"), LIMIT)
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == WHITE
    assert result.getpixel((1, 0)) == BLUE
    assert close_to(result.getpixel((2, 0)), (127, 127, 127), 2)
    gray = Image.new("LA", (1, 1), (0, 0))
    assert load_image(gray, LIMIT).getpixel((0, 0)) == WHITE


@pytest.mark.parametrize("suffix", ["gif", "webp"])
def test_animation_gives_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, (0, 255, 0), BLUE)]
    path = tmp_path / f"anim.{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    with Image.open(path) as check:
        assert check.n_frames == 3
    result = load_image(path, LIMIT)
    assert close_to(result.getpixel((4, 4)), RED, 8)


def test_animated_pil_image_at_later_frame_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as opened:
        opened.seek(1)
        result = load_image(opened, LIMIT)
    assert close_to(result.getpixel((4, 4)), RED, 8)


@pytest.mark.parametrize("size, loaded", [((1, 1), (1, 1)), ((10000, 10), (10000, 100)), ((10, 10000), (100, 10000))])
def test_extreme_shapes(tmp_path, size, loaded):
    """Any shape loads; one over the processor's aspect limit is padded (see the test below)."""
    result = load_image(save(Image.new("L", size, 200), tmp_path / "shape.png"), LIMIT)
    assert result.size == loaded and result.mode == "RGB"
    assert result.getpixel((loaded[0] // 2, loaded[1] // 2)) == (200, 200, 200)


def test_sources_path_str_bytes_and_pil(tmp_path):
    path = save(Image.new("RGB", (4, 3), BLUE), tmp_path / "blue.png")
    from_path, from_str = load_image(path, LIMIT), load_image(str(path), LIMIT)
    from_bytes = load_image(path.read_bytes(), LIMIT)
    from_bytearray = load_image(bytearray(path.read_bytes()), LIMIT)
    digests = {image_digest(i) for i in (from_path, from_str, from_bytes, from_bytearray)}
    assert len(digests) == 1 and from_path.size == (4, 3)
    original = Image.new("RGB", (4, 3), BLUE)
    copy = load_image(original, LIMIT)
    assert copy is not original and image_digest(copy) == image_digest(original)
    copy.putpixel((0, 0), RED)
    assert original.getpixel((0, 0)) == BLUE        # the caller's image is untouched


def test_result_is_loaded_and_detached_from_the_file(tmp_path):
    path = save(Image.new("RGB", (5, 5), RED), tmp_path / "gone.png")
    result = load_image(path, LIMIT)
    path.unlink()
    assert getattr(result, "fp", None) is None
    assert result.getpixel((4, 4)) == RED


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="No image file"):
        load_image(tmp_path / "nope.jpg", LIMIT)
    with pytest.raises(ImageError, match="No image file"):
        load_image(tmp_path, LIMIT)


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg", LIMIT)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", LIMIT)


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path, LIMIT)
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"\x89PNG but not really", LIMIT)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file(tmp_path, suffix):
    noisy = Image.effect_noise((64, 64), 50).convert("RGB")      # noise: no tiny compressed form
    data = (save(noisy, tmp_path / f"full.{suffix}")).read_bytes()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageError):
        load_image(path, LIMIT)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES   # we did not weaken PIL to get here


def test_too_many_pixels_is_checked_before_decoding(tmp_path):
    data = save(Image.effect_noise((100, 100), 50).convert("RGB"), tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    # the truncated file would fail to decode; the size message proves we never got that far
    with pytest.raises(ImageError, match="limit is 5,000"):
        load_image(tmp_path / "cut.png", 5_000)
    with pytest.raises(ImageError, match="limit"):
        load_image(Image.new("RGB", (100, 100)), 9_999)
    assert load_image(Image.new("RGB", (100, 100)), 10_000).size == (100, 100)


def test_bomb_past_twice_pil_limit(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(100_000, 100_000))
    with pytest.raises(ImageError, match="bomb"):
        load_image(path, 10**12)                # our own limit would let it through
    with pytest.raises(ImageError, match="bomb"):
        load_image(path.read_bytes(), 10**12)


def test_bomb_between_pil_warning_and_error(tmp_path):
    # 10000x10000 is past MAX_IMAGE_PIXELS but below twice it: PIL only warns here
    before = Image.MAX_IMAGE_PIXELS
    data = png_declaring(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="bomb"):
            load_image(data, 10**12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)   # as under `-W error`
        with pytest.raises(ImageError, match="bomb"):
            load_image(data, 10**12)
    assert Image.MAX_IMAGE_PIXELS == before


def test_header_with_zero_size():
    with pytest.raises(ImageError):
        load_image(png_declaring(0, 10), LIMIT)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="int"):
        load_image(42, LIMIT)        # type: ignore[arg-type]
    assert issubclass(ImageError, ValueError)


def test_image_digest():
    a = Image.new("RGB", (2, 1), RED)
    b = Image.new("RGB", (2, 1), RED)
    digest = image_digest(a)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest == image_digest(b)
    b.putpixel((1, 0), (255, 0, 1))
    assert image_digest(b) != digest
    # same bytes, different shape or mode: different keys
    assert image_digest(Image.new("RGB", (1, 2), RED)) != digest
    wide, tall = Image.frombytes("L", (6, 1), a.tobytes()), Image.frombytes("L", (3, 2), a.tobytes())
    assert image_digest(wide) != image_digest(tall)
    assert image_digest(wide) != digest


# ---- formats by content, never by name (issue 13, item 2) ---------------------------------------

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")


@pytest.mark.parametrize("name, data", [
    ("photo.png", EPS),                                             # Pillow would run Ghostscript on it
    ("photo.jpg", None),                                            # a TIFF under a JPEG name
    ("photo.webp", b"8BPS" + b"\x00" * 60),                         # a PSD header
], ids=["eps-named-png", "tiff-named-jpg", "psd-named-webp"])
def test_only_allowed_formats_open_whatever_the_name(tmp_path, name, data):
    path = tmp_path / name
    if data is None:
        Image.new("RGB", (8, 8), RED).save(path, format="TIFF")
    else:
        path.write_bytes(data)
    with pytest.raises(ImageError) as error:
        load_image(path, LIMIT)
    message = str(error.value)
    assert "not an image format that can be read (accepted: PNG, JPEG, WebP or GIF)" in message, message
    assert str(tmp_path) not in message and "gs " not in message
    with pytest.raises(ImageError, match="not an image format"):
        load_image(path.read_bytes(), LIMIT)


def test_error_messages_carry_no_server_paths(tmp_path):
    path = tmp_path / "deep" / ("x" * 300) / "photo.png"
    with pytest.raises(ImageError) as error:
        load_image(path, LIMIT)
    assert len(str(error.value)) < 200                             # shortened, one line
    with pytest.raises(ImageError, match="File name too long"):    # over NAME_MAX: no traceback
        load_image("/" + "a" * 5000 + ".png", LIMIT)
    big = tmp_path / "big.png"
    save(Image.effect_noise((300, 300), 60).convert("L"), big)
    with pytest.raises(ImageError, match=r"is 0\.\d MB; the limit is 0\.01 MB"):
        load_image(big, LIMIT, max_file_mb=0.01)                   # image.max_file_mb is honoured


# ---- memory per upload (issue 13, item 1) ---------------------------------------------------------

def test_a_huge_sparse_png_is_reduced_at_load(tmp_path):
    """A few-KB 6300x6300 1-bit PNG: kept at <= max_kept_pixels (aspect kept), not as the
    160 MB RGB image its header implies."""
    path = tmp_path / "huge-1bit.png"
    image = Image.new("1", (6300, 4200), 1)
    image.paste(0, (0, 0, 3150, 4200))                             # left half black
    image.save(path, optimize=True)
    assert path.stat().st_size < 20_000
    result = load_image(path, LIMIT, max_kept_pixels=2048 * 2048)
    assert result.mode == "RGB" and result.width * result.height <= 2048 * 2048
    assert abs(result.width / result.height - 1.5) < 0.01
    assert result.getpixel((10, 10)) == (0, 0, 0) and result.getpixel((result.width - 10, 10)) == WHITE
    assert load_image(path, LIMIT, max_kept_pixels=None).size == (6300, 4200)    # opt-out kept


@pytest.mark.parametrize("mode, suffix", [("RGB", "jpg"), ("P", "png"), ("I;16", "png"), ("RGBA", "webp")])
def test_reduction_keeps_colours_orientation_and_transparency(tmp_path, mode, suffix):
    base = Image.new("RGB", (400, 200), RED)
    base.paste(BLUE, (200, 0, 400, 200))
    if mode == "P":
        image = base.quantize(4)
    elif mode == "I;16":
        image = Image.new("I;16", (400, 200), 65535)
    elif mode == "RGBA":
        image = base.convert("RGBA")
        image.paste((0, 0, 0, 0), (0, 0, 200, 200))                # left half transparent
    else:
        image = base
    exif = Image.Exif()
    exif[0x0112] = 6                                               # turn 90 degrees to display
    path = save(image, tmp_path / f"big.{suffix}", exif=exif.tobytes()) if suffix != "png" else \
        save(image, tmp_path / f"big.{suffix}")
    result = load_image(path, LIMIT, max_kept_pixels=5000)
    assert result.width * result.height <= 5000
    if suffix != "png":
        assert result.width < result.height                        # upright: EXIF applied after reducing
        top, bottom = result.getpixel((result.width // 2, 2)), result.getpixel((result.width // 2, result.height - 3))
        assert close_to(top, WHITE if mode == "RGBA" else RED, 40) and close_to(bottom, BLUE, 40), (top, bottom)
    elif mode == "P":
        assert close_to(result.getpixel((2, 2)), RED) and close_to(result.getpixel((result.width - 3, 2)), BLUE)
    else:
        assert result.getpixel((2, 2)) == WHITE


def test_a_thin_upload_is_padded_like_a_thin_crop():
    """Qwen's processor refuses aspect ratios over 200:1. A 10000x10 strip is centred on a white
    canvas of 100:1 at load (the pixels kept, nothing scaled), so it can be asked about."""
    from corgi.images import MAX_ASPECT
    strip = Image.new("RGB", (10000, 10), (255, 0, 0))
    loaded = load_image(strip, 10**8)
    assert loaded.size == (10000, 100) and max(loaded.size) <= MAX_ASPECT * min(loaded.size)
    assert loaded.getpixel((5000, 50)) == (255, 0, 0) and loaded.getpixel((5000, 0)) == (255, 255, 255)
    tall = load_image(Image.new("RGB", (3, 900), (0, 0, 255)), 10**8)
    assert tall.size == (9, 900) and tall.getpixel((4, 450)) == (0, 0, 255)
    assert load_image(Image.new("RGB", (640, 480)), 10**8).size == (640, 480)      # others as they are
