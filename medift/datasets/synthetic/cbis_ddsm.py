"""Synthetic CBIS-DDSM (JPEG re-release): the real on-disk format, with drawn lesion crops.

Output under `out_dir` (exactly what `medift.datasets.cbis_ddsm.read_records` reads):

    csv/{mass,calc}_case_description_{train,test}_set.csv   # real headers and quirks:
        `breast_density` (mass) vs `breast density` (calc), `NA` for missing values, CRLF
        line ends, a quoted trailing newline in the ROI-mask path (mass) or the cropped-image
        path (calc), crop and mask sharing one series folder with `000000.dcm`/`000001.dcm`
        assigned at random, the full-image path shared by all abnormalities of one view
    csv/dicom_info.csv                                       # one row per JPEG, shuffled
    jpeg/<SeriesInstanceUID>/<k>-<n>.jpg                      # crops, ROI masks, full images

Row counts: the train files get `n_train + n_val` rows and the test files `n_test` rows.
CBIS-DDSM has no official validation split; the reader takes 10 % of the training
*patients* for it, so the validation size after reading is about a tenth of the training
rows, not `n_val`. Each patient has one or two abnormalities, most seen in both views
(CC and MLO: two rows with the same attributes and different crops), and some patients
have both a mass and a calcification, so the patient-level split is exercised.

Attributes are sampled with plausible structure (round/oval shapes mostly circumscribed,
irregular ones spiculated or ill defined; spiculated masses, fine linear branching and
pleomorphic calcifications mostly malignant; ...) mixed with a uniform draw, and about one
in twelve lesion values is a compound (`IRREGULAR-ARCHITECTURAL_DISTORTION`), a few are `NA`.

Every attribute is drawn visibly on a grayscale crop of breast-like background:
- mass shape: disc / elongated ellipse / scalloped union of lobes / ragged polygon /
  radiating lines around a faint core (architectural distortion) / large faint diffuse
  region (asymmetric breast tissue) / medium faint blob (focal asymmetric density) /
  bean with a dark fatty notch (lymph node);
- mass margins: sharp edge / blurred edge / long thin spicules / small bumps along the
  edge / edge hidden on one side under a bright tissue band (obscured);
- calc type: tiny sharp dots (punctate), hazy faint dots (amorphous), jagged fragments of
  mixed sizes (pleomorphic), thin branching lines, tram-track vessel lines, large chunks
  (coarse), uniform round dots, thin large rings (eggshell), rings with dark centres
  (lucent center/centered), big jagged plates (dystrophic), thick rods, polygonal rings
  (skin), crescents (milk of calcium);
- calc distribution: tight cluster / a line / a wedge / a broad region / the whole crop;
- pathology: malignant lesions are brighter (denser), masses heterogeneous inside, and
  malignant calcifications sit on a faint density; benign ones are dimmer and smoother.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medift.datasets import cbis_ddsm
from medift.datasets.synthetic.drawing import (
    along,
    disc,
    ragged_polygon,
    ring,
    save_jpeg,
    smooth_noise,
    wobbly_outline,
)

SUPERSAMPLE = 2
UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."
UNIFORM_MIX = 0.08
COMPOUND_SHARE = 0.08
BOTH_VIEWS = 0.8  # share of abnormalities seen in both CC and MLO
SECOND_ABNORMALITY = 0.15
MASS_AND_CALC_PATIENT = 0.1
FULL_IMAGE_ASPECT = 1.6
DICOM_INFO_HEADER = (
    "file_path",
    "image_path",
    "AccessionNumber",
    "BitsAllocated",
    "BitsStored",
    "BodyPartExamined",
    "Columns",
    "ContentDate",
    "ContentTime",
    "ConversionType",
    "HighBit",
    "InstanceNumber",
    "LargestImagePixelValue",
    "Laterality",
    "Modality",
    "PatientBirthDate",
    "PatientID",
    "PatientName",
    "PatientOrientation",
    "PatientSex",
    "PhotometricInterpretation",
    "PixelRepresentation",
    "ReferringPhysicianName",
    "Rows",
    "SOPClassUID",
    "SOPInstanceUID",
    "SamplesPerPixel",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SmallestImagePixelValue",
    "StudyDate",
    "StudyID",
    "StudyInstanceUID",
    "StudyTime",
)

# --- sampling tables (weights; raw CSV spelling is derived: upper case, `_` for space) ---

MASS_SHAPE_WEIGHTS = {
    "irregular": 0.26,
    "oval": 0.24,
    "lobulated": 0.22,
    "round": 0.1,
    "architectural distortion": 0.07,
    "lymph node": 0.04,
    "asymmetric breast tissue": 0.035,
    "focal asymmetric density": 0.035,
}
_SMOOTH_MARGINS = {
    "circumscribed": 0.45,
    "obscured": 0.25,
    "ill defined": 0.15,
    "microlobulated": 0.1,
    "spiculated": 0.05,
}
MARGINS_GIVEN_SHAPE = {
    "round": _SMOOTH_MARGINS,
    "oval": _SMOOTH_MARGINS,
    "lobulated": _SMOOTH_MARGINS,
    "lymph node": {"circumscribed": 0.8, "obscured": 0.2},
    "irregular": {
        "spiculated": 0.4,
        "ill defined": 0.35,
        "microlobulated": 0.15,
        "obscured": 0.05,
        "circumscribed": 0.05,
    },
    "architectural distortion": {"spiculated": 0.5, "ill defined": 0.4, "obscured": 0.1},
    "asymmetric breast tissue": {"ill defined": 0.5, "obscured": 0.3, "circumscribed": 0.1, "spiculated": 0.1},
    "focal asymmetric density": {"ill defined": 0.5, "obscured": 0.3, "circumscribed": 0.1, "spiculated": 0.1},
}
MALIGNANT_GIVEN_MARGIN = {
    "spiculated": 0.9,
    "microlobulated": 0.65,
    "ill defined": 0.55,
    "obscured": 0.3,
    "circumscribed": 0.12,
}
CALC_TYPE_WEIGHTS = {
    "pleomorphic": 0.3,
    "amorphous": 0.08,
    "punctate": 0.08,
    "lucent center": 0.07,
    "vascular": 0.07,
    "fine linear branching": 0.07,
    "coarse": 0.05,
    "round and regular": 0.05,
    "eggshell": 0.04,
    "dystrophic": 0.04,
    "lucent centered": 0.03,
    "large rodlike": 0.04,
    "skin": 0.03,
    "milk of calcium": 0.03,
}
_SUSPICIOUS_SPREAD = {"clustered": 0.55, "segmental": 0.2, "linear": 0.15, "regional": 0.1}
_BENIGN_SPREAD = {"clustered": 0.35, "regional": 0.3, "diffusely scattered": 0.25, "linear": 0.05, "segmental": 0.05}
DISTRIBUTION_GIVEN_TYPE = {
    "pleomorphic": _SUSPICIOUS_SPREAD,
    "amorphous": _SUSPICIOUS_SPREAD,
    "fine linear branching": {"linear": 0.4, "segmental": 0.35, "clustered": 0.25},
    "vascular": {"linear": 0.7, "regional": 0.3},
    "large rodlike": {"linear": 0.4, "regional": 0.3, "diffusely scattered": 0.3},
}
MALIGNANT_GIVEN_TYPE = {"fine linear branching": 0.85, "pleomorphic": 0.6, "amorphous": 0.4, "punctate": 0.25}
MALIGNANT_SHIFT_GIVEN_DISTRIBUTION = {
    "segmental": 0.15,
    "linear": 0.15,
    "diffusely scattered": -0.15,
    "regional": -0.15,
}
CALLBACK_FREE_SHARE = {"mass": 0.2, "calcification": 0.4}  # of benign: BENIGN_WITHOUT_CALLBACK
MISSING_SHARE = {"mass_shape": 0.02, "mass_margins": 0.03, "calc_type": 0.02, "calc_distribution": 0.1}
LESION_COLUMNS = {
    "mass_shape": "mass shape",
    "mass_margins": "mass margins",
    "calc_type": "calc type",
    "calc_distribution": "calc distribution",
}


@dataclass
class Abnormality:
    patient_id: str
    abnormality_type: str  # "mass" or "calcification"
    abnormality_id: int
    side: str
    views: tuple[str, ...]
    lesion: dict[str, list[str]]  # key -> terms (several = compound, empty = NA)
    pathology: str  # raw spelling
    density: int
    assessment: int
    subtlety: int


@dataclass
class CaseRow:
    """One CSV row plus what is needed to draw and list its images."""

    abnormality: Abnormality
    view: str
    official_split: str
    crop_seed: int
    full_folder: str = ""
    crop_study: str = ""
    crop_series: str = ""
    crop_first: bool = True  # is the crop 000000.dcm (else the mask is)


def _weighted(rng: random.Random, table: dict[str, float], vocabulary: tuple[str, ...]) -> str:
    if rng.random() < UNIFORM_MIX:
        return rng.choice(vocabulary)
    values = list(table)
    return rng.choices(values, weights=[table[value] for value in values])[0]


def _maybe_compound(rng: random.Random, first: str, vocabulary: tuple[str, ...]) -> list[str]:
    if rng.random() >= COMPOUND_SHARE:
        return [first]
    second = rng.choice([term for term in vocabulary if term != first])
    return [first, second]


def _lesion_terms(rng: random.Random, key: str, first: str) -> list[str]:
    if rng.random() < MISSING_SHARE[key]:
        return []
    return _maybe_compound(rng, first, cbis_ddsm.ATTRIBUTES[key])


def _benign_spelling(rng: random.Random, abnormality_type: str) -> str:
    if rng.random() < CALLBACK_FREE_SHARE[abnormality_type]:
        return "BENIGN_WITHOUT_CALLBACK"
    return "BENIGN"


def _sample_mass(rng: random.Random) -> tuple[dict[str, list[str]], str]:
    shape = _weighted(rng, MASS_SHAPE_WEIGHTS, cbis_ddsm.ATTRIBUTES["mass_shape"])
    margin = _weighted(rng, MARGINS_GIVEN_SHAPE[shape], cbis_ddsm.ATTRIBUTES["mass_margins"])
    p_malignant = MALIGNANT_GIVEN_MARGIN[margin]
    if shape == "irregular":
        p_malignant = min(0.95, p_malignant + 0.1)
    elif shape == "lymph node":
        p_malignant = 0.05
    if rng.random() < UNIFORM_MIX:
        p_malignant = 0.5
    pathology = "MALIGNANT" if rng.random() < p_malignant else _benign_spelling(rng, "mass")
    lesion = {
        "mass_shape": _lesion_terms(rng, "mass_shape", shape),
        "mass_margins": _lesion_terms(rng, "mass_margins", margin),
    }
    return lesion, pathology


def _sample_calc(rng: random.Random) -> tuple[dict[str, list[str]], str]:
    calc_type = _weighted(rng, CALC_TYPE_WEIGHTS, cbis_ddsm.ATTRIBUTES["calc_type"])
    distribution = _weighted(
        rng, DISTRIBUTION_GIVEN_TYPE.get(calc_type, _BENIGN_SPREAD), cbis_ddsm.ATTRIBUTES["calc_distribution"]
    )
    p_malignant = MALIGNANT_GIVEN_TYPE.get(calc_type, 0.05)
    p_malignant += MALIGNANT_SHIFT_GIVEN_DISTRIBUTION.get(distribution, 0.0)
    if rng.random() < UNIFORM_MIX:
        p_malignant = 0.5
    pathology = "MALIGNANT" if rng.random() < p_malignant else _benign_spelling(rng, "calcification")
    lesion = {
        "calc_type": _lesion_terms(rng, "calc_type", calc_type),
        "calc_distribution": _lesion_terms(rng, "calc_distribution", distribution),
    }
    return lesion, pathology


def sample_attributes(rng: random.Random) -> dict[str, str]:
    """One lesion's attributes, normalised exactly as `cbis_ddsm.read_records` yields them."""
    abnormality_type = rng.choice(("mass", "calcification"))
    sample = _sample_mass if abnormality_type == "mass" else _sample_calc
    lesion, pathology = sample(rng)
    attributes = {key: "-".join(terms) for key, terms in lesion.items() if terms}
    attributes["abnormality_type"] = abnormality_type
    attributes["pathology"] = "malignant" if pathology == "MALIGNANT" else "benign"
    return attributes


def _assessment(rng: random.Random, pathology: str) -> int:
    if pathology == "MALIGNANT":
        return rng.choice((4, 4, 5, 5, 0))
    if pathology == "BENIGN_WITHOUT_CALLBACK":
        return rng.choice((2, 2, 3))
    return rng.choice((2, 3, 4, 4, 0))


def _sample_abnormality(
    rng: random.Random, patient_id: str, abnormality_type: str, abnormality_id: int, side: str, density: int
) -> Abnormality:
    sample = _sample_mass if abnormality_type == "mass" else _sample_calc
    lesion, pathology = sample(rng)
    views = ("CC", "MLO") if rng.random() < BOTH_VIEWS else (rng.choice(("CC", "MLO")),)
    # Density 0 and subtlety 0 occur in the real files though the scales start at 1.
    subtlety = 0 if rng.random() < 0.005 else rng.randint(1, 5)
    return Abnormality(
        patient_id,
        abnormality_type,
        abnormality_id,
        side,
        views,
        lesion,
        pathology,
        density,
        _assessment(rng, pathology),
        subtlety,
    )


def _patient_abnormalities(rng: random.Random, patient_id: str) -> list[Abnormality]:
    side = rng.choice(("LEFT", "RIGHT"))
    density = 0 if rng.random() < 0.005 else rng.choice((1, 2, 2, 3, 3, 4))
    if rng.random() < MASS_AND_CALC_PATIENT:
        types = ["mass", "calcification"]
    else:
        kind = rng.choice(("mass", "calcification"))
        types = [kind] * (2 if rng.random() < SECOND_ABNORMALITY else 1)
    abnormalities = []
    for abnormality_type in types:
        same_type = sum(a.abnormality_type == abnormality_type for a in abnormalities)
        abnormalities.append(_sample_abnormality(rng, patient_id, abnormality_type, same_type + 1, side, density))
    return abnormalities


def _case_rows(rng: random.Random, official_split: str, n_rows: int, next_patient: int) -> tuple[list[CaseRow], int]:
    """Patients until `n_rows` rows exist (the last patient may lose a view)."""
    rows: list[CaseRow] = []
    while len(rows) < n_rows:
        next_patient += rng.randint(1, 4)
        for abnormality in _patient_abnormalities(rng, f"P_{next_patient:05d}"):
            for view in abnormality.views:
                if len(rows) < n_rows:
                    rows.append(CaseRow(abnormality, view, official_split, crop_seed=rng.getrandbits(63)))
    return rows, next_patient


# --- drawing -------------------------------------------------------------------------


def _background(np_rng: np.random.Generator, size: int, density: int) -> np.ndarray:
    """Breast-like tissue: brighter with density, blotchy at low frequency, fine grain."""
    base = 65.0 + 18.0 * max(density, 1)
    tissue = base + smooth_noise(np_rng, size, size, 6, 16) + smooth_noise(np_rng, size, size, 14, 6)
    return tissue + np_rng.normal(0, 3.0, size=(size, size)).astype(np.float32)


def _shape_mask(rng: random.Random, size: int, shape: str) -> tuple[Image.Image, float]:
    """(mask of the mass body, its radius); the body of a mass of `shape`."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c = size / 2 + rng.uniform(-0.03, 0.03) * size
    theta = rng.uniform(0, math.pi)
    if shape == "round":
        radius = 0.2 * size
        disc(draw, c, c, radius, 255)
    elif shape == "oval":
        radius = 0.26 * size
        draw.polygon(wobbly_outline(c, c, radius, [], squash=0.55, rotation=theta), fill=255)
    elif shape == "lobulated":
        radius = 0.24 * size
        for k in range(rng.choice((3, 4))):
            disc(draw, *along(c, c, 0.1 * size, theta + 2 * math.pi * k / 3.5), 0.13 * size, 255)
    elif shape == "irregular":
        radius = 0.21 * size
        harmonics = [
            (rng.uniform(0.18, 0.25), 2, rng.uniform(0, 6.3)),
            (rng.uniform(0.12, 0.18), 3, rng.uniform(0, 6.3)),
            (rng.uniform(0.06, 0.1), 7, rng.uniform(0, 6.3)),
        ]
        draw.polygon(wobbly_outline(c, c, radius, harmonics), fill=255)
    elif shape == "architectural distortion":
        radius = 0.07 * size
        disc(draw, c, c, radius, 150)
        for k in range(rng.randint(10, 14)):
            angle = 2 * math.pi * k / 12 + rng.uniform(-0.2, 0.2)
            bend = along(c, c, 0.22 * size, angle + rng.uniform(-0.15, 0.15))
            draw.line([(c, c), bend, along(c, c, 0.42 * size, angle)], fill=210, width=max(2, size // 80))
    elif shape == "asymmetric breast tissue":
        radius = 0.38 * size
        draw.polygon(wobbly_outline(c, c, radius, [(0.1, 3, theta)], squash=0.65, rotation=theta), fill=200)
        mask = mask.filter(ImageFilter.GaussianBlur(0.05 * size))
    elif shape == "focal asymmetric density":
        radius = 0.2 * size
        draw.polygon(wobbly_outline(c, c, radius, [(0.08, 3, theta)], squash=0.7, rotation=theta), fill=230)
        mask = mask.filter(ImageFilter.GaussianBlur(0.025 * size))
    elif shape == "lymph node":
        radius = 0.22 * size
        draw.polygon(wobbly_outline(c, c, radius, [], squash=0.65, rotation=theta), fill=255)
        # The fatty hilum: a dark notch in one long side.
        disc(draw, *along(c, c, 0.14 * size, theta + math.pi / 2), 0.07 * size, 40)
    else:
        raise ValueError(f"unknown mass shape {shape!r}")
    return mask, radius


def _inside(body: np.ndarray, x: float, y: float) -> bool:
    return bool(body[int(y), int(x)])


def _apply_margin(
    rng: random.Random, mask: Image.Image, radius: float, margin: str, size: int
) -> tuple[Image.Image, Image.Image | None]:
    """(mask with the margin drawn, optional overlying tissue that obscures it)."""
    c = size / 2
    if margin == "circumscribed":
        return mask.filter(ImageFilter.GaussianBlur(0.004 * size)), None
    if margin == "ill defined":
        return mask.filter(ImageFilter.GaussianBlur(0.045 * size)), None
    if margin == "spiculated":
        draw = ImageDraw.Draw(mask)
        for k in range(rng.randint(12, 18)):
            angle = 2 * math.pi * k / 15 + rng.uniform(-0.15, 0.15)
            draw.line(
                [along(c, c, 0.6 * radius, angle), along(c, c, radius + rng.uniform(0.14, 0.24) * size, angle)],
                fill=235,
                width=max(2, size // 90),
            )
        return mask.filter(ImageFilter.GaussianBlur(0.003 * size)), None
    if margin == "microlobulated":
        body = np.asarray(mask) > 128
        draw = ImageDraw.Draw(mask)
        for _ in range(rng.randint(16, 24)):
            angle = rng.uniform(0, 2 * math.pi)
            # Walk outwards to the edge of the body, then bud a small lobe there.
            distance = 0.3 * radius
            while distance < 0.48 * size and _inside(body, *along(c, c, distance, angle)):
                distance += 1
            disc(draw, *along(c, c, distance, angle), 0.028 * size, 255)
        return mask.filter(ImageFilter.GaussianBlur(0.003 * size)), None
    if margin == "obscured":
        # Dense tissue over one side of the mass hides that part of the edge.
        cover = Image.new("L", (size, size), 0)
        angle = rng.uniform(0, 2 * math.pi)
        x, y = along(c, c, radius * 1.05, angle)
        ImageDraw.Draw(cover).polygon(
            wobbly_outline(x, y, 0.3 * size, [(0.1, 3, angle)], squash=0.5, rotation=angle + math.pi / 2), fill=255
        )
        return mask.filter(ImageFilter.GaussianBlur(0.01 * size)), cover.filter(ImageFilter.GaussianBlur(0.03 * size))
    raise ValueError(f"unknown mass margin {margin!r}")


def _mass_layer(
    rng: random.Random, np_rng: np.random.Generator, size: int, lesion: dict[str, list[str]], malignant: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(brightness to add, ROI mask) for a mass; NA values are drawn as a plausible value."""
    shapes = lesion["mass_shape"] or [rng.choice(("oval", "irregular"))]
    margins = lesion["mass_margins"] or [rng.choice(("ill defined", "obscured"))]
    body = np.zeros((size, size), dtype=np.float32)
    cover_total = np.zeros_like(body)
    for shape in shapes:
        mask, radius = _shape_mask(rng, size, shape)
        for margin in margins:
            mask, cover = _apply_margin(rng, mask, radius, margin, size)
            if cover is not None:
                cover_total = np.maximum(cover_total, np.asarray(cover, dtype=np.float32) / 255)
        body = np.maximum(body, np.asarray(mask, dtype=np.float32) / 255)
    contrast = 95.0 if malignant else 60.0
    texture = smooth_noise(np_rng, size, size, 10, 22.0 if malignant else 5.0)
    layer = body * (contrast + texture * body) + cover_total * 75.0
    roi = (body > 0.35).astype(np.uint8) * 255
    return layer, roi


def _speck(
    draw: ImageDraw.ImageDraw, rng: random.Random, calc_type: str, x: float, y: float, size: int, value: int
) -> None:
    """One calcification of `calc_type` at (x, y), drawn with brightness `value`."""
    unit = size / 65  # specks are drawn larger than life so that 64x64 inputs keep them
    line = max(1, int(0.7 * unit))
    if calc_type == "punctate":
        disc(draw, x, y, 0.6 * unit, value)
    elif calc_type == "amorphous":
        disc(draw, x, y, 0.9 * unit, int(value * 0.55))
    elif calc_type == "pleomorphic":
        draw.polygon(
            ragged_polygon(rng, x, y, rng.uniform(0.6, 1.9) * unit, corners=rng.randint(3, 6), low=0.4), fill=value
        )
    elif calc_type == "fine linear branching":
        angle = rng.uniform(0, 2 * math.pi)
        tip = along(x, y, 6 * unit, angle)
        draw.line([along(x, y, -4 * unit, angle), tip], fill=value, width=line)
        draw.line(
            [along(x, y, 1 * unit, angle), along(*along(x, y, 1 * unit, angle), 4 * unit, angle + 0.6)],
            fill=value,
            width=line,
        )
    elif calc_type == "vascular":
        angle = rng.uniform(0, math.pi)
        for offset in (-1.6 * unit, 1.6 * unit):
            start = along(*along(x, y, offset, angle + math.pi / 2), -15 * unit, angle)
            middle = along(*along(x, y, offset + 1.5 * unit, angle + math.pi / 2), 0, angle)
            end = along(*along(x, y, offset, angle + math.pi / 2), 15 * unit, angle)
            draw.line([start, middle, end], fill=value, width=line)
    elif calc_type == "coarse":
        draw.polygon(ragged_polygon(rng, x, y, rng.uniform(3.0, 4.2) * unit, corners=9, low=0.7, high=1.2), fill=value)
    elif calc_type == "round and regular":
        disc(draw, x, y, 1.4 * unit, value)
    elif calc_type == "eggshell":
        ring(draw, x, y, 4.0 * unit, value, line)
    elif calc_type in ("lucent center", "lucent centered"):
        ring(draw, x, y, 2.0 * unit, value, int(1.1 * unit))
    elif calc_type == "dystrophic":
        # Large jagged plates, brighter at the rim than inside.
        plate = ragged_polygon(rng, x, y, rng.uniform(3.5, 5.0) * unit, corners=6, low=0.35, high=1.4)
        draw.polygon(plate, fill=int(value * 0.5), outline=value, width=2 * line)
    elif calc_type == "large rodlike":
        angle = rng.uniform(-0.3, 0.3) + math.pi / 4
        draw.line(
            [along(x, y, -4 * unit, angle), along(x, y, 4 * unit, angle)], fill=value, width=max(2, int(1.6 * unit))
        )
    elif calc_type == "skin":
        polygon = ragged_polygon(rng, x, y, 1.8 * unit, corners=5, low=0.9, high=1.1)
        draw.polygon(polygon, outline=value, width=line)
    elif calc_type == "milk of calcium":
        draw.arc(
            (x - 2 * unit, y - 2 * unit, x + 2 * unit, y + 2 * unit), 10, 170, fill=value, width=max(1, int(1.2 * unit))
        )
    else:
        raise ValueError(f"unknown calc type {calc_type!r}")


SPECK_COUNT = {"vascular": 0.15, "coarse": 0.35, "dystrophic": 0.3, "large rodlike": 0.5, "eggshell": 0.4}


def _positions(rng: random.Random, distribution: str, count: int, size: int) -> list[tuple[float, float]]:
    c = size / 2
    spread = size / 100
    theta = rng.uniform(0, 2 * math.pi)
    points = []
    for _ in range(count):
        if distribution == "clustered":
            point = (rng.gauss(c, 8 * spread), rng.gauss(c, 8 * spread))
        elif distribution == "linear":
            point = along(
                *along(c, c, rng.uniform(-36, 36) * spread, theta), rng.gauss(0, 1.5 * spread), theta + math.pi / 2
            )
        elif distribution == "segmental":
            # A wedge from a point near the edge, opening towards the other side.
            apex = along(c, c, 42 * spread, theta)
            point = along(*apex, rng.uniform(15, 75) * spread, theta + math.pi + rng.uniform(-0.35, 0.35))
        elif distribution == "regional":
            point = along(c, c, 34 * spread * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi))
        elif distribution == "diffusely scattered":
            point = (rng.uniform(5, 95) * spread, rng.uniform(5, 95) * spread)
        else:
            raise ValueError(f"unknown calc distribution {distribution!r}")
        points.append(point)
    return points


def _calc_layer(
    rng: random.Random, np_rng: np.random.Generator, size: int, lesion: dict[str, list[str]], malignant: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(brightness to add, ROI mask) for calcifications; NA is drawn as a plausible value."""
    types = lesion["calc_type"] or [rng.choice(("pleomorphic", "punctate"))]
    distributions = lesion["calc_distribution"] or [rng.choice(("clustered", "regional"))]
    specks = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(specks)
    value = 235 if malignant else 175
    for index, calc_type in enumerate(types):
        distribution = distributions[index % len(distributions)]
        base_count = {"clustered": 14, "linear": 12, "segmental": 18, "regional": 20, "diffusely scattered": 20}[
            distribution
        ]
        count = max(2, round(base_count * SPECK_COUNT.get(calc_type, 1.0) / len(types)))
        for x, y in _positions(rng, distribution, count, size):
            _speck(draw, rng, calc_type, x, y, size, value)
    if "amorphous" in types:
        specks = specks.filter(ImageFilter.GaussianBlur(0.006 * size))
    layer = np.asarray(specks, dtype=np.float32) * 0.7
    roi = np.asarray(specks.filter(ImageFilter.MaxFilter(5)), dtype=np.uint8)
    if malignant:
        # Malignant calcifications sit on a faint associated density.
        haze = Image.new("L", (size, size), 0)
        disc(ImageDraw.Draw(haze), size / 2, size / 2, 0.22 * size, 255)
        haze_array = np.asarray(haze.filter(ImageFilter.GaussianBlur(0.08 * size)), np.float32)
        layer += haze_array / 255 * 22
    return layer, (roi > 0).astype(np.uint8) * 255


def render_crop(abnormality: Abnormality, size: int, seed: int) -> tuple[Image.Image, Image.Image]:
    """(cropped lesion image, ROI mask), both grayscale `size` x `size`."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE
    malignant = abnormality.pathology == "MALIGNANT"
    canvas = _background(np_rng, big, abnormality.density)
    make_layer = _mass_layer if abnormality.abnormality_type == "mass" else _calc_layer
    layer, roi = make_layer(rng, np_rng, big, abnormality.lesion, malignant)
    canvas = np.clip(canvas + layer, 0, 255).astype(np.uint8)
    crop = Image.fromarray(canvas).resize((size, size), Image.LANCZOS)
    mask = Image.fromarray(roi).resize((size, size), Image.NEAREST)
    return crop, mask


def render_full_image(side: str, crops: list[Image.Image], size: int, seed: int) -> Image.Image:
    """A small stand-in full mammogram: breast silhouette with the view's lesions pasted in."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    width, height = size, int(size * FULL_IMAGE_ASPECT)
    silhouette = Image.new("L", (width, height), 0)
    x0 = 0 if side == "LEFT" else width
    ImageDraw.Draw(silhouette).ellipse((x0 - 0.85 * width, 0.05 * height, x0 + 0.85 * width, 0.95 * height), fill=255)
    tissue = 90 + smooth_noise(np_rng, height, width, 8, 25)
    pixels = np.clip(tissue * (np.asarray(silhouette) / 255), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    for crop in crops:
        small = crop.resize((size // 3, size // 3), Image.BILINEAR)
        x = int(width * (0.1 if side == "LEFT" else 0.55) + rng.uniform(0, 0.15) * width)
        image.paste(small, (x, int(rng.uniform(0.2, 0.65) * height)))
    return image


# --- writing -------------------------------------------------------------------------


class _UidMaker:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def __call__(self) -> str:
        while True:
            uid = UID_ROOT + str(self._rng.randrange(10**37, 10**39))
            if uid not in self._used:
                self._used.add(uid)
                return uid


def _raw_terms(terms: list[str]) -> str:
    return "-".join(term.upper().replace(" ", "_") for term in terms) if terms else "NA"


def _case_folder(row: CaseRow) -> str:
    kind = "Mass" if row.abnormality.abnormality_type == "mass" else "Calc"
    split = "Training" if row.official_split == "train" else "Test"
    a = row.abnormality
    return f"{kind}-{split}_{a.patient_id}_{a.side}_{row.view}"


def _csv_row(row: CaseRow) -> list[str]:
    a = row.abnormality
    case = _case_folder(row)
    crop_case = f"{case}_{a.abnormality_id}"
    names = ("000000.dcm", "000001.dcm")
    crop_name, mask_name = names if row.crop_first else names[::-1]
    crop_path = f"{crop_case}/{row.crop_study}/{row.crop_series}/{crop_name}"
    mask_path = f"{crop_case}/{row.crop_study}/{row.crop_series}/{mask_name}"
    full_path = f"{case}/{row.full_folder}/000000.dcm"
    keys = cbis_ddsm.DISTRACTOR_KEYS[a.abnormality_type]
    if a.abnormality_type == "mass":
        # The real mass files carry a quoted trailing newline in the ROI-mask path.
        mask_path += "\n"
    else:
        # ... and the calc files in the cropped-image path.
        crop_path += "\n"
    return [
        a.patient_id,
        str(a.density),
        a.side,
        row.view,
        str(a.abnormality_id),
        a.abnormality_type,
        _raw_terms(a.lesion[keys[0]]),
        _raw_terms(a.lesion[keys[1]]),
        str(a.assessment),
        a.pathology,
        str(a.subtlety),
        full_path,
        crop_path,
        mask_path,
    ]


def _dicom_row(
    image_path: str, patient_id: str, description: str, series: str, study: str, side: str, image: Image.Image
) -> dict[str, str]:
    file_path = image_path.replace("CBIS-DDSM/jpeg/", "CBIS-DDSM/dicom/").replace(".jpg", ".dcm")
    return {
        "file_path": file_path,
        "image_path": image_path,
        "AccessionNumber": "",
        "BitsAllocated": "16" if description == "full mammogram images" else "8",
        "BitsStored": "16" if description == "full mammogram images" else "8",
        "BodyPartExamined": "BREAST",
        "Columns": str(image.width),
        "ContentDate": "",
        "ContentTime": "",
        "ConversionType": "WSD",
        "HighBit": "15",
        "InstanceNumber": "1",
        "LargestImagePixelValue": str(max(image.getextrema())),
        "Laterality": side[0],
        "Modality": "MG",
        "PatientBirthDate": "",
        "PatientID": patient_id,
        "PatientName": patient_id,
        "PatientOrientation": "",
        "PatientSex": "",
        "PhotometricInterpretation": "MONOCHROME2",
        "PixelRepresentation": "0",
        "ReferringPhysicianName": "",
        "Rows": str(image.height),
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
        "SOPInstanceUID": series + ".1",
        "SamplesPerPixel": "1",
        "SeriesDescription": description,
        "SeriesInstanceUID": series,
        "SeriesNumber": "1",
        "SmallestImagePixelValue": str(min(image.getextrema())),
        "StudyDate": "",
        "StudyID": "DDSM",
        "StudyInstanceUID": study,
        "StudyTime": "",
    }


def _write_jpeg(out_dir: Path, series: str, name: str, image: Image.Image) -> str:
    folder = out_dir / "jpeg" / series
    folder.mkdir(parents=True, exist_ok=True)
    save_jpeg(image, folder / name)
    return f"CBIS-DDSM/jpeg/{series}/{name}"


def _write_case_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    # The real files: CRLF line ends, quoting only where a field holds a newline.
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(rows)


def write_synthetic(out_dir: Path, seed: int, n_train: int, n_val: int, n_test: int, image_size: int = 96) -> None:
    out_dir = Path(out_dir)
    (out_dir / cbis_ddsm.CSV_DIR).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    new_uid = _UidMaker(random.Random(seed + 1))
    train_rows, last_patient = _case_rows(rng, "train", n_train + n_val, 0)
    test_rows, _ = _case_rows(rng, "test", n_test, last_patient + 10)

    dicom_rows: list[dict[str, str]] = []
    crops_by_view: dict[str, list[Image.Image]] = {}
    for row in train_rows + test_rows:
        a = row.abnormality
        row.crop_study, row.crop_series = new_uid(), new_uid()
        row.crop_first = rng.random() < 0.5
        crop, mask = render_crop(a, image_size, row.crop_seed)
        instance = rng.randint(1, 300)
        crop_index, mask_index = (1, 2) if rng.random() < 0.5 else (2, 1)
        crop_case = f"{_case_folder(row)}_{a.abnormality_id}"
        crop_jpeg = _write_jpeg(out_dir, row.crop_series, f"{crop_index}-{instance}.jpg", crop)
        mask_jpeg = _write_jpeg(out_dir, row.crop_series, f"{mask_index}-{instance}.jpg", mask)
        dicom_rows.append(
            _dicom_row(crop_jpeg, crop_case, cbis_ddsm.CROPPED_SERIES, row.crop_series, row.crop_study, a.side, crop)
        )
        dicom_rows.append(
            _dicom_row(mask_jpeg, crop_case, "ROI mask images", row.crop_series, row.crop_study, a.side, mask)
        )
        crops_by_view.setdefault(_case_folder(row), []).append(crop)

    # One full mammogram per case folder (view), shared by its abnormalities' rows.
    full_folders: dict[str, str] = {}
    for case, crops in crops_by_view.items():
        study, series = new_uid(), new_uid()
        full_folders[case] = f"{study}/{series}"
        side = "LEFT" if "_LEFT_" in case else "RIGHT"
        image = render_full_image(side, crops, image_size, rng.getrandbits(63))
        jpeg = _write_jpeg(out_dir, series, f"1-{rng.randint(1, 300)}.jpg", image)
        dicom_rows.append(_dicom_row(jpeg, case, "full mammogram images", series, study, side, image))
    for row in train_rows + test_rows:
        row.full_folder = full_folders[_case_folder(row)]

    for case_file in cbis_ddsm.CASE_FILES:
        rows = [
            _csv_row(row)
            for row in (train_rows if case_file.official_split == "train" else test_rows)
            if row.abnormality.abnormality_type == case_file.abnormality
        ]
        _write_case_csv(out_dir / cbis_ddsm.CSV_DIR / case_file.file_name, case_file.header, rows)

    # The real dicom_info.csv is not in case order.
    rng.shuffle(dicom_rows)
    with (out_dir / cbis_ddsm.CSV_DIR / cbis_ddsm.DICOM_INFO).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=DICOM_INFO_HEADER, lineterminator="\n")
        writer.writeheader()
        writer.writerows(dicom_rows)
