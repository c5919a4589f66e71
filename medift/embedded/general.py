"""The synthetic general-domain instruction set that teaches the embedded base model
to follow instructions before it ever sees a medical image.

Images are single drawn objects; their attributes are deliberately *not* the medical
ones, but use the same visual primitives (size, colour, dots, outlines) and the same
answer formats: multiple choice in the evaluation template, describe requests that
answer with comma-separated attribute phrases, and yes/no questions.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": ("big", "small"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange"),
    "shape": ("circle", "square", "triangle", "diamond", "cross", "ring"),
    "pattern": ("plain", "striped", "dotted"),
    "shadow": ("yes", "no"),
}
QUESTION_TEXT = {key: f"What is the {key}?" for key in ATTRIBUTES}
DESCRIBE_REQUESTS = ("Describe this image.", "Describe the object.", "What do you see?")

_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
}


def sample_attributes(rng: random.Random) -> dict[str, str]:
    return {key: rng.choice(values) for key, values in ATTRIBUTES.items()}


def describe(attributes: dict[str, str]) -> str:
    """Same phrase rules as the medical descriptions: `yes` gives the bare key, `no` is dropped."""
    phrases = []
    for key, value in attributes.items():
        if value == "no":
            continue
        phrases.append(key if value == "yes" else f"{value} {key}")
    return ", ".join(phrases)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        w = r / 3
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(shape)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, fill, hole=(245, 245, 240)) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, fill=fill)
        inner = r * 0.45
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=hole)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def render(attributes: dict[str, str], rng: random.Random, size: int = 64) -> Image.Image:
    """Draw the object so that every attribute is visible at `size` pixels."""
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    r = size * (0.36 if attributes["size"] == "big" else 0.19)
    jitter = size * 0.5 - r - 2
    cx = size / 2 + rng.uniform(-1, 1) * max(jitter, 0) * 0.5
    cy = size / 2 + rng.uniform(-1, 1) * max(jitter, 0) * 0.5
    color = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in _RGB[attributes["color"]])
    if attributes["shadow"] == "yes":
        off = max(2, size // 16)
        _draw_shape(draw, attributes["shape"], cx + off, cy + off, r, (60, 60, 60))
    _draw_shape(draw, attributes["shape"], cx, cy, r, color)
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), attributes["shape"], cx, cy, r, 255, hole=0)
    overlay = Image.new("RGB", (size, size), (255, 255, 255))
    odraw = ImageDraw.Draw(overlay)
    if attributes["pattern"] == "striped":
        for x in range(0, size, 6):
            odraw.rectangle((x, 0, x + 1, size), fill=(20, 20, 20))
    elif attributes["pattern"] == "dotted":
        for x in range(2, size, 7):
            for y in range(2, size, 7):
                odraw.ellipse((x, y, x + 2, y + 2), fill=(20, 20, 20))
    if attributes["pattern"] != "plain":
        pattern_mask = Image.eval(overlay.convert("L"), lambda v: 255 if v < 128 else 0)
        both = Image.composite(pattern_mask, Image.new("L", (size, size), 0), mask)
        image.paste((20, 20, 20), (0, 0), both)
    return image
