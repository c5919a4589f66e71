"""Synthetic WBCAtt release: the real on-disk format, with cartoon cells that show every attribute.

Output under `out_dir` (exactly what `medift.datasets.wbcatt.read_records` reads):

    pbc_attr_v1_{train,val,test}.csv       # the real header, LF line ends, no quoting
    PBC_dataset_normal_DIB/<lowercase class>/<PREFIX>_<number>.jpg

Attributes are sampled per class from tables shaped like the real data's class-conditional
frequencies, then mixed with a uniform draw so that no attribute is fully fixed by the
label. Each attribute has its own visual channel, sized to survive a 64x64 resize:

- cell size: radius of the cell disc (big 0.40 vs small 0.27 of the image);
- cell shape: round outline vs a wobbly, lobed outline;
- cytoplasm colour: fill colour (saturated blue / pale sky blue / violet blue);
- cytoplasm texture: clear = flat fill, frosted = coarse grey speckle;
- cytoplasm vacuole: a few white holes in the cytoplasm;
- nucleus shape: disc / two lobes / three-four lobes in an arc / C-shaped band /
  kidney bean / ragged amoeboid blob;
- nuclear-cytoplasmic ratio: nucleus extent relative to the cell (0.72 vs 0.45 of radius);
- chromatin density: nucleus darkness (dark smooth vs pale mottled);
- granules (in the cytoplasm only, so the nucleus stays readable): granularity = dots
  present; type = tiny dots / medium discs / large ragged blotches; colour = dot colour.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medift.datasets import wbcatt
from medift.datasets.synthetic.drawing import (
    along,
    blocky_noise,
    disc,
    free_points,
    grow,
    ragged_polygon,
    save_jpeg,
    shrink,
    wobbly_outline,
)

SUPERSAMPLE = 2  # draw at twice the size, then downsample: smooth edges at small sizes
IMAGE_ROOT = "PBC_dataset_normal_DIB"
UNIFORM_MIX = 0.1  # share of draws from the uniform distribution, per attribute

LABEL_WEIGHTS = {"Basophil": 0.18, "Eosinophil": 0.2, "Lymphocyte": 0.18, "Monocyte": 0.18, "Neutrophil": 0.26}
IMAGE_PREFIX = {"Basophil": "BA", "Eosinophil": "EO", "Lymphocyte": "LY", "Monocyte": "MO"}

# P(value | label), shaped after the real training file (rounded, simplified).
CLASS_TABLES: dict[str, dict[str, dict[str, float]]] = {
    "Basophil": {
        "cell_size": {"big": 0.3, "small": 0.7},
        "cell_shape": {"round": 0.85, "irregular": 0.15},
        "nucleus_shape": {
            "irregular": 0.4,
            "segmented-bilobed": 0.3,
            "segmented-multilobed": 0.2,
            "unsegmented-band": 0.1,
        },
        "nuclear_cytoplasmic_ratio": {"low": 0.95, "high": 0.05},
        "chromatin_density": {"densely": 0.95, "loosely": 0.05},
        "cytoplasm_vacuole": {"no": 0.95, "yes": 0.05},
        "cytoplasm_texture": {"clear": 0.95, "frosted": 0.05},
        "cytoplasm_colour": {"light blue": 0.9, "purple blue": 0.1},
        "granularity": {"yes": 0.97, "no": 0.03},
        "granule_type": {"coarse": 0.9, "round": 0.05, "small": 0.05},
        "granule_colour": {"purple": 0.9, "red": 0.05, "pink": 0.05},
    },
    "Eosinophil": {
        "cell_size": {"big": 0.65, "small": 0.35},
        "cell_shape": {"round": 0.9, "irregular": 0.1},
        "nucleus_shape": {"segmented-bilobed": 0.7, "segmented-multilobed": 0.18, "unsegmented-band": 0.12},
        "nuclear_cytoplasmic_ratio": {"low": 1.0},
        "chromatin_density": {"densely": 0.97, "loosely": 0.03},
        "cytoplasm_vacuole": {"no": 0.97, "yes": 0.03},
        "cytoplasm_texture": {"clear": 0.95, "frosted": 0.05},
        "cytoplasm_colour": {"light blue": 0.95, "blue": 0.05},
        "granularity": {"yes": 0.98, "no": 0.02},
        "granule_type": {"round": 0.9, "coarse": 0.05, "small": 0.05},
        "granule_colour": {"red": 0.9, "pink": 0.05, "purple": 0.05},
    },
    "Lymphocyte": {
        "cell_size": {"small": 0.95, "big": 0.05},
        "cell_shape": {"round": 0.7, "irregular": 0.3},
        "nucleus_shape": {"unsegmented-round": 0.78, "unsegmented-indented": 0.18, "irregular": 0.04},
        "nuclear_cytoplasmic_ratio": {"high": 0.9, "low": 0.1},
        "chromatin_density": {"densely": 0.95, "loosely": 0.05},
        "cytoplasm_vacuole": {"no": 0.97, "yes": 0.03},
        "cytoplasm_texture": {"frosted": 0.6, "clear": 0.4},
        "cytoplasm_colour": {"blue": 0.6, "purple blue": 0.35, "light blue": 0.05},
        # Large granular lymphocytes exist: a few get small granules.
        "granularity": {"no": 0.92, "yes": 0.08},
        "granule_type": {"small": 0.8, "round": 0.1, "coarse": 0.1},
        "granule_colour": {"pink": 0.6, "purple": 0.3, "red": 0.1},
    },
    "Monocyte": {
        "cell_size": {"big": 0.85, "small": 0.15},
        "cell_shape": {"irregular": 0.55, "round": 0.45},
        "nucleus_shape": {"unsegmented-indented": 0.7, "irregular": 0.2, "unsegmented-round": 0.1},
        "nuclear_cytoplasmic_ratio": {"low": 0.9, "high": 0.1},
        "chromatin_density": {"loosely": 0.6, "densely": 0.4},
        "cytoplasm_vacuole": {"no": 0.55, "yes": 0.45},
        "cytoplasm_texture": {"frosted": 0.85, "clear": 0.15},
        "cytoplasm_colour": {"blue": 0.45, "purple blue": 0.45, "light blue": 0.1},
        "granularity": {"no": 0.92, "yes": 0.08},
        "granule_type": {"small": 0.8, "round": 0.1, "coarse": 0.1},
        "granule_colour": {"pink": 0.6, "purple": 0.3, "red": 0.1},
    },
    "Neutrophil": {
        "cell_size": {"big": 0.6, "small": 0.4},
        "cell_shape": {"round": 0.8, "irregular": 0.2},
        "nucleus_shape": {"unsegmented-band": 0.5, "segmented-multilobed": 0.3, "segmented-bilobed": 0.2},
        "nuclear_cytoplasmic_ratio": {"low": 1.0},
        "chromatin_density": {"densely": 0.97, "loosely": 0.03},
        "cytoplasm_vacuole": {"no": 0.95, "yes": 0.05},
        "cytoplasm_texture": {"clear": 0.95, "frosted": 0.05},
        "cytoplasm_colour": {"light blue": 0.95, "purple blue": 0.05},
        "granularity": {"yes": 0.97, "no": 0.03},
        "granule_type": {"small": 0.9, "round": 0.05, "coarse": 0.05},
        "granule_colour": {"pink": 0.9, "purple": 0.07, "red": 0.03},
    },
}

BACKGROUND = (238, 228, 232)
CYTOPLASM_COLOURS = {"blue": (50, 90, 215), "light blue": (180, 212, 246), "purple blue": (112, 96, 212)}
NUCLEUS_COLOURS = {"densely": (72, 14, 92), "loosely": (190, 122, 192)}
GRANULE_COLOURS = {"pink": (246, 128, 186), "purple": (84, 18, 104), "red": (222, 40, 40)}
VACUOLE_COLOUR = (252, 252, 252)
# Relative to the cell radius; relative to the image width for the cell itself.
CELL_RADIUS = {"big": 0.40, "small": 0.27}
NUCLEUS_EXTENT = {"high": 0.72, "low": 0.45}
# (radius as a share of the image width, count, ragged?) per granule type.
GRANULE_STYLE = {"small": (0.011, 45, False), "round": (0.024, 16, False), "coarse": (0.034, 11, True)}


# --- sampling ----------------------------------------------------------------------


def _draw(rng: random.Random, table: dict[str, float], vocabulary: tuple[str, ...]) -> str:
    """A draw from `table`, except a `UNIFORM_MIX` share drawn uniformly from `vocabulary`."""
    if rng.random() < UNIFORM_MIX:
        return rng.choice(vocabulary)
    values = list(table)
    return rng.choices(values, weights=[table[value] for value in values])[0]


def sample_attributes(rng: random.Random) -> dict[str, str]:
    labels = list(LABEL_WEIGHTS)
    label = rng.choices(labels, weights=[LABEL_WEIGHTS[name] for name in labels])[0]
    table = CLASS_TABLES[label]
    attributes = {"label": label}
    for key, values in wbcatt.QUESTION_OPTIONS.items():
        if key != "label":
            attributes[key] = _draw(rng, table[key], values)
    if attributes["granularity"] == "no":
        # No granules: type and colour are not applicable, as in the real files.
        attributes["granule_type"] = attributes["granule_colour"] = wbcatt.NOT_APPLICABLE
    return attributes


# --- drawing -----------------------------------------------------------------------


def _cell_mask(size: int, cx: float, cy: float, radius: float, shape: str, rng: random.Random) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    if shape == "round":
        harmonics = [(0.015, 5, rng.uniform(0, 6.3))]
    else:
        harmonics = [
            (rng.uniform(0.11, 0.15), rng.choice((3, 4, 5)), rng.uniform(0, 6.3)),
            (rng.uniform(0.05, 0.07), rng.choice((6, 7)), rng.uniform(0, 6.3)),
        ]
    ImageDraw.Draw(mask).polygon(wobbly_outline(cx, cy, radius, harmonics), fill=255)
    return mask


def _nucleus_mask(size: int, cx: float, cy: float, extent: float, shape: str, rng: random.Random) -> Image.Image:
    """A nucleus of the given shape fitting in a circle of radius about `extent`."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    theta = rng.uniform(0, 2 * math.pi)
    bridge = max(2, int(0.14 * extent))
    if shape == "unsegmented-round":
        disc(draw, cx, cy, 0.85 * extent, 255)
    elif shape == "segmented-bilobed":
        lobes = [along(cx, cy, 0.5 * extent, theta), along(cx, cy, 0.5 * extent, theta + math.pi)]
        draw.line(lobes, fill=255, width=bridge)
        for x, y in lobes:
            disc(draw, x, y, 0.46 * extent, 255)
    elif shape == "segmented-multilobed":
        count = rng.choice((3, 4))
        step = math.radians(75 if count == 3 else 62)
        lobes = [along(cx, cy, 0.58 * extent, theta + (i - (count - 1) / 2) * step) for i in range(count)]
        draw.line(lobes, fill=255, width=bridge)
        for x, y in lobes:
            disc(draw, x, y, 0.34 * extent, 255)
    elif shape == "unsegmented-band":
        # A thick C: annulus sector with rounded ends.
        radius, half_width, span = 0.6 * extent, 0.19 * extent, math.radians(230)
        start = theta - span / 2
        steps = [start + span * i / 40 for i in range(41)]
        outer = [along(cx, cy, radius + half_width, a) for a in steps]
        inner = [along(cx, cy, radius - half_width, a) for a in reversed(steps)]
        draw.polygon(outer + inner, fill=255)
        for a in (steps[0], steps[-1]):
            disc(draw, *along(cx, cy, radius, a), half_width, 255)
    elif shape == "unsegmented-indented":
        # A bean: an ellipse with a round bite out of one long side.
        draw.polygon(wobbly_outline(cx, cy, 0.88 * extent, [], squash=0.8, rotation=theta), fill=255)
        disc(draw, *along(cx, cy, 0.78 * extent, theta + math.pi / 2), 0.42 * extent, 0)
    elif shape == "irregular":
        harmonics = [
            (rng.uniform(0.18, 0.24), 2, rng.uniform(0, 6.3)),
            (rng.uniform(0.12, 0.16), 3, rng.uniform(0, 6.3)),
            (rng.uniform(0.07, 0.1), 5, rng.uniform(0, 6.3)),
            (rng.uniform(0.04, 0.06), 8, rng.uniform(0, 6.3)),
        ]
        draw.polygon(wobbly_outline(cx, cy, 0.74 * extent, harmonics), fill=255)
    else:
        raise ValueError(f"unknown nucleus shape {shape!r}")
    return mask


def _paint(canvas: np.ndarray, mask: Image.Image, layer: np.ndarray) -> None:
    alpha = (np.asarray(mask, dtype=np.float32) / 255.0)[:, :, None]
    canvas[:] = canvas * (1 - alpha) + layer * alpha


def _edge(mask: Image.Image, width: int) -> Image.Image:
    array = np.asarray(mask)
    return Image.fromarray(grow(array, width) - array)


def _noise(np_rng: np.random.Generator, size: int, cell: int, amplitude: float) -> np.ndarray:
    return blocky_noise(np_rng, size, size, cell, amplitude)[:, :, None]


def render_cell(attributes: dict[str, str], size: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE
    canvas = np.empty((big, big, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    canvas += _noise(np_rng, big, 2 * SUPERSAMPLE, 5)

    cx, cy = (big * (0.5 + rng.uniform(-0.03, 0.03)) for _ in range(2))
    radius = big * CELL_RADIUS[attributes["cell_size"]] * rng.uniform(0.96, 1.04)
    cell = _cell_mask(big, cx, cy, radius, attributes["cell_shape"], rng)
    cytoplasm = np.empty_like(canvas)
    cytoplasm[:] = CYTOPLASM_COLOURS[attributes["cytoplasm_colour"]]
    if attributes["cytoplasm_texture"] == "frosted":
        cytoplasm += _noise(np_rng, big, 2 * SUPERSAMPLE, 55)
    else:
        cytoplasm += _noise(np_rng, big, 2 * SUPERSAMPLE, 4)
    _paint(canvas, cell, cytoplasm)
    _paint(canvas, _edge(cell, SUPERSAMPLE), cytoplasm * 0.75)

    extent = radius * NUCLEUS_EXTENT[attributes["nuclear_cytoplasmic_ratio"]]
    nucleus = _nucleus_mask(big, cx, cy, extent, attributes["nucleus_shape"], rng)
    # Keep the nucleus inside a slightly shrunk cell, whatever the two outlines do.
    inner_cell = shrink(np.asarray(cell), 2 * SUPERSAMPLE)
    nucleus = Image.fromarray(np.minimum(np.asarray(nucleus), inner_cell))
    chromatin = np.empty_like(canvas)
    chromatin[:] = NUCLEUS_COLOURS[attributes["chromatin_density"]]
    mottling = 30 if attributes["chromatin_density"] == "loosely" else 6
    chromatin += _noise(np_rng, big, 3 * SUPERSAMPLE, mottling)
    _paint(canvas, nucleus, chromatin)
    _paint(canvas, _edge(nucleus, SUPERSAMPLE), chromatin * 0.6)

    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # Granules and vacuoles go in the cytoplasm only: off the nucleus, inside the cell.
    nucleus_zone = grow(np.asarray(nucleus), SUPERSAMPLE) > 0
    cytoplasm_zone = (inner_cell > 0) & ~nucleus_zone
    if attributes["granularity"] == "yes" and attributes["granule_type"] in GRANULE_STYLE:
        share, count, ragged = GRANULE_STYLE[attributes["granule_type"]]
        colour = GRANULE_COLOURS[attributes["granule_colour"]]
        granule_radius = share * big
        for x, y in free_points(rng, cytoplasm_zone, count, int(granule_radius) + 1):
            if ragged:
                draw.polygon(ragged_polygon(rng, x, y, granule_radius), fill=colour)
            else:
                disc(draw, x, y, granule_radius, colour)
    if attributes["cytoplasm_vacuole"] == "yes":
        hole = 0.032 * big
        for x, y in free_points(rng, cytoplasm_zone, rng.randint(3, 5), int(hole) + 1):
            disc(draw, x, y, hole, VACUOLE_COLOUR)
    return image.resize((size, size), Image.LANCZOS)


# --- writing -----------------------------------------------------------------------


def _image_name(label: str, nucleus_shape: str, number: int) -> str:
    if label == "Neutrophil":
        # The PBC release names band neutrophils BNE_ and segmented ones SNE_.
        prefix = "BNE" if nucleus_shape == "unsegmented-band" else "SNE"
    else:
        prefix = IMAGE_PREFIX[label]
    return f"{prefix}_{number}.jpg"


def write_synthetic(out_dir: Path, seed: int, n_train: int, n_val: int, n_test: int, image_size: int = 96) -> None:
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    number = 100000
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        for _ in range(count):
            number += 1
            attributes = sample_attributes(rng)
            name = _image_name(attributes["label"], attributes["nucleus_shape"], number)
            relative = f"{IMAGE_ROOT}/{attributes['label'].lower()}/{name}"
            image_path = out_dir / relative
            image_path.parent.mkdir(parents=True, exist_ok=True)
            image = render_cell(attributes, image_size, seed=rng.getrandbits(63))
            save_jpeg(image, image_path)
            rows.append({**attributes, "img_name": name, "path": relative})
        csv_path = out_dir / wbcatt.SPLIT_FILES[split]
        with csv_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(wbcatt.CSV_HEADER)
            writer.writerows([row[column] for column in wbcatt.CSV_HEADER] for row in rows)
