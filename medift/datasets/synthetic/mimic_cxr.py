"""Synthetic MIMIC-CXR-JPG + reports: the real on-disk formats, with drawn chest X-rays.

Output under `out_dir` (exactly what `medift.datasets.mimic_cxr.read_records` reads):

    mimic-cxr-2.0.0-metadata.csv.gz     # the real headers; gzip without a timestamp
    mimic-cxr-2.0.0-chexpert.csv.gz     #   (so a seed always gives the same bytes)
    mimic-cxr-2.0.0-split.csv.gz
    files/p1x/p1xxxxxxx/s5xxxxxxx/<dicom_id>.jpg     # grayscale JPEGs
    files/p1x/p1xxxxxxx/s5xxxxxxx.txt                # the study's report

Counts: `n_train`, `n_val`, `n_test` are studies with a frontal (PA or AP) image in the
official train, validate and test splits; patients (one to three studies each) are
assigned to one split. On top, about one study in twelve has lateral images only (the
reader excludes it), most studies also have a lateral image, and some have two frontal
images, so the view rule (PA, then AP, then the smallest dicom_id) is exercised.

Labels are sampled per finding (positive, uncertain, negative mention, or not mentioned)
at rates shaped like the real label file; `No Finding` is 1.0 exactly when nothing but
support devices is positive or uncertain. The report is written from the labels in the
real layout (`FINAL REPORT`, ` INDICATION:`, ` COMPARISON:`, ` FINDINGS:`,
` IMPRESSION:` headers starting a line with one space, `___` for de-identified text); a
share of reports has no impression, or neither findings nor impression (so the reader
falls back to the findings, or to the last paragraph).

Every finding is drawn visibly: heart width (cardiomegaly), a wide upper mediastinum,
white fluid with a meniscus at a lung base (effusion), a dark rim without lung markings
at an apex with a pleural line (pneumothorax), a dense patch (consolidation, pneumonia),
a hazy patch (lung opacity), bilateral perihilar haze (edema), a thin plate-like band
(atelectasis), a small round nodule (lung lesion), a broken rib (fracture), a thickened
pleural line (pleural other), and bright tubes, wires and a device box (support devices).
Uncertain findings are drawn faintly. AP views magnify the heart; lateral views show one
lung field.
"""

from __future__ import annotations

import csv
import gzip
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medift.datasets import mimic_cxr
from medift.datasets.synthetic.drawing import save_jpeg, smooth_noise

SUPERSAMPLE = 2
LATERAL_ONLY = 0.08
WITH_LATERAL = 0.7
TWO_FRONTALS = 0.1
PA_SHARE = 0.6
METADATA_HEADER = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
LABEL_HEADER = ("subject_id", "study_id", *mimic_cxr.FINDINGS)
SPLIT_HEADER = mimic_cxr.SPLIT_COLUMNS
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}

# key -> (positive, uncertain, negative mention) rates.
RATES = {
    "atelectasis": (0.18, 0.05, 0.02),
    "cardiomegaly": (0.18, 0.03, 0.08),
    "consolidation": (0.05, 0.02, 0.1),
    "edema": (0.1, 0.05, 0.1),
    "enlarged_cardiomediastinum": (0.03, 0.04, 0.05),
    "fracture": (0.02, 0.005, 0.01),
    "lung_lesion": (0.03, 0.01, 0.0),
    "lung_opacity": (0.2, 0.02, 0.03),
    "pleural_effusion": (0.22, 0.03, 0.25),
    "pleural_other": (0.01, 0.005, 0.0),
    "pneumonia": (0.06, 0.08, 0.08),
    "pneumothorax": (0.04, 0.01, 0.3),
    "support_devices": (0.25, 0.0, 0.0),
}
LABEL_CELLS = {"yes": "1.0", "no": "0.0", "uncertain": "-1.0"}
SIDES = ("right", "left")

POSITIVE = {
    "atelectasis": "Plate-like atelectasis at the {side} lung base.",
    "cardiomegaly": "The heart is enlarged.",
    "consolidation": "Dense consolidation in the {side} lower lobe.",
    "edema": "Interstitial pulmonary edema.",
    "enlarged_cardiomediastinum": "The cardiomediastinal silhouette is widened.",
    "fracture": "There is a fracture of a {side} rib.",
    "lung_lesion": "A nodule projects over the {side} upper lung.",
    "lung_opacity": "Hazy opacity in the {side} mid lung.",
    "pleural_effusion": "Small {side} pleural effusion.",
    "pleural_other": "Pleural thickening along the {side} chest wall.",
    "pneumonia": "Findings are concerning for pneumonia.",
    "pneumothorax": "Small {side} apical pneumothorax.",
    "support_devices": "Endotracheal tube and a right-sided line are in place.",
}
UNCERTAIN = {key: "Possible " + text[0].lower() + text[1:] for key, text in POSITIVE.items()}
NEGATIVE = {
    "atelectasis": "No atelectasis.",
    "cardiomegaly": "Heart size is normal.",
    "consolidation": "No focal consolidation.",
    "edema": "No pulmonary edema.",
    "enlarged_cardiomediastinum": "The mediastinum is not widened.",
    "fracture": "No displaced fracture.",
    "lung_lesion": "No lung nodule.",
    "lung_opacity": "Lungs are clear.",
    "pleural_effusion": "No pleural effusion.",
    "pleural_other": "No pleural thickening.",
    "pneumonia": "No evidence of pneumonia.",
    "pneumothorax": "No pneumothorax.",
    "support_devices": "No lines or tubes.",
}


# --- sampling ------------------------------------------------------------------------


def sample_labels(rng: random.Random) -> dict[str, str]:
    """Finding key -> yes/no/uncertain (not mentioned: absent), as the label file reads."""
    labels = {}
    for key, (positive, uncertain, negative) in RATES.items():
        draw = rng.random()
        if draw < positive:
            labels[key] = "yes"
        elif draw < positive + uncertain:
            labels[key] = "uncertain"
        elif draw < positive + uncertain + negative:
            labels[key] = "no"
    findings = [k for k, v in labels.items() if v in ("yes", "uncertain") and k != "support_devices"]
    if not findings:
        labels["no_finding"] = "yes"
    return {key: labels[key] for key in mimic_cxr.FINDINGS.values() if key in labels}


def report_text(labels: dict[str, str], rng: random.Random) -> str:
    """A report in the real layout; its sections depend on a draw (see the module doc)."""
    side = rng.choice(SIDES)
    sentences = []
    for key, value in labels.items():
        table = {"yes": POSITIVE, "uncertain": UNCERTAIN, "no": NEGATIVE}[value] if key != "no_finding" else None
        if table is not None:
            sentences.append(table[key].format(side=side))
    if labels.get("no_finding") == "yes":
        sentences.append("No acute cardiopulmonary process.")
    findings = " ".join(sentences) or "Lungs are clear."
    positives = [POSITIVE[k].format(side=side) for k, v in labels.items() if v == "yes" and k in POSITIVE]
    impression = " ".join(positives[:2]) or "No acute cardiopulmonary process."
    head = (
        " " * 33 + "FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
        " INDICATION:  ___ year old with cough, evaluate for pneumonia.\n \n"
        " COMPARISON:  ___\n \n"
    )
    layout = rng.random()
    if layout < 0.7:
        return head + f" FINDINGS: \n \n {findings}\n \n IMPRESSION: \n \n {impression}\n"
    if layout < 0.85:
        return head + f" FINDINGS: \n \n {findings}\n"
    # Neither header: the reader falls back to the last paragraph.
    return " " * 33 + f"FINAL REPORT\n INDICATION:  ___ with cough.\n \n {findings}\n \n {impression}\n"


def sample_attributes(rng: random.Random) -> dict[str, str]:
    """Attributes as `mimic_cxr.read_records` gives them: labels plus the report section."""
    labels = sample_labels(rng)
    return {**labels, mimic_cxr.REPORT_KEY: mimic_cxr.report_section(report_text(labels, rng))}


# --- drawing -------------------------------------------------------------------------


def _strength(labels: dict[str, str], key: str) -> float:
    return {"yes": 1.0, "uncertain": 0.45}.get(labels.get(key, ""), 0.0)


def _blob(size: int, box, value: float, blur: float) -> np.ndarray:
    """A soft-edged ellipse of height `value` (float layer to add to the canvas)."""
    layer = Image.new("L", (size, size), 0)
    ImageDraw.Draw(layer).ellipse(box, fill=255)
    soft = np.asarray(layer.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    return soft * (value / 255.0)


def render_frontal(labels: dict[str, str], view: str, size: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    s = size * SUPERSAMPLE
    canvas = np.full((s, s), 12.0, dtype=np.float32)
    body = Image.new("F", (s, s), 0.0)
    ImageDraw.Draw(body).rounded_rectangle((0.08 * s, 0.05 * s, 0.92 * s, 1.1 * s), radius=0.15 * s, fill=95.0)
    canvas += np.asarray(body)
    side_sign = 1 if rng.random() < 0.5 else -1
    lungs = [(0.16, 0.12, 0.47, 0.82), (0.53, 0.12, 0.84, 0.82)]
    for x0, y0, x1, y1 in lungs:
        canvas -= _blob(s, (x0 * s, y0 * s, x1 * s, y1 * s), 62.0, s * 0.02)
    canvas += smooth_noise(np_rng, s, s, 12, 8)
    draw_layer = Image.new("F", (s, s), 0.0)
    draw = ImageDraw.Draw(draw_layer)
    for k in range(7):  # ribs
        y = (0.18 + 0.085 * k) * s
        for x0, x1 in ((0.14, 0.48), (0.52, 0.86)):
            draw.arc((x0 * s, y - 0.05 * s, x1 * s, y + 0.09 * s), 190, 350, fill=30.0, width=max(1, s // 120))
    if _strength(labels, "fracture"):
        draw.rectangle((0.25 * s, 0.33 * s, 0.29 * s, 0.4 * s), fill=-40.0 * _strength(labels, "fracture"))
    canvas += np.asarray(draw_layer)
    magnify = 1.12 if view == "AP" else 1.0
    heart_half = s * magnify * (0.12 + 0.09 * _strength(labels, "cardiomegaly"))
    canvas += _blob(s, (0.5 * s - heart_half * 0.8, 0.5 * s, 0.5 * s + heart_half * 1.2, 0.8 * s), 90.0, s * 0.015)
    mediastinum = s * (0.05 + 0.05 * _strength(labels, "enlarged_cardiomediastinum"))
    canvas += _blob(s, (0.5 * s - mediastinum, 0.08 * s, 0.5 * s + mediastinum, 0.55 * s), 70.0, s * 0.01)
    lx0, lx1 = (0.53, 0.84) if side_sign > 0 else (0.16, 0.47)  # the finding side's lung
    effusion = _strength(labels, "pleural_effusion")
    if effusion:
        canvas += _blob(s, (lx0 * s, 0.6 * s, lx1 * s, 0.95 * s), 85.0 * effusion, s * 0.01)
    pneumothorax = _strength(labels, "pneumothorax")
    if pneumothorax:
        canvas -= _blob(s, (lx0 * s, 0.1 * s, lx1 * s, 0.35 * s), 45.0 * pneumothorax, s * 0.004)
        ring = Image.new("F", (s, s), 0.0)
        ImageDraw.Draw(ring).arc(
            (lx0 * s + 0.03 * s, 0.16 * s, lx1 * s - 0.03 * s, 0.5 * s),
            180,
            360,
            fill=70.0 * pneumothorax,
            width=max(1, s // 150),
        )
        canvas += np.asarray(ring)
    for key, value, box, blur in (
        ("consolidation", 95.0, (0.3, 0.55, 0.42, 0.72), 0.012),
        ("pneumonia", 80.0, (0.6, 0.45, 0.75, 0.62), 0.02),
        ("lung_opacity", 45.0, (0.2, 0.35, 0.4, 0.55), 0.04),
        ("lung_lesion", 110.0, (0.66, 0.22, 0.71, 0.27), 0.004),
        ("atelectasis", 80.0, (0.2, 0.66, 0.42, 0.69), 0.005),
    ):
        strength = _strength(labels, key)
        if strength:
            canvas += _blob(s, tuple(c * s for c in box), value * strength, s * blur)
    edema = _strength(labels, "edema")
    if edema:
        for box in ((0.28, 0.3, 0.46, 0.6), (0.54, 0.3, 0.72, 0.6)):
            canvas += _blob(s, tuple(c * s for c in box), 40.0 * edema, s * 0.05)
    pleural_other = _strength(labels, "pleural_other")
    if pleural_other:
        canvas += _blob(s, (0.14 * s, 0.2 * s, 0.18 * s, 0.75 * s), 80.0 * pleural_other, s * 0.003)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="L")
    if _strength(labels, "support_devices"):
        devices = ImageDraw.Draw(image)
        width = max(1, s // 100)
        devices.line([(0.5 * s, 0.0), (0.5 * s, 0.3 * s)], fill=250, width=width)
        devices.line([(0.1 * s, 0.1 * s), (0.35 * s, 0.25 * s), (0.45 * s, 0.45 * s)], fill=240, width=width)
        devices.rectangle((0.72 * s, 0.12 * s, 0.8 * s, 0.17 * s), fill=255)
    return image.resize((size, size), Image.LANCZOS)


def render_lateral(labels: dict[str, str], size: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    s = size * SUPERSAMPLE
    canvas = np.full((s, s), 12.0, dtype=np.float32)
    canvas += _blob(s, (0.2 * s, 0.05 * s, 0.8 * s, 1.05 * s), 100.0, s * 0.01)
    canvas -= _blob(s, (0.3 * s, 0.15 * s, 0.7 * s, 0.75 * s), 55.0, s * 0.03)
    heart = 0.18 + 0.06 * _strength(labels, "cardiomegaly")
    canvas += _blob(s, (0.28 * s, 0.45 * s, (0.28 + heart) * s, 0.78 * s), 70.0, s * 0.02)
    canvas += rng.uniform(-3, 3)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="L").resize((size, size), Image.LANCZOS)


# --- writing -------------------------------------------------------------------------


def _write_gzip_csv(path: Path, header, rows) -> None:
    """CSV in a gzip without name or timestamp: the same rows give the same bytes."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
        handle.write(text.getvalue().encode("utf-8"))


def _dicom_id(rng: random.Random) -> str:
    return "-".join(f"{rng.getrandbits(32):08x}" for _ in range(5))


def _views(rng: random.Random) -> list[str]:
    """The ViewPosition of each image of one study (lateral-only in LATERAL_ONLY of them)."""
    if rng.random() < LATERAL_ONLY:
        return [rng.choice(("LATERAL", "LL", ""))]
    views = ["PA" if rng.random() < PA_SHARE else "AP"]
    if rng.random() < TWO_FRONTALS:
        views.append(rng.choice(("PA", "AP")))
    if rng.random() < WITH_LATERAL:
        views.append("LATERAL")
    rng.shuffle(views)
    return views


def write_synthetic(out_dir: Path, seed: int, n_train: int, n_val: int, n_test: int, image_size: int = 96) -> None:
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    metadata, labels_rows, split_rows = [], [], []
    subject_number, study_number = 10000000, 50000000
    for split, target in (("train", n_train), ("validate", n_val), ("test", n_test)):
        frontal_studies = 0
        while frontal_studies < target:
            subject_number += rng.randint(1, 5000)
            subject_id = str(subject_number)
            for _ in range(rng.choice((1, 1, 2, 3))):
                if frontal_studies >= target:
                    break
                study_number += rng.randint(1, 5000)
                study_id = str(study_number)
                labels = sample_labels(rng)
                views = _views(rng)
                frontal_studies += any(v in ("PA", "AP") for v in views)
                folder = out_dir / mimic_cxr.study_folder(subject_id, study_id)
                folder.mkdir(parents=True, exist_ok=True)
                (folder.parent / f"s{study_id}.txt").write_text(report_text(labels, rng), encoding="utf-8")
                labels_rows.append(
                    [subject_id, study_id]
                    + [LABEL_CELLS.get(labels.get(key, ""), "") for key in mimic_cxr.FINDINGS.values()]
                )
                for view in views:
                    dicom_id = _dicom_id(rng)
                    image_seed = rng.getrandbits(63)
                    if view in ("PA", "AP"):
                        image = render_frontal(labels, view, image_size, image_seed)
                    else:
                        image = render_lateral(labels, image_size, image_seed)
                    save_jpeg(image, folder / f"{dicom_id}.jpg")
                    metadata.append(
                        [
                            dicom_id,
                            subject_id,
                            study_id,
                            "CHEST (PA AND LAT)",
                            view,
                            str(image_size),
                            str(image_size),
                            "21800506",
                            "213014.531",
                            "CHEST (PA AND LAT)",
                            VIEW_MEANING.get(view, ""),
                            "Erect",
                        ]
                    )
                    split_rows.append([dicom_id, study_id, subject_id, split])
    _write_gzip_csv(out_dir / mimic_cxr.METADATA_FILES[0], METADATA_HEADER, metadata)
    _write_gzip_csv(out_dir / mimic_cxr.LABEL_FILES[0], LABEL_HEADER, labels_rows)
    _write_gzip_csv(out_dir / mimic_cxr.SPLIT_FILES[0], SPLIT_HEADER, split_rows)
