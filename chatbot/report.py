"""A whole conversation as one self-contained HTML file: model, settings, images, and per turn
the question, the image(s) with boxes drawn, steps, region crops with their captions, the
answer, warnings, timings and cache figures.

No external URLs and no JavaScript: images are inlined as base64 JPEG data URIs, the CSS is
one <style> block, and a Content-Security-Policy forbids loading anything else. Every string
the model (or the user) wrote is passed through html.escape: text read from an image may hold
markup, and here it must stay text.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any

from PIL import Image

from corgi import boxes
from corgi.types import Box, StepKind, TurnResult

from . import render

JPEG_QUALITY = 85
PHASE_ORDER = ("plain", "reasoning", "evidence", "synthesis")

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1f2937; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 2px solid #e5e7eb; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
.noise { background: #fef3c7; border: 1px solid #f59e0b; padding: .6em .8em; border-radius: 6px; }
table { border-collapse: collapse; font-size: .9em; } td, th { border: 1px solid #e5e7eb; padding: .2em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tables { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
img { height: auto; }
figure { margin: .5em 0; break-inside: avoid; } figcaption { font-size: .9em; color: #4b5563; }
figure.image img { max-width: 100%; max-height: 80vh; border: 1px solid #d1d5db; }
.crops, .thumbs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.crops figure { width: 240px; } .thumbs img { max-height: 200px; width: auto; border: 1px solid #d1d5db; }
.crops img { width: 240px; height: 180px; object-fit: contain; background: #f3f4f6; border: 1px solid #d1d5db; }
.question { font-size: 1.15em; font-weight: 600; white-space: pre-wrap; }
.answer { font-size: 1.1em; font-weight: 600; white-space: pre-wrap; } .pre { white-space: pre-wrap; }
ol.steps { list-style: none; padding-left: 0; } ol.steps li { margin: .25em 0; }
.tag { display: inline-block; min-width: 2.2em; font-weight: 700; }
.coords { color: #6b7280; font-size: .85em; font-family: ui-monospace, monospace; }
.legend span { font-weight: 600; } .red { color: #dc2626; } .blue { color: #2563eb; } .green { color: #16a34a; } .muted { color: #6b7280; }
.turn { border-top: 1px solid #e5e7eb; }
@media print { body { margin: 0; max-width: none; } .turn { break-before: page; } figure.image img { max-height: 60vh; } }
"""


def report_html(model: dict[str, str], settings: dict[str, Any],
                images: list[tuple[str, Image.Image]], results: list[TurnResult],
                sections: dict | None = None) -> str:
    """The conversation as one HTML document (a str), viewable offline and printable.

    `images` are the conversation's images in order, as (name, image): Box.image and
    TurnResult.images index into it. `settings` maps PipelineConfig fields to values.
    `sections`: a dict the caller keeps across calls for one conversation. The UI rewrites the
    report after every turn, and a turn's section (its pictures drawn and JPEG-encoded) costs
    tens of ms; kept here, each turn and each image thumbnail is rendered once instead of once
    per later turn."""
    padding = float(settings.get("crop_padding", 0.0))
    twin = bool(model.get("twin"))
    sections = {} if sections is None else sections
    title = f"CoRGI report: {model.get('id', 'model')}"
    body = [_header(model, settings, images, sections)]
    for n, result in enumerate(results, 1):
        # Turn n is the same section while its result is the same object (a regenerated turn is
        # a new one) and the padding and noise note are too; joined images only add indices.
        kept = sections.get(n)
        if kept is None or kept[0] is not result or kept[1:3] != (padding, twin):
            kept = sections[n] = (result, padding, twin, _turn(n, result, images, padding, twin))
        body.append(kept[3])
    if not results:
        body.append("<p class='muted'>No questions were asked in this conversation.</p>")
    return ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">\n"
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ---- header: model, settings, images ---------------------------------------------------

def _header(model: dict[str, str], settings: dict[str, Any], images: list[tuple[str, Image.Image]],
            sections: dict) -> str:
    rows = [(key, model.get(key, "")) for key in ("id", "family", "dtype", "device")]
    parts = ["<h1>CoRGI conversation report</h1>"]
    if model.get("twin"):
        parts.append("<p class='noise'><b>This model has random weights: its words are noise.</b> It is an "
                     "embedded twin (real tokenizer, random weights) that runs every code path but cannot "
                     "see. The steps, boxes, captions and answers below show the pipeline working, not "
                     "what is in the images.</p>")
    parts.append("<div class='tables'>")
    parts.append("<div><h3>Model</h3>" + _table(rows) + "</div>")
    parts.append("<div><h3>Settings</h3>" + _table(sorted(settings.items())) + "</div>")
    parts.append("</div>")
    parts.append(f"<h2>Images ({len(images)})</h2>\n<div class='thumbs'>")
    for i, (name, image) in enumerate(images):
        kept = sections.get(("image", i))         # the same picture under the same name: kept
        if kept is None or kept[0] is not image or kept[1] != name:
            kept = sections[("image", i)] = (image, name, _figure(
                render.display_size(image), f"Image {i + 1}: {name}", f"{image.width}x{image.height} px", css="thumb"))
        parts.append(kept[2])
    parts.append("</div>")
    return "\n".join(parts)


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


# ---- one turn ---------------------------------------------------------------------------

def _turn(n: int, result: TurnResult, images: list[tuple[str, Image.Image]], padding: float, twin: bool) -> str:
    parts = [f"<section class='turn'>\n<h2>Turn {n}</h2>",
             f"<p class='question'>{_e(result.question)}</p>"]
    parts.append(_turn_images(result, images))
    parts.append(_steps(result, images))
    parts.append(_crops(result, images, padding))
    parts.append(_answer(result, images, twin))
    if result.warnings:
        parts.append(f"<h3>Warnings ({len(result.warnings)})</h3>")
        parts.append("<ul>" + "".join(f"<li>{_e(w)}</li>" for w in result.warnings) + "</ul>")
    parts.append(_figures(result))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _turn_images(result: TurnResult, images: list[tuple[str, Image.Image]]) -> str:
    """Each image the turn is about (or that one of its boxes is on), with the boxes drawn."""
    on = set(result.images) | {s.bbox.image for s in result.steps if s.bbox is not None}
    on |= {k.bbox.image for k in result.key_evidence if k.bbox is not None}
    parts = ["<p class='legend muted'>Boxes: <span class='red'>red</span> object steps, "
             "<span class='blue'>blue</span> text steps, "
             "<span class='green'>green</span> key evidence (K1, K2...).</p>"]
    for i in sorted(on):
        if not 0 <= i < len(images):
            parts.append(f"<p class='muted'>(image {i + 1} is not in this report)</p>")
            continue
        name, image = images[i]
        steps = [s for s in result.steps if s.bbox is not None and s.bbox.image == i]
        keys = [(k, key) for k, key in enumerate(result.key_evidence, 1) if key.bbox is not None and key.bbox.image == i]
        picture = render.draw_boxes(image, steps, keys)
        parts.append(_figure(picture, f"Image {i + 1}: {name}"))
    return "\n".join(parts)


def _steps(result: TurnResult, images: list[tuple[str, Image.Image]]) -> str:
    if not result.steps:
        return "<h3>Steps</h3>\n<p class='muted'>No reasoning steps could be read from the model's output.</p>"
    items = []
    for step in result.steps:
        where = f" <span class='coords'>{_box_text(step.bbox, images)}</span>" if step.bbox else ""
        items.append(f"<li><span class='tag'>S{step.index}</span> <i>{_e(step.kind.value)}</i>: "
                     f"{_e(step.statement)}{where}</li>")
    return f"<h3>Steps ({len(result.steps)})</h3>\n<ol class='steps'>" + "".join(items) + "</ol>"


def _box_text(box: Box, images: list[tuple[str, Image.Image]]) -> str:
    """'box [x1, y1, x2, y2] on image N' (normalised 0..1; the image named when there are several)."""
    text = "box [" + ", ".join(f"{v:.3f}" for v in box.to_list()) + "]"
    if len(images) > 1:
        text += f" on image {box.image + 1}"
    return _e(text)


def _crops(result: TurnResult, images: list[tuple[str, Image.Image]], padding: float) -> str:
    """Each region as the model saw it (cropped with the same padding) and what it read there."""
    if not result.evidence:
        return ""
    figures = []
    for e in result.evidence:
        verb = "reads" if e.kind == StepKind.TEXT else "sees"
        caption = f"S{e.step_index} {verb}: {e.text or '(nothing found)'}"
        if 0 <= e.bbox.image < len(images):
            crop = render.display_size(boxes.crop(images[e.bbox.image][1], e.bbox, padding), render.CROP_LONG_SIDE)
            figures.append(_figure(crop, caption, css="crop"))
        else:
            figures.append(f"<figure class='crop'><figcaption>{_e(caption)}</figcaption></figure>")
    return f"<h3>Regions ({len(result.evidence)})</h3>\n<div class='crops'>" + "\n".join(figures) + "</div>"


def _answer(result: TurnResult, images: list[tuple[str, Image.Image]], twin: bool) -> str:
    parts = ["<h3>Answer</h3>", f"<p class='answer'>{_e(result.answer) or '(no answer)'}</p>"]
    if twin:
        parts.append("<p class='muted'><i>Random-weight twin: this answer is noise.</i></p>")
    if result.explanation:
        parts.append(f"<p class='pre'>{_e(result.explanation)}</p>")
    if result.key_evidence:
        items = []
        for k, key in enumerate(result.key_evidence, 1):
            where = f" <span class='coords'>{_box_text(key.bbox, images)}</span>" if key.bbox else ""
            items.append(f"<li><span class='tag'>K{k}</span> {_e(key.text)}{where}</li>")
        parts.append("<h3>Key evidence</h3>\n<ol class='steps'>" + "".join(items) + "</ol>")
    if result.plain_answer is not None:
        seconds = result.timings.get("plain")
        took = f" <span class='muted'>({render.seconds_text(seconds)})</span>" if seconds is not None else ""
        parts.append(f"<h3>Plain answer (one phase, no grounding){took}</h3>")
        parts.append(f"<p class='pre'>{_e(result.plain_answer) or '(empty)'}</p>")
    return "\n".join(parts)


def _figures(result: TurnResult) -> str:
    """Timings (one duration format) and cache counters side by side."""
    phases = [p for p in PHASE_ORDER if p in result.timings]
    phases += [p for p in result.timings if p not in phases and p != "total"]
    if "total" in result.timings:
        phases.append("total")
    times = "".join(f"<tr><th>{_e(p)}</th><td class='num'>{render.seconds_text(result.timings[p])}</td></tr>" for p in phases)
    counts = "".join(f"<tr><th>{_e(k.replace('_', ' '))}</th><td class='num'>{_e(v)}</td></tr>"
                     for k, v in result.cache.to_json().items())
    return ("<div class='tables'>"
            f"<div><h3>Timings</h3><table>{times}</table></div>"
            f"<div><h3>Cache</h3><table>{counts}</table></div></div>")


# ---- small helpers ----------------------------------------------------------------------

def _figure(image: Image.Image, caption: str, note: str = "", css: str = "image") -> str:
    extra = f" <span class='muted'>{_e(note)}</span>" if note else ""
    return (f"<figure class='{css}'><img src='{_data_uri(image)}' alt='' "
            f"width='{image.width}' height='{image.height}'>"
            f"<figcaption>{_e(caption)}{extra}</figcaption></figure>")


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
