"""Draws the example images in this folder (our own work, CC0). Run: python assets/make_assets.py"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).parent


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def street_scene() -> Image.Image:
    im = Image.new("RGB", (640, 448), (135, 190, 235))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 300, 640, 448), fill=(90, 90, 95))                  # road
    d.rectangle((0, 290, 640, 300), fill=(200, 200, 200))               # kerb
    for x in range(20, 640, 90):
        d.rectangle((x, 370, x + 50, 378), fill=(240, 240, 240))        # lane marks
    d.rectangle((60, 150, 230, 290), fill=(170, 60, 50))                # house
    d.polygon([(45, 150), (145, 80), (245, 150)], fill=(90, 40, 30))    # roof
    d.rectangle((125, 220, 165, 290), fill=(80, 50, 30))                # door
    d.rectangle((430, 120, 438, 300), fill=(60, 60, 60))                # sign pole
    d.regular_polygon((434, 110, 45), 8, fill=(200, 20, 20), outline="white")
    d.text((434, 110), "STOP", fill="white", font=font(22), anchor="mm")
    d.rectangle((300, 250, 400, 285), fill=(30, 80, 200))               # car body
    d.rectangle((320, 228, 380, 252), fill=(30, 80, 200))
    d.ellipse((310, 275, 335, 300), fill="black")
    d.ellipse((365, 275, 390, 300), fill="black")
    d.ellipse((540, 30, 600, 90), fill=(250, 220, 60))                  # sun
    return im


def receipt() -> Image.Image:
    im = Image.new("RGB", (360, 520), (245, 245, 240))
    d = ImageDraw.Draw(im)
    lines = ["CORGI CAFE", "", "Espresso        2.50", "Croissant       3.10",
             "Orange juice    4.00", "", "TOTAL           9.60", "", "Thank you!"]
    for i, line in enumerate(lines):
        d.text((30, 40 + i * 48), line, fill=(20, 20, 20), font=font(24))
    return im


def shapes() -> Image.Image:
    im = Image.new("RGB", (512, 384), "white")
    d = ImageDraw.Draw(im)
    d.ellipse((40, 60, 180, 200), fill=(220, 40, 40))
    d.rectangle((220, 80, 330, 300), fill=(40, 160, 60))
    d.polygon([(380, 300), (440, 80), (500, 300)], fill=(40, 80, 220))
    d.text((60, 330), "3 shapes: circle, rectangle, triangle", fill="black", font=font(18))
    return im


if __name__ == "__main__":
    street_scene().save(HERE / "street-scene.png", optimize=True)
    receipt().save(HERE / "receipt.png", optimize=True)
    shapes().save(HERE / "shapes.png", optimize=True)
