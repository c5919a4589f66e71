"""Dataset adapters: one module per dataset, all with the same API.

Each module exposes:
- `ATTRIBUTES: dict[str, tuple[str, ...]]`: attribute key -> full vocabulary (option order);
- `QUESTION_OPTIONS: dict[str, tuple[str, ...]]`: the options a question on that key offers;
- `QUESTION_TEXT: dict[str, str]`: attribute key -> question text;
- `read_records(raw_dir, seed, strict=False) -> AdapterResult`;
- `describe(attributes) -> str`: the reference training description;
- `phrases(attributes) -> dict[str, str]`: attribute -> its phrase of that description
  (what description accuracy looks for; empty for free-text reports);
- `make_questions(record, rng, observed=None) -> list[Question]`: the questions (val/test
  only); `observed` maps each attribute key to the values that occur in the whole dataset
  (`common.observed_values`), for datasets whose distractors are drawn from the data.

Adding a dataset here does not change the embedded base model's vocabulary: that is built
from the fixed list `medift.embedded.llava.tokenizer_corpus` names.
"""

from __future__ import annotations

from types import ModuleType

from medift.datasets import cbis_ddsm, mimic_cxr, skincon, wbcatt
from medift.datasets.common import AdapterResult, DataError, Quarantined

DATASETS: dict[str, ModuleType] = {
    "wbcatt": wbcatt,
    "cbis_ddsm": cbis_ddsm,
    "skincon": skincon,
    "mimic_cxr": mimic_cxr,
}


def get_dataset(name: str) -> ModuleType:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None


__all__ = ["DATASETS", "get_dataset", "AdapterResult", "DataError", "Quarantined"]
