"""Dataset adapters: one module per dataset, all with the same API.

Each module exposes:
- `ATTRIBUTES: dict[str, tuple[str, ...]]`: attribute key -> full vocabulary (option order);
- `QUESTION_OPTIONS: dict[str, tuple[str, ...]]`: the options a question on that key offers;
- `QUESTION_TEXT: dict[str, str]`: attribute key -> question text;
- `read_records(raw_dir, seed, strict=False) -> AdapterResult`;
- `describe(attributes) -> str`: the reference training description;
- `make_questions(record, rng) -> list[Question]`: the reference questions (val/test only).
"""

from __future__ import annotations

from types import ModuleType

from medift.datasets import cbis_ddsm, wbcatt
from medift.datasets.common import AdapterResult, DataError, Quarantined

DATASETS: dict[str, ModuleType] = {
    "wbcatt": wbcatt,
    "cbis_ddsm": cbis_ddsm,
}


def get_dataset(name: str) -> ModuleType:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None


__all__ = ["DATASETS", "get_dataset", "AdapterResult", "DataError", "Quarantined"]
