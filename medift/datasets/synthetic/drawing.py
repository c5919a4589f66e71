"""Small drawing helpers shared by the synthetic dataset generators (PIL + numpy only)."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

JPEG_QUALITY = 95  # fixed, so that a seed always gives the same bytes


def along(x: float, y: float, distance: float, angle: float) -> tuple[float, float]:
    """The point `distance` away from (x, y) in direction `angle` (radians)."""
    return x + distance * math.cos(angle), y + distance * math.sin(angle)


def disc(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: int | tuple) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def ring(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: int | tuple, width: int) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), outline=fill, width=max(1, width))


def wobbly_outline(
    cx: float,
    cy: float,
    radius: float,
    harmonics: list[tuple[float, int, float]],
    points: int = 120,
    squash: float = 1.0,
    rotation: float = 0.0,
) -> list[tuple[float, float]]:
    """Closed outline with radius `radius * (1 + sum a*sin(k*t + phase))`.

    `squash` < 1 flattens it into an ellipse-like outline, turned by `rotation`.
    """
    outline = []
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    for index in range(points):
        angle = 2 * math.pi * index / points
        scale = radius * (1 + sum(a * math.sin(k * angle + phase) for a, k, phase in harmonics))
        x, y = scale * math.cos(angle), squash * scale * math.sin(angle)
        outline.append((cx + x * cos_r - y * sin_r, cy + x * sin_r + y * cos_r))
    return outline


def ragged_polygon(
    rng: random.Random, x: float, y: float, r: float, corners: int = 7, low: float = 0.55, high: float = 1.3
) -> list[tuple[float, float]]:
    offset = rng.uniform(0, 2 * math.pi)
    return [along(x, y, r * rng.uniform(low, high), offset + 2 * math.pi * k / corners) for k in range(corners)]


def blocky_noise(np_rng: np.random.Generator, height: int, width: int, cell: int, amplitude: float) -> np.ndarray:
    """Uniform noise in [-amplitude, amplitude] made of `cell`-pixel squares, float32."""
    coarse = np_rng.uniform(-amplitude, amplitude, size=(math.ceil(height / cell), math.ceil(width / cell)))
    return np.kron(coarse, np.ones((cell, cell), dtype=np.float32))[:height, :width]


def smooth_noise(np_rng: np.random.Generator, height: int, width: int, grid: int, amplitude: float) -> np.ndarray:
    """Low-frequency noise: a `grid`-cell random field upsampled smoothly, float32."""
    coarse = np_rng.uniform(-amplitude, amplitude, size=(grid, grid)).astype(np.float32)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square max filter of half-width `radius`, by separable shifts (PIL's is far slower).

    Shifts wrap around the border, which is harmless for shapes drawn away from it.
    """
    grown = mask.copy()
    for axis in (0, 1):
        source = grown.copy()
        for shift in range(1, radius + 1):
            for signed in (shift, -shift):
                np.maximum(grown, np.roll(source, signed, axis=axis), out=grown)
    return grown


def shrink(mask: np.ndarray, radius: int) -> np.ndarray:
    return 255 - grow(255 - mask, radius)


def free_points(
    rng: random.Random, allowed: np.ndarray, count: int, margin: int, tries: int = 400
) -> list[tuple[int, int]]:
    """Up to `count` random pixels where `allowed` holds, `margin` away from the border."""
    height, width = allowed.shape
    points: list[tuple[int, int]] = []
    for _ in range(tries):
        if len(points) == count:
            break
        x, y = rng.randrange(margin, width - margin), rng.randrange(margin, height - margin)
        if allowed[y, x]:
            points.append((x, y))
    return points


def save_jpeg(image: Image.Image, path) -> None:
    """Same pixels, same bytes: fixed quality, no chroma subsampling, no metadata."""
    image.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
