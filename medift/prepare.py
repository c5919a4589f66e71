"""Raw dataset -> records -> descriptions and questions -> Parquet shards + data report.

`python -m medift.prepare synthesize ...` writes the embedded default's raw data;
`python -m medift.prepare shards ...` reads a raw release (real or synthetic alike).
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from medift.datasets import get_dataset
from medift.datasets.synthetic import write_synthetic
from medift.records import SPLITS
from medift.shards import write_shards

log = logging.getLogger(__name__)


@dataclass
class SynthesizeConfig:
    dataset: str = field(metadata={"help": "Dataset format to imitate (wbcatt, cbis_ddsm)."})
    out_dir: str = field(metadata={"help": "Raw dataset root to write."})
    seed: int = field(default=0, metadata={"help": "Seeds every attribute and pixel."})
    n_train: int = field(default=300, metadata={"help": "Training images."})
    n_val: int = field(default=60, metadata={"help": "Validation images."})
    n_test: int = field(default=200, metadata={"help": "Test images."})
    image_size: int = field(default=96, metadata={"help": "Side of the written images in pixels."})


@dataclass
class ShardsConfig:
    dataset: str = field(metadata={"help": "Dataset adapter (wbcatt, cbis_ddsm)."})
    raw_dir: str = field(metadata={"help": "Raw dataset root, as its publisher ships it."})
    out_dir: str = field(metadata={"help": "Shard directory to write."})
    report: str = field(metadata={"help": "data_report.json to write (counts per split)."})
    image_size: int = field(default=64, metadata={"help": "Model input size: images are letterboxed to it once."})
    seed: int = field(default=0, metadata={"help": "Seeds splits that the release does not fix, and questions."})
    strict: bool = field(default=False, metadata={"help": "Turn every quarantine into an error."})
    rows_per_shard: int = field(default=512, metadata={"help": "Rows per Parquet file."})
    threads: int = field(default=1, metadata={"help": "Image decoding workers."})


def build_texts(module, records, seed: int):
    """Description per image; seeded questions per val/test image (train images get none)."""
    descriptions, questions = {}, {}
    rng = random.Random(f"{seed}:questions")
    empty = []
    for record in records:
        text = module.describe(record.attributes)
        if not text.strip():
            empty.append(record.source or record.image_id)
        descriptions[record.image_id] = text
        if record.split != "train":
            questions[record.image_id] = module.make_questions(record, rng)
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


def data_report(result, records, questions) -> dict:
    patients = patients_by_split(records)
    per_split = {}
    for split in SPLITS:
        split_records = [r for r in records if r.split == split]
        per_split[split] = {
            "records": len(split_records),
            "descriptions": len(split_records),
            "questions": sum(len(questions.get(r.image_id, [])) for r in split_records),
            "patients": len(patients[split]),
            "questions_by_attribute": dict(sorted(Counter(
                q.attribute for r in split_records for q in questions.get(r.image_id, [])
            ).items())),
        }
    return {
        "rows_read": result.rows_read,
        "records_kept": len(records),
        "quarantined": len(result.quarantined),
        "quarantined_by_reason": result.quarantine_summary(),
        "patients_in_two_splits": sum(shared_patients(patients).values()),
        "splits": per_split,
    }


def prepare_shards(config: ShardsConfig) -> dict:
    module = get_dataset(config.dataset)
    result = module.read_records(Path(config.raw_dir), seed=config.seed, strict=config.strict)
    records = result.records
    check_patient_splits(records)
    descriptions, questions = build_texts(module, records, config.seed)
    manifest = write_shards(
        records, descriptions, questions, Path(config.out_dir), config.image_size,
        rows_per_shard=config.rows_per_shard, threads=config.threads, seed=config.seed,
    )
    report = data_report(result, records, questions)
    report["dataset"] = config.dataset
    report["shard_rows"] = manifest.get("totals")
    Path(config.report).parent.mkdir(parents=True, exist_ok=True)
    Path(config.report).write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("synthesize", "shards"):
        print("usage: python -m medift.prepare {synthesize,shards} --help", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "synthesize":
        (config,) = HfArgumentParser(SynthesizeConfig).parse_args_into_dataclasses(rest)
        write_synthetic(config.dataset, Path(config.out_dir), config.seed, config.n_train, config.n_val, config.n_test, config.image_size)
        log.info("wrote synthetic %s to %s", config.dataset, config.out_dir)
    else:
        (config,) = HfArgumentParser(ShardsConfig).parse_args_into_dataclasses(rest)
        report = prepare_shards(config)
        log.info("%s: %d rows read, %d kept, %d quarantined %s", config.dataset, report["rows_read"],
                 report["records_kept"], report["quarantined"], report["quarantined_by_reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
