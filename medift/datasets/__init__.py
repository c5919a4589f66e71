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

`captions` (medift.datasets.captions) is the exception: a user's own image-description set,
configured per dataset, so an object (`CaptionsAdapter`) with this API rather than a module;
`get_dataset("captions", options)` builds it. It is not in `DATASETS`, which lists the
published datasets the workflow and the embedded model know.

Adding a dataset here does not change the embedded base model's vocabulary: that is built
from the fixed list `medift.embedded.llava.tokenizer_corpus` names.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from medift.datasets import cbis_ddsm, mimic_cxr, skincon, wbcatt
from medift.datasets.captions import CaptionsAdapter, CaptionsOptions
from medift.datasets.common import AdapterResult, DataError, Quarantined

# The published datasets: one module each, no options.
DATASETS: dict[str, ModuleType] = {
    "wbcatt": wbcatt,
    "cbis_ddsm": cbis_ddsm,
    "skincon": skincon,
    "mimic_cxr": mimic_cxr,
}
# A user's own image-description set: an object configured by options (medift.datasets.captions).
CAPTIONS = "captions"


def get_dataset(name: str, options: dict[str, Any] | None = None) -> ModuleType | CaptionsAdapter:
    """The adapter of `name`: a module of DATASETS, or for "captions" a `CaptionsAdapter`
    built from `options` (the `CaptionsOptions` fields; required, unknown keys an error)."""
    if name == CAPTIONS:
        if options is None:
            raise ValueError(
                "dataset 'captions' needs options (medift.datasets.captions.CaptionsOptions), at least "
                '{"file": ...}; give them as ShardsConfig.adapter_options (JSON)'
            )
        return CaptionsAdapter(CaptionsOptions.from_dict(options))
    try:
        module = DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted([*DATASETS, CAPTIONS])}") from None
    if options:
        raise ValueError(f"dataset {name!r} takes no options (only {CAPTIONS!r} does); got {sorted(options)}")
    return module


__all__ = [
    "CAPTIONS",
    "DATASETS",
    "get_dataset",
    "AdapterResult",
    "CaptionsAdapter",
    "CaptionsOptions",
    "DataError",
    "Quarantined",
]


def adapter_of_shards(shard_dir) -> object:
    """The adapter a shard directory was made with: its manifest's dataset, with the adapter
    options it recorded (a per-dataset adapter such as captions)."""
    from pathlib import Path

    from medift.shards import read_manifest

    manifest = read_manifest(Path(shard_dir), verify=False)
    return get_dataset(manifest["dataset"], manifest["config"].get("adapter_options"))
