"""Synthetic SKINCON release: the real on-disk formats, with drawn skin lesions.

Output under `out_dir` (exactly what `medift.datasets.skincon.read_records` reads):

    annotations_fitzpatrick17k.csv         # unnamed index column, ImageID, 48 concepts,
    annotations_ddi.csv                    #   "Do not consider this image"
    fitzpatrick17k/fitzpatrick17k.csv      # the Fitzpatrick17k metadata header
    fitzpatrick17k/<md5hash>.jpg
    ddi/ddi_metadata.csv                   # the DDI metadata header (unnamed index column)
    ddi/<000001>.png

Row counts: `n_train + n_val + n_test` images are described (SKINCON has no official
split; the reader splits 80/10/10 by image), about 85 % in the Fitzpatrick part and 15 %
in the DDI part. On top, about one row in eight is flagged "Do not consider this image"
(the real files flag 460 of 3,690 and 20 of 656); those rows have images too. The
Fitzpatrick annotations are integers 0/1; in the DDI file the flagged rows' concept cells
are blank (NaN), so pandas wrote that file's concepts as 0.0/1.0, as it does with NaN.

Concepts are sampled with structure: one primary morphology (papule, plaque, nodule,
macule, ...), then colours and surface features with their own rates, some tied to the
morphology (pustules are yellow, comedones black, vesicles translucent). Every concept has
a visual channel on a skin-toned background (six Fitzpatrick-like tones): morphology sets
the lesion's size, count and outline; colours tint it; surface concepts add marks (scale
flakes, crust, ulcer crater, scratches, cracks, vessels, a central dip, a stalk, ...).
"""

from __future__ import annotations

import csv
import hashlib
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medift.datasets import skincon
from medift.datasets.synthetic.drawing import along, disc, ragged_polygon, save_jpeg, smooth_noise, wobbly_outline

SUPERSAMPLE = 2
DDI_SHARE = 0.15
FLAGGED_SHARE = 0.125
SKIN_TONES = ((246, 222, 200), (234, 198, 168), (210, 166, 128), (176, 128, 92), (130, 88, 60), (88, 58, 40))
FITZPATRICK_HEADER = (
    "md5hash",
    "fitzpatrick_scale",
    "fitzpatrick_centaur",
    "label",
    "nine_partition_label",
    "three_partition_label",
    "qc",
    "url",
    "url_alphanum",
)
DDI_HEADER = ("", "DDI_ID", "DDI_file", "skin_tone", "malignant", "disease")
DISEASES = (
    "psoriasis",
    "basal cell carcinoma",
    "acne vulgaris",
    "lichen planus",
    "melanoma",
    "seborrheic keratosis",
    "folliculitis",
    "eczema",
)

# Primary morphology and its share; (lesion radius as a share of the image, lesion count).
PRIMARY = {
    "Papule": 0.24,
    "Plaque": 0.18,
    "Nodule": 0.12,
    "Macule": 0.08,
    "Patch": 0.07,
    "Vesicle": 0.04,
    "Bulla": 0.04,
    "Pustule": 0.05,
    "Abscess": 0.02,
    "Cyst": 0.03,
    "Wheal": 0.03,
    "Ulcer": 0.04,
    "Comedo": 0.03,
    "Burrow": 0.03,
}
LAYOUT = {
    "Papule": (0.07, 5),
    "Plaque": (0.3, 1),
    "Nodule": (0.22, 1),
    "Macule": (0.09, 3),
    "Patch": (0.32, 1),
    "Vesicle": (0.05, 7),
    "Bulla": (0.22, 1),
    "Pustule": (0.045, 7),
    "Abscess": (0.24, 1),
    "Cyst": (0.2, 1),
    "Wheal": (0.26, 1),
    "Ulcer": (0.24, 1),
    "Comedo": (0.03, 9),
    "Burrow": (0.25, 1),
}
# Secondary concepts: base rate, and extra rate given a primary morphology.
SECONDARY = {
    "Erythema": (0.45, {"Abscess": 0.5, "Pustule": 0.3, "Wheal": 0.4}),
    "Brown(Hyperpigmentation)": (0.22, {"Macule": 0.4, "Patch": 0.3}),
    "Scale": (0.15, {"Plaque": 0.45}),
    "Crust": (0.12, {"Ulcer": 0.4}),
    "Yellow": (0.06, {"Pustule": 0.9, "Abscess": 0.5}),
    "Black": (0.04, {"Comedo": 0.95}),
    "White(Hypopigmentation)": (0.07, {}),
    "Purple": (0.04, {}),
    "Pigmented": (0.04, {}),
    "Erosion": (0.06, {"Bulla": 0.3}),
    "Exudate": (0.04, {"Ulcer": 0.3}),
    "Dome-shaped": (0.06, {"Nodule": 0.35, "Cyst": 0.5}),
    "Flat topped": (0.04, {"Papule": 0.15}),
    "Telangiectasia": (0.04, {"Nodule": 0.2}),
    "Umbilicated": (0.02, {"Papule": 0.08}),
    "Translucent": (0.02, {"Vesicle": 0.6, "Bulla": 0.4}),
    "Excoriation": (0.03, {}),
    "Fissure": (0.02, {}),
    "Xerosis": (0.02, {"Plaque": 0.1}),
    "Lichenification": (0.02, {"Plaque": 0.1}),
    "Atrophy": (0.02, {}),
    "Scar": (0.03, {}),
    "Friable": (0.02, {"Nodule": 0.15}),
    "Pedunculated": (0.01, {"Nodule": 0.08}),
    "Exophytic/Fungating": (0.02, {"Nodule": 0.12}),
    "Warty/Papillomatous": (0.02, {"Papule": 0.05, "Plaque": 0.05}),
    "Purpura/Petechiae": (0.02, {}),
    "Induration": (0.02, {}),
    "Sclerosis": (0.01, {}),
    "Blue": (0.01, {}),
    "Gray": (0.01, {}),
    "Salmon": (0.01, {"Plaque": 0.05}),
    "Poikiloderma": (0.01, {}),
    "Acuminate": (0.01, {"Papule": 0.04}),
}
COLOURS = {
    "Erythema": (205, 60, 55),
    "Brown(Hyperpigmentation)": (112, 66, 34),
    "Yellow": (226, 198, 74),
    "Black": (22, 18, 18),
    "White(Hypopigmentation)": (246, 242, 236),
    "Purple": (118, 56, 128),
    "Blue": (60, 84, 160),
    "Gray": (128, 128, 132),
    "Salmon": (238, 142, 118),
    "Pigmented": (70, 42, 30),
}


# --- sampling ------------------------------------------------------------------------


def sample_concepts(rng: random.Random) -> list[str]:
    """Present concept columns of one image: a primary morphology plus secondary features."""
    primaries = list(PRIMARY)
    primary = rng.choices(primaries, weights=[PRIMARY[p] for p in primaries])[0]
    present = {primary}
    for concept, (rate, boosts) in SECONDARY.items():
        if rng.random() < rate + boosts.get(primary, 0.0):
            present.add(concept)
    return [c for c in skincon.CONCEPTS if c in present]


def sample_attributes(rng: random.Random) -> dict[str, str]:
    """Attributes as `skincon.read_records` gives them."""
    return {skincon.KEY: skincon.combination(sample_concepts(rng))}


# --- drawing -------------------------------------------------------------------------


def _lesion_colour(concepts: list[str], skin: tuple[int, int, int]) -> np.ndarray:
    tints = [COLOURS[c] for c in concepts if c in COLOURS]
    colour = np.mean(tints, axis=0) if tints else np.array(skin) * 0.8 + np.array((150, 80, 70)) * 0.2
    return np.asarray(colour, dtype=np.float32)


def _centres(rng: random.Random, size: int, radius: float, count: int) -> list[tuple[float, float]]:
    if count == 1:
        return [(size * rng.uniform(0.42, 0.58), size * rng.uniform(0.42, 0.58))]
    return [
        (rng.uniform(radius + 2, size - radius - 2), rng.uniform(radius + 2, size - radius - 2)) for _ in range(count)
    ]


def _lesion_mask(rng: random.Random, size: int, primary: str, centres, radius: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for x, y in centres:
        if primary == "Burrow":
            points = [(x - radius + 2 * radius * t / 12, y + 0.2 * radius * math.sin(t)) for t in range(13)]
            draw.line(points, fill=255, width=max(2, int(radius * 0.12)))
        elif primary in ("Plaque", "Patch", "Wheal"):
            harmonics = [(0.12, 3, rng.uniform(0, 6.3)), (0.06, 5, rng.uniform(0, 6.3))]
            draw.polygon(wobbly_outline(x, y, radius, harmonics, squash=0.8, rotation=rng.uniform(0, 3)), fill=255)
        else:
            disc(draw, x, y, radius, 255)
    blur = radius * (0.35 if primary in ("Macule", "Patch", "Wheal") else 0.08)
    return mask.filter(ImageFilter.GaussianBlur(max(1.0, blur)))


def _marks(
    draw: ImageDraw.ImageDraw, rng: random.Random, concepts: list[str], centres, radius: float, size: int
) -> None:
    """Surface and shape concepts as marks on and around the lesions."""
    line = max(1, int(size / 90))
    for x, y in centres:
        r = radius
        if "Scale" in concepts or "Xerosis" in concepts:
            for _ in range(6):
                px, py = along(x, y, rng.uniform(0, r * 0.8), rng.uniform(0, 6.3))
                draw.polygon(ragged_polygon(rng, px, py, r * 0.18, corners=5), fill=(240, 236, 226))
        if "Crust" in concepts:
            draw.polygon(ragged_polygon(rng, x + r * 0.2, y - r * 0.1, r * 0.45), fill=(150, 100, 40))
        if "Ulcer" in concepts or "Erosion" in concepts:
            disc(
                draw,
                x,
                y,
                r * (0.5 if "Ulcer" in concepts else 0.35),
                (120, 24, 30) if "Ulcer" in concepts else (228, 120, 120),
            )
        if "Exudate" in concepts:
            disc(draw, x - r * 0.2, y + r * 0.2, r * 0.22, (240, 222, 120))
        if "Umbilicated" in concepts:
            disc(draw, x, y, r * 0.16, (70, 40, 40))
        if "Dome-shaped" in concepts:
            disc(draw, x - r * 0.3, y - r * 0.3, r * 0.2, (255, 250, 245))
        if "Flat topped" in concepts:
            draw.line([(x - r * 0.7, y - r * 0.5), (x + r * 0.7, y - r * 0.5)], fill=(250, 240, 230), width=line)
        if "Telangiectasia" in concepts or "Purpura/Petechiae" in concepts:
            for _ in range(4):
                points = [along(x, y, r * rng.uniform(0.2, 1.1), rng.uniform(0, 6.3)) for _ in range(3)]
                draw.line(points, fill=(190, 20, 40), width=line)
        if "Friable" in concepts:
            for _ in range(5):
                disc(draw, *along(x, y, r * rng.uniform(0, 0.7), rng.uniform(0, 6.3)), r * 0.07, (170, 0, 0))
        if "Pedunculated" in concepts or "Exophytic/Fungating" in concepts:
            draw.rectangle((x - r * 0.15, y + r * 0.8, x + r * 0.15, y + r * 1.3), fill=(160, 90, 80))
        if "Warty/Papillomatous" in concepts or "Acuminate" in concepts:
            for _ in range(8):
                px, py = along(x, y, r * rng.uniform(0, 0.8), rng.uniform(0, 6.3))
                draw.polygon([(px, py - r * 0.15), (px - r * 0.07, py), (px + r * 0.07, py)], fill=(120, 70, 60))
        if "Scar" in concepts or "Atrophy" in concepts or "Sclerosis" in concepts:
            draw.line([(x - r, y + r * 0.9), (x + r, y + r * 0.6)], fill=(236, 214, 206), width=2 * line)
    if "Excoriation" in concepts or "Fissure" in concepts or "Lichenification" in concepts:
        for _ in range(5):
            x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
            draw.line([(x0, y0), (x0 + rng.uniform(-0.2, 0.2) * size, y0 + 0.2 * size)], fill=(96, 30, 30), width=line)
    if "Induration" in concepts or "Poikiloderma" in concepts:
        for _ in range(10):
            disc(draw, rng.uniform(0, size), rng.uniform(0, size), size * 0.02, (150, 80, 90))


def render_skin(concepts: list[str], size: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE
    skin = rng.choice(SKIN_TONES)
    canvas = np.empty((big, big, 3), dtype=np.float32)
    canvas[:] = skin
    canvas += smooth_noise(np_rng, big, big, 6, 10)[:, :, None]
    primary = next(c for c in concepts if c in PRIMARY) if any(c in PRIMARY for c in concepts) else "Papule"
    share, count = LAYOUT[primary]
    radius = big * share * rng.uniform(0.85, 1.15)
    centres = _centres(rng, big, radius, count)
    mask = _lesion_mask(rng, big, primary, centres, radius)
    alpha = np.asarray(mask, dtype=np.float32)[:, :, None] / 255.0
    if "Translucent" in concepts or primary in ("Vesicle", "Bulla"):
        alpha *= 0.55
    lesion = np.empty_like(canvas)
    lesion[:] = _lesion_colour(concepts, skin)
    canvas = canvas * (1 - alpha) + lesion * alpha
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if primary in ("Vesicle", "Bulla", "Cyst", "Nodule", "Pustule", "Abscess"):
        for x, y in centres:  # a raised lesion catches the light on its rim
            draw.arc(
                (x - radius, y - radius, x + radius, y + radius),
                200,
                290,
                fill=(255, 255, 250),
                width=max(1, int(radius * 0.12)),
            )
    if primary == "Abscess":
        disc(draw, *centres[0], radius * 0.35, (236, 210, 90))
    _marks(draw, rng, concepts, centres, radius, big)
    return image.resize((size, size), Image.LANCZOS)


# --- writing -------------------------------------------------------------------------


def _md5(rng: random.Random) -> str:
    return hashlib.md5(rng.getrandbits(64).to_bytes(8, "big")).hexdigest()


def _annotation_row(
    index: int, image_id: str, concepts: list[str], flagged: bool, blank_when_flagged: bool
) -> list[str]:
    """One annotation row; `blank_when_flagged` writes a flagged row's concepts as NaN."""
    floats = blank_when_flagged  # pandas writes a column with NaN as floats
    one, zero = ("1.0", "0.0") if floats else ("1", "0")
    if flagged and blank_when_flagged:
        cells = [""] * len(skincon.CONCEPTS)
    else:
        cells = [one if c in concepts else zero for c in skincon.CONCEPTS]
    return [str(index), image_id, *cells, "1" if flagged else "0"]  # the flag has no NaN


def _write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_synthetic(out_dir: Path, seed: int, n_train: int, n_val: int, n_test: int, image_size: int = 96) -> None:
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    n_described = n_train + n_val + n_test
    n_ddi = round(n_described * DDI_SHARE)
    parts = {"fitzpatrick17k": n_described - n_ddi, "ddi": n_ddi}
    annotation_header = ["", skincon.IMAGE_COLUMN, *skincon.CONCEPTS, skincon.FLAG_COLUMN]
    for part_name, n_kept in parts.items():
        part = next(p for p in skincon.PARTS if p.name == part_name)
        n_flagged = round(n_kept * FLAGGED_SHARE)
        flags = [False] * n_kept + [True] * n_flagged
        rng.shuffle(flags)
        annotations, metadata = [], []
        for index, flagged in enumerate(flags):
            concepts = sample_concepts(rng)
            if part_name == "fitzpatrick17k":
                md5 = _md5(rng)
                file_name = f"{md5}.jpg"
                metadata.append(
                    [
                        md5,
                        str(rng.randint(1, 6)),
                        str(rng.randint(1, 6)),
                        rng.choice(DISEASES),
                        "inflammatory",
                        "non-neoplastic",
                        "",
                        f"https://example.org/{md5}.jpg",
                        f"httpsexampleorg{md5}jpg.jpg",
                    ]
                )
            else:
                file_name = f"{index + 1:06d}.png"
                metadata.append(
                    [
                        str(index),
                        str(index + 1),
                        file_name,
                        str(rng.choice((12, 34, 56))),
                        str(rng.random() < 0.3),
                        rng.choice(DISEASES),
                    ]
                )
            image = render_skin(concepts, image_size, rng.getrandbits(63))
            image_path = out_dir / part.folder / file_name
            image_path.parent.mkdir(parents=True, exist_ok=True)
            if file_name.endswith(".png"):
                image.save(image_path, format="PNG", compress_level=6)
            else:
                save_jpeg(image, image_path)
            annotations.append(
                _annotation_row(index, file_name, concepts, flagged, blank_when_flagged=part_name == "ddi")
            )
        _write_csv(out_dir / part.annotation_files[0], annotation_header, annotations)
        header = FITZPATRICK_HEADER if part_name == "fitzpatrick17k" else DDI_HEADER
        _write_csv(out_dir / part.folder / part.metadata_file, header, metadata)
