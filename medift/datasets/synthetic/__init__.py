"""Synthetic datasets in the exact on-disk format of the real releases.

`write_synthetic(name, ...)` writes a small release that the dataset's own
`read_records` reads like the real one; see the per-dataset modules (`wbcatt`,
`cbis_ddsm`, `skincon`, `mimic_cxr`; shared drawing helpers in `drawing`) for the layout,
the sampled attribute structure and how each attribute is drawn. The pipeline calls it
through `python -m medift.prepare synthesize` (rule synthesize_raw_data).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from medift.datasets.synthetic import cbis_ddsm, mimic_cxr, skincon, wbcatt

log = logging.getLogger(__name__)

WRITERS: dict[str, Callable[..., None]] = {
    "wbcatt": wbcatt.write_synthetic,
    "cbis_ddsm": cbis_ddsm.write_synthetic,
    "skincon": skincon.write_synthetic,
    "mimic_cxr": mimic_cxr.write_synthetic,
}


def write_synthetic(
    name: str, out_dir: Path, seed: int, n_train: int, n_val: int, n_test: int, image_size: int = 96
) -> None:
    """Write a synthetic `name` release under `out_dir`; the same seed gives the same bytes.

    For CBIS-DDSM, whose release has no validation split, the training files get
    `n_train + n_val` rows and the reader picks the validation patients (datasets.md).
    SKINCON has no official split at all: `n_train + n_val + n_test` images are described
    and the reader splits them 80/10/10. MIMIC-CXR's counts are studies with a frontal
    image per official split.
    """
    if name not in WRITERS:
        raise KeyError(f"no synthetic generator for {name!r}; known: {sorted(WRITERS)}")
    for count_name, count in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if count < 0:
            raise ValueError(f"{count_name} must be >= 0, got {count}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    WRITERS[name](Path(out_dir), seed, n_train, n_val, n_test, image_size)
    log.info("wrote synthetic %s to %s", name, Path(out_dir).name)
