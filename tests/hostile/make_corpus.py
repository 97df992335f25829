"""Write the hostile-input corpus next to this script (run it again to regenerate; the output is
deterministic and committed, so the tests never depend on Pillow's encoders of the day).

    python tests/hostile/make_corpus.py

Every file is small (a few kB at most). The decompression bomb is a PNG whose header declares
100000 x 100000 pixels over an empty pixel stream: harmless to store, fatal to decode naively.
What each file is expected to do lives in cases.yaml.
"""
from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
CONFIGS = HERE / "configs"


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height (8-bit RGB), an empty IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def scene(size=(96, 64)) -> Image.Image:
    """A small picture with distinct regions (so a model has something to point at)."""
    image = Image.new("RGB", size, (235, 235, 220))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((w // 10, h // 5, w // 2, h - h // 5), fill=(200, 40, 40))
    draw.ellipse((w // 2 + 4, h // 6, w - 6, h // 2 + 6), fill=(40, 60, 200))
    draw.text((w // 2 + 2, h - h // 3), "STOP", fill=(0, 0, 0))
    return image


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def images() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    # Seeded noise (no tiny compressed form, so half the file is really half the pixels).
    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    png, jpg = encoded(noise, "PNG"), encoded(noise, "JPEG", quality=90)
    files["truncated.png"] = png[:len(png) // 2]
    files["truncated.jpg"] = jpg[:len(jpg) // 2]
    files["zero-bytes.png"] = b""
    files["text-file.jpg"] = b"This is a text file with a .jpg name, not a picture.\n"
    files["bomb.png"] = png_declaring(100_000, 100_000)
    files["one-pixel.png"] = encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")
    wide = Image.new("L", (10_000, 10), 180)
    files["wide-10000x10.png"] = encoded(wide, "PNG", optimize=True)
    cmyk = scene().convert("CMYK")
    files["cmyk.jpg"] = encoded(cmyk, "JPEG", quality=85)
    deep = Image.new("I;16", (64, 48))
    deep.putdata([(x * 1024 + y * 300) % 65536 for y in range(48) for x in range(64)])
    files["gray-16bit.png"] = encoded(deep, "PNG")
    palette = scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    corner = palette.getpixel((0, 0))                         # the background becomes transparent
    files["palette-transparent.png"] = encoded(palette, "PNG", transparency=corner)
    frames = [scene(), Image.new("RGB", (96, 64), (0, 160, 0)), Image.new("RGB", (96, 64), (0, 0, 160))]
    files["animated.gif"] = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:],
                                    duration=80, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6                                          # display rotated 90 degrees clockwise
    files["exif-rotated.jpg"] = encoded(scene((96, 48)), "JPEG", exif=exif, quality=85)
    return files


CONFIG_FILES = {
    "invalid-yaml.yaml": "model: {id: tiny-qwen2.5-vl\npipeline: [unclosed\n",
    "unknown-key.yaml": "pipeline:\n  max_stepz: 3\n",
    "wrong-type.yaml": "pipeline:\n  max_steps: many\n",
    "wrong-type-bool.yaml": "model:\n  trust_remote_code: \"yes\"\n",
    "not-a-mapping.yaml": "- just\n- a list\n",
    "negative-budget.yaml": "cache:\n  kv_cache_mb: -1\n",
    "missing-model.yaml": "model:\n  id: /nonexistent/corgi/model-folder\n",
}


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    CONFIGS.mkdir(exist_ok=True)
    for name, data in images().items():
        (IMAGES / name).write_bytes(data)
    for name, text in CONFIG_FILES.items():
        (CONFIGS / name).write_text(text, encoding="utf-8")
    total = sum(p.stat().st_size for p in [*IMAGES.iterdir(), *CONFIGS.iterdir()])
    print(f"wrote {len(list(IMAGES.iterdir()))} images and {len(CONFIG_FILES)} configs, {total / 1024:.1f} kB")


if __name__ == "__main__":
    main()
