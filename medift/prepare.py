"""Raw dataset -> records -> descriptions and questions -> Parquet shards + data report.

`python -m medift.prepare synthesize ...` writes the embedded default's raw data;
`python -m medift.prepare shards ...` reads a raw release (real or synthetic alike).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medift.datasets import AdapterResult, DataError, Quarantined, get_dataset
from medift.datasets.common import observed_values
from medift.records import SPLITS
from medift.settings import EMBEDDED_IMAGE_SIZE
from medift.shards import write_shards

log = logging.getLogger(__name__)

EMPTY_DESCRIPTION = "empty description"
UNREADABLE_IMAGE = "image unreadable or truncated"


@dataclass
class SynthesizeConfig:
    dataset: str = field(metadata={"help": "Dataset format to imitate (wbcatt, cbis_ddsm, skincon, mimic_cxr)."})
    out_dir: str = field(metadata={"help": "Raw dataset root to write."})
    seed: int = field(default=0, metadata={"help": "Seeds every attribute and pixel."})
    n_train: int = field(default=300, metadata={"help": "Training images."})
    n_val: int = field(default=60, metadata={"help": "Validation images."})
    n_test: int = field(default=200, metadata={"help": "Test images."})
    image_size: int = field(default=96, metadata={"help": "Side of the written images in pixels."})


@dataclass
class ShardsConfig:
    dataset: str = field(
        metadata={"help": "Dataset adapter (wbcatt, cbis_ddsm, skincon, mimic_cxr, or captions: your own set)."}
    )
    raw_dir: str = field(metadata={"help": "Raw dataset root, as its publisher ships it."})
    out_dir: str = field(metadata={"help": "Shard directory to write."})
    report: str = field(metadata={"help": "data_report.json to write (counts per split)."})
    image_size: int = field(
        default=EMBEDDED_IMAGE_SIZE,
        metadata={"help": "Model input size: images are letterboxed to it once (default: the embedded models')."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds splits that the release does not fix, and questions."})
    strict: bool = field(
        default=False,
        metadata={
            "help": (
                "Turn every quarantine (missing or unreadable image, duplicated id, empty description, ...) into an "
                "error."
            )
        },
    )
    rows_per_shard: int = field(default=512, metadata={"help": "Rows per Parquet file."})
    threads: int = field(
        default=1, metadata={"help": "Image decoding worker processes (memory stays bounded whatever the count)."}
    )
    adapter_options: str = field(
        default="",
        metadata={
            "help": (
                "The adapter's options as a JSON object; the captions adapter needs them (medift.datasets.captions: "
                'e.g. {"file": "captions.csv", "attributes": ["modality"]}), the published datasets take none.'
            )
        },
    )


def parse_adapter_options(text: str) -> dict | None:
    """ShardsConfig.adapter_options (JSON) -> the dict get_dataset takes; None when empty."""
    if not text.strip():
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"adapter_options is not JSON ({error})") from None
    if not isinstance(options, dict):
        raise ValueError(f"adapter_options must be a JSON object, got {type(options).__name__}")
    return options


def adapter_options_of(module, given: dict | None) -> dict:
    """The options the adapter ran with, defaults included, for the data report ({} for a module)."""
    options = getattr(module, "options", None)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return dataclasses.asdict(options)
    return dict(given or {})


def build_texts(module, records, seed: int):
    """Description per image; seeded questions per val/test image (train images get none).

    Questions are drawn in record order from one seeded generator; datasets whose options
    come from the data (SKINCON) get the values that occur in all records.
    """
    descriptions, questions = {}, {}
    rng = random.Random(f"{seed}:questions")
    observed = observed_values(records)
    empty = []
    for record in records:
        text = module.describe(record.attributes)
        if not text.strip():
            empty.append(record.source or record.image_id)
        descriptions[record.image_id] = text
        if record.split != "train":
            questions[record.image_id] = module.make_questions(record, rng, observed)
    if empty:
        raise ValueError(f"{len(empty)} records have an empty description, first: {empty[0]}")
    return descriptions, questions


def patients_by_split(records) -> dict[str, set[str]]:
    return {split: {r.patient_id for r in records if r.split == split} for split in SPLITS}


def shared_patients(patients: dict[str, set[str]]) -> dict[str, int]:
    return {f"{a}&{b}": len(patients[a] & patients[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]}


def check_patient_splits(records) -> None:
    """No patient may sit in two splits; checked before any image is decoded."""
    shared = shared_patients(patients_by_split(records))
    if any(shared.values()):
        raise ValueError(f"patients in two splits: {shared}")


def _move_to_quarantine(result: AdapterResult, dropped: list[Quarantined]) -> AdapterResult:
    """The same result with the records of `dropped` moved to its quarantined rows."""
    gone = {q.image_id for q in dropped}
    return AdapterResult(
        records=[r for r in result.records if r.image_id not in gone],
        quarantined=result.quarantined + dropped,
        rows_read=result.rows_read,
        excluded=result.excluded,
        counts=result.counts,
    )


def quarantine_empty_descriptions(module, result: AdapterResult, strict: bool) -> AdapterResult:
    """A record whose rules give no description text cannot be trained on: quarantine it."""
    empty = [
        Quarantined(r.source, r.image_id, EMPTY_DESCRIPTION)
        for r in result.records
        if not module.describe(r.attributes).strip()
    ]
    if empty and strict:
        raise DataError(
            f"{empty[0].source}: {EMPTY_DESCRIPTION} (strict: quarantine is an error); {len(empty)} such records"
        )
    return _move_to_quarantine(result, empty) if empty else result


def quarantine_unreadable(result: AdapterResult, unreadable) -> AdapterResult:
    """Records whose image could not be decoded while the shards were written."""
    if not unreadable:
        return result
    log.warning("%d images unreadable or truncated; first: %s", len(unreadable), unreadable[0][1])
    return _move_to_quarantine(
        result, [Quarantined(record.source, record.image_id, UNREADABLE_IMAGE) for record, _ in unreadable]
    )


def _file_of(source: str) -> str:
    return source.rsplit(":", 1)[0] if ":" in source else source


def counts_by_file(result: AdapterResult) -> dict[str, dict]:
    """Per annotation file: rows read = kept + quarantined (by reason) + excluded (by reason)."""
    files: dict[str, dict] = {}

    def entry(source: str) -> dict:
        return files.setdefault(_file_of(source), {"rows_read": 0, "kept": 0, "quarantined": {}, "excluded": {}})

    for record in result.records:
        entry(record.source)["kept"] += 1
    for kind, rows in (("quarantined", result.quarantined), ("excluded", result.excluded)):
        for row in rows:
            reasons = entry(row.source)[kind]
            reasons[row.reason] = reasons.get(row.reason, 0) + 1
    for counts in files.values():
        counts["rows_read"] = counts["kept"] + sum(counts["quarantined"].values()) + sum(counts["excluded"].values())
        counts["quarantined"] = dict(sorted(counts["quarantined"].items()))
        counts["excluded"] = dict(sorted(counts["excluded"].items()))
    return dict(sorted(files.items()))


def data_report(result: AdapterResult, questions) -> dict:
    """Counts in = counts out + counts rejected, overall, per file and per split."""
    records = result.records
    patients = patients_by_split(records)
    per_split = {}
    for split in SPLITS:
        split_records = [r for r in records if r.split == split]
        per_split[split] = {
            "records": len(split_records),
            "descriptions": len(split_records),
            "questions": sum(len(questions.get(r.image_id, [])) for r in split_records),
            "patients": len(patients[split]),
            "questions_by_attribute": dict(
                sorted(Counter(q.attribute for r in split_records for q in questions.get(r.image_id, [])).items())
            ),
        }
    return {
        "rows_read": result.rows_read,
        "records_kept": len(records),
        "quarantined": len(result.quarantined),
        "quarantined_by_reason": result.quarantine_summary(),
        "excluded": len(result.excluded),
        "excluded_by_reason": result.exclusion_summary(),
        "balanced": result.rows_read == len(records) + len(result.quarantined) + len(result.excluded),
        "patients_in_two_splits": sum(shared_patients(patients).values()),
        "splits": per_split,
        "files": counts_by_file(result),
        "adapter_counts": dict(sorted(result.counts.items())),
    }


def prepare_shards(config: ShardsConfig) -> dict:
    options = parse_adapter_options(config.adapter_options)
    module = get_dataset(config.dataset, options)
    result = module.read_records(Path(config.raw_dir), seed=config.seed, strict=config.strict)
    check_patient_splits(result.records)
    result = quarantine_empty_descriptions(module, result, config.strict)
    descriptions, questions = build_texts(module, result.records, config.seed)
    unreadable = None if config.strict else []
    manifest = write_shards(
        result.records,
        descriptions,
        questions,
        Path(config.out_dir),
        config.image_size,
        rows_per_shard=config.rows_per_shard,
        threads=config.threads,
        seed=config.seed,
        unreadable=unreadable,
        adapter_options=adapter_options_of(module, options) if options else None,
    )
    result = quarantine_unreadable(result, unreadable)
    written = {r.image_id for r in result.records}
    report = data_report(result, {k: v for k, v in questions.items() if k in written})
    report["dataset"] = config.dataset
    report["adapter_options"] = adapter_options_of(module, options)
    report["shard_rows"] = manifest.get("totals")
    Path(config.report).parent.mkdir(parents=True, exist_ok=True)
    Path(config.report).write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    # Imported here, not at the top: the image workers (spawned processes) import this
    # module again, and transformers would cost each of them ~1 s and ~25 MB for nothing.
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("synthesize", "shards"):
        print("usage: python -m medift.prepare {synthesize,shards} --help", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "synthesize":
        from medift.datasets.synthetic import write_synthetic  # the synthetic releases' generators, only here

        (config,) = HfArgumentParser(SynthesizeConfig).parse_args_into_dataclasses(rest)
        write_synthetic(
            config.dataset,
            Path(config.out_dir),
            config.seed,
            config.n_train,
            config.n_val,
            config.n_test,
            config.image_size,
        )
        log.info("wrote synthetic %s to %s", config.dataset, config.out_dir)
    else:
        (config,) = HfArgumentParser(ShardsConfig).parse_args_into_dataclasses(rest)
        report = prepare_shards(config)
        log.info(
            "%s: %d rows read, %d kept, %d quarantined %s",
            config.dataset,
            report["rows_read"],
            report["records_kept"],
            report["quarantined"],
            report["quarantined_by_reason"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
