"""Evaluation-only datasets: a published medical multiple-choice benchmark -> question shards.

`python -m medift.benchmarks --file ... --out_dir ...` reads a benchmark in the forms the field
publishes (medift.datasets.mcq_sources: VLMEvalKit's TSV, or JSON/JSONL/Parquet/CSV records
with a column mapping or a release's preset), letterboxes every image to the model's size once
and writes `benchmark` shards (medift.shards.BENCHMARK_SCHEMA, split test) with a manifest and
a data report. A dataset of the workflow evaluates on them with `eval_from: <benchmark>`.

What a question becomes: its options, its answer (-1 when the release gives none: such a
question is asked and its answer written, never scored), its images (a question on several
images keeps them all; `medift.evaluate` asks it where the family's processor takes several
images and refuses it, counted, elsewhere), its category columns (`attribute` holds the
category, so the tables' per-attribute accuracy is per category), and `image_id`, the
hash of its images, so that questions on one image are grouped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from medift.datasets.mcq_sources import PRESETS, SourceResult, read_records, read_vlmevalkit_tsv
from medift.images import ImageLoadError, encode_image, letterbox, to_rgb
from medift.settings import EMBEDDED_IMAGE_SIZE, check_fields
from medift.shards import BENCHMARK, write_generated_shards

log = logging.getLogger(__name__)

FORMATS = ("vlmevalkit", "records")
UNLABELLED = -1
NO_CATEGORY = "all"
BENCHMARK_LIMITS = {
    "format": {"choices": FORMATS},
    "image_size": {"minimum": 1},
    "category": {"choices": ("category", "l2_category")},
}


@dataclass
class BenchmarkConfig:
    file: str = field(metadata={"help": "The benchmark's file (a VLMEvalKit TSV, or JSON/JSONL/Parquet/CSV records)."})
    out_dir: str = field(metadata={"help": "Shard directory to write."})
    report: str = field(metadata={"help": "data_report.json to write (rows read, kept, quarantined)."})
    name: str = field(default="benchmark", metadata={"help": "The benchmark's name in the manifest and report."})
    format: str = field(default="vlmevalkit", metadata={"help": "vlmevalkit (TSV) or records (mapped columns)."})
    preset: str = field(
        default="", metadata={"help": f"records: a release's column mapping ({', '.join(sorted(PRESETS))})."}
    )
    columns: str = field(default="{}", metadata={"help": "records: column mapping as JSON (overrides the preset's)."})
    image_root: str = field(default="", metadata={"help": "Folder image paths are relative to (default: the file's)."})
    image_size: int = field(default=EMBEDDED_IMAGE_SIZE, metadata={"help": "Side of the stored images (pixels)."})
    category: str = field(
        default="category",
        metadata={"help": "The column the per-attribute (per-category) accuracy groups by: category or l2_category."},
    )
    strict: bool = field(default=False, metadata={"help": "Turn every quarantine into an error."})

    def __post_init__(self):
        check_fields(self, BENCHMARK_LIMITS)


def read_benchmark(config: BenchmarkConfig) -> SourceResult:
    root = config.image_root or None
    if config.format == "vlmevalkit":
        return read_vlmevalkit_tsv(config.file, image_root=root, strict=config.strict)
    return read_records(
        config.file,
        preset=config.preset or None,
        columns=json.loads(config.columns),
        image_root=root,
        strict=config.strict,
    )


def image_set_id(question) -> str:
    """One id per set of images: the hash of the images' hashes (a question on one image: that image's)."""
    if len(question.images) == 1:
        return question.images[0].sha256
    return hashlib.sha256("+".join(image.sha256 for image in question.images).encode()).hexdigest()


def benchmark_rows(result: SourceResult, size: int, grouped_by: str, counts: Counter):
    """Shard rows in the release's order; every distinct image letterboxed once."""
    letterboxed: dict[str, bytes] = {}
    for question in tqdm(result.questions, desc="benchmark", unit="q", file=sys.stderr):
        images = []
        for image in question.images:
            if image.sha256 not in letterboxed:
                with image.open() as opened:
                    letterboxed[image.sha256] = encode_image(letterbox(to_rgb(opened), size))
            images.append(letterboxed[image.sha256])
        counts["questions"] += 1
        counts["unlabelled"] += question.answer_index is None
        counts["several_images"] += len(images) > 1
        category = question.category or NO_CATEGORY
        yield {
            "question_id": question.question_id,
            "image_id": image_set_id(question),
            "split": "test",
            "attribute": (question.l2_category or NO_CATEGORY) if grouped_by == "l2_category" else category,
            "question": question.question,
            "options": list(question.options),
            "answer_index": UNLABELLED if question.answer_index is None else int(question.answer_index),
            "image": images[0],
            "images": images,
            "category": category,
            "l2_category": question.l2_category or "",
        }
    counts["images"] = len(letterboxed)


def make_benchmark_shards(config: BenchmarkConfig) -> dict:
    result = read_benchmark(config)
    if not result.questions:
        raise ValueError(f"{config.file}: no usable question ({result.quarantine_summary() or 'the file has none'})")
    counts: Counter = Counter()

    def summary() -> dict:
        return {
            "benchmark": config.name,
            "config": {k: v for k, v in asdict(config).items() if k not in ("out_dir", "report")},
            "rows_read": result.rows_read,
            "questions": counts["questions"],
            "quarantined": len(result.quarantined),
            "quarantined_by_reason": result.quarantine_summary(),
            "unlabelled": counts["unlabelled"],
            "several_images": counts["several_images"],
            "images": counts["images"],
        }

    try:
        manifest = write_generated_shards(
            Path(config.out_dir),
            BENCHMARK,
            benchmark_rows(result, config.image_size, config.category, counts),
            summary,
            split="test",
        )
    except (OSError, ImageLoadError) as error:
        raise ValueError(f"{config.file}: an image could not be letterboxed: {error}") from error
    report = {"dataset": config.name, **manifest["summary"]}
    Path(config.report).parent.mkdir(parents=True, exist_ok=True)
    Path(config.report).write_text(json.dumps(report, indent=1))
    log.info(
        "%s: %d rows read, %d questions kept (%d unlabelled, %d on several images), %d quarantined %s",
        config.name,
        report["rows_read"],
        report["questions"],
        report["unlabelled"],
        report["several_images"],
        report["quarantined"],
        report["quarantined_by_reason"],
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(BenchmarkConfig).parse_args_into_dataclasses(argv)
    make_benchmark_shards(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
