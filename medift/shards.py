"""Parquet shards: the only form in which training and evaluation see a dataset.

Layout of a shard directory (one dataset):

    descriptions-train-00000.parquet ...  image + description, one row per image, every split
    descriptions-val-00000.parquet ...
    descriptions-test-00000.parquet ...
    questions-val-00000.parquet ...       multiple-choice questions, one row per question
    questions-test-00000.parquet ...
    manifest.json                         per file: split, kind, rows, sha256; totals; config

Description row: image_id, patient_id, split, image (letterboxed PNG bytes at the model's
input size), description, attributes (JSON object, sorted keys).
Question row: question_id (f"{image_id}:{attribute}"), image_id, split, attribute, question,
options (list<string>), answer_index (int32), image (the same PNG bytes).

Guarantees:
- Streaming: images are decoded and letterboxed in worker processes with a bounded number of
  chunks in flight, and rows are written shard by shard, so peak memory is about
  2 x rows_per_shard images (one open description shard, one open question shard) plus the
  chunks in flight, never the whole dataset.
- Determinism: rows are ordered by split (train, val, test) and then by image_id, not by the
  order the adapter happened to yield; the parquet writer options are fixed and the manifest
  has no timestamps and no thread count. The same inputs give byte-identical files for any
  `threads`.
- Integrity: `read_manifest` and the loaders check every file they use against the manifest's
  sha256 and row count; the manifest is written last, so a directory without one is an
  interrupted write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from medift.images import ImageLoadError, load_and_letterbox, load_and_letterbox_many
from medift.records import SPLITS, Question, Record

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
DESCRIPTIONS = "descriptions"
QUESTIONS = "questions"
KINDS = (DESCRIPTIONS, QUESTIONS)
QUESTION_SPLITS = ("val", "test")  # train images are described, never asked about

DESCRIPTION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("description", pa.string(), nullable=False),
        pa.field("attributes", pa.string(), nullable=False),
    ]
)
QUESTION_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("attribute", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("options", pa.list_(pa.string()), nullable=False),
        pa.field("answer_index", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
    ]
)
# Training data that a method's own data-making job writes (medift.instructions, medift.vital,
# medift.self_training), in a directory of its own with the same manifest and checks:
# conversation row: image_id, split, image, turns (JSON list of [user, assistant] pairs; the
# image goes with the first user turn), origin (what made it, e.g. "template:mcq" or "model").
# Preference row: one question on an image with a chosen and a rejected answer, their judge
# scores, and the reference model's summed log-probabilities of each (DPO's fixed reference,
# computed once by the job that made the pair, so training holds one model).
# Candidate row (vital_select): one question/answer about an image (by its image_id: the image
# itself stays once in the dataset's shards, not once per candidate), where it came from (the
# ground truth, the base model's sample) and the judge's 0-10 rating (null: unparsable).
CONVERSATIONS = "conversations"
PREFERENCES = "preferences"
CANDIDATES = "candidates"
GENERATED_KINDS = (CONVERSATIONS, PREFERENCES, CANDIDATES)
# Benchmark row (an evaluation-only dataset, medift.benchmarks): a published multiple-choice
# question as the question rows have it (image = its first image), plus every image of it,
# its category columns and answer_index -1 when the release gives no answer (predicted and
# written, not scored). image_id names the image set, so questions on one image group.
BENCHMARK = "benchmark"
CONVERSATION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("turns", pa.string(), nullable=False),
        pa.field("origin", pa.string(), nullable=False),
    ]
)
PREFERENCE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_score", pa.float64(), nullable=False),
        pa.field("rejected_score", pa.float64(), nullable=False),
        pa.field("reference_chosen", pa.float64(), nullable=False),
        pa.field("reference_rejected", pa.float64(), nullable=False),
    ]
)
CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("form", pa.string(), nullable=False),
        pa.field("attribute", pa.string(), nullable=False),
        pa.field("options", pa.list_(pa.string()), nullable=False),
        pa.field("origin", pa.string(), nullable=False),
        pa.field("rating", pa.float64(), nullable=True),
    ]
)
BENCHMARK_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("attribute", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("options", pa.list_(pa.string()), nullable=False),
        pa.field("answer_index", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("l2_category", pa.string(), nullable=False),
    ]
)
SCHEMAS = {
    BENCHMARK: BENCHMARK_SCHEMA,
    CANDIDATES: CANDIDATE_SCHEMA,
    DESCRIPTIONS: DESCRIPTION_SCHEMA,
    QUESTIONS: QUESTION_SCHEMA,
    CONVERSATIONS: CONVERSATION_SCHEMA,
    PREFERENCES: PREFERENCE_SCHEMA,
}

# Every writer option that could change bytes is pinned here (part of the determinism
# contract). PNG images do not compress further, zstd still shrinks the text columns.
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=True,
    write_statistics=True,
    version="2.6",
    data_page_version="1.0",
    write_page_index=False,
    store_schema=True,
    use_byte_stream_split=False,
)
ROW_GROUP_SIZE = 64  # small groups let readers iterate a shard without loading it whole
CHUNK_SIZE = 8  # images per task sent to a worker process
CHUNKS_IN_FLIGHT_PER_WORKER = 2  # enough to keep workers busy; bounds memory


class ShardError(RuntimeError):
    """A shard directory is missing, incomplete or does not match its manifest."""


# --------------------------------------------------------------------------- writing


def shard_file_name(kind: str, split: str, index: int) -> str:
    return f"{kind}-{split}-{index:05d}.parquet"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _ShardWriter:
    """Buffers rows of one (kind, split) and writes a parquet file every `rows_per_shard` rows."""

    def __init__(self, out_dir: Path, kind: str, split: str, rows_per_shard: int):
        self.out_dir, self.kind, self.split = out_dir, kind, split
        self.rows_per_shard = rows_per_shard
        self.schema = SCHEMAS[kind]
        self.buffer: list[dict] = []
        self.files: list[dict] = []

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out_dir / shard_file_name(self.kind, self.split, len(self.files))
        table = pa.Table.from_pylist(self.buffer, schema=self.schema)
        pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE, **PARQUET_OPTIONS)
        self.files.append(
            {
                "path": path.name,
                "split": self.split,
                "kind": self.kind,
                "rows": len(self.buffer),
                "sha256": _sha256(path),
            }
        )
        self.buffer = []  # release the image bytes of the written shard


def _validate_inputs(
    records: Sequence[Record],
    descriptions: Mapping[str, str],
    questions: Mapping[str, Sequence[Question]],
) -> str:
    """Check the inputs fit together before any image is decoded; return the dataset name."""
    if not records:
        raise ValueError("write_shards got no records")
    datasets = sorted({record.dataset for record in records})
    if len(datasets) != 1:
        # image_id is only unique within a dataset, so one shard directory holds one dataset.
        raise ValueError(f"records from several datasets in one shard set: {datasets}")
    seen: dict[str, Record] = {}
    for record in records:
        if record.split not in SPLITS:
            raise ValueError(f"record {record.image_id!r} ({record.source}) has split {record.split!r}")
        if record.image_id in seen:
            raise ValueError(f"duplicated image_id {record.image_id!r} ({record.source})")
        seen[record.image_id] = record
        if not isinstance(descriptions.get(record.image_id), str):
            raise ValueError(f"no description for image {record.image_id!r} ({record.source})")
    for image_id, image_questions in questions.items():
        record = seen.get(image_id)
        if record is None:
            raise ValueError(f"questions for unknown image {image_id!r}")
        if image_questions and record.split not in QUESTION_SPLITS:
            raise ValueError(f"questions for {record.split} image {image_id!r}; only val/test are asked")
        attributes = [question.attribute for question in image_questions]
        if len(set(attributes)) != len(attributes):
            raise ValueError(f"image {image_id!r} has two questions on one attribute: {attributes}")
        for question in image_questions:
            if question.image_id != image_id:
                raise ValueError(f"question on {question.image_id!r} filed under image {image_id!r}")
    unasked = [r.image_id for r in records if r.split in QUESTION_SPLITS and not questions.get(r.image_id)]
    if unasked:
        log.warning("%d val/test images have no question (first: %s)", len(unasked), unasked[0])
    return datasets[0]


def _ordered_records(records: Iterable[Record]) -> list[Record]:
    """Split order, then image_id: independent of the order the adapter yielded."""
    split_rank = {split: rank for rank, split in enumerate(SPLITS)}
    return sorted(records, key=lambda record: (split_rank[record.split], record.image_id))


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _load_one(path: str, size: int, keep_errors: bool) -> bytes | ImageLoadError:
    try:
        return load_and_letterbox(path, size)
    except ImageLoadError as error:
        if keep_errors:
            return error
        raise


def letterboxed_in_order(
    paths: Sequence[str], size: int, threads: int, keep_errors: bool = False
) -> Iterator[bytes | ImageLoadError]:
    """PNG bytes for each path, in input order, decoded by `threads` worker processes.

    Like `Pool.imap(..., chunksize)` but with back-pressure: at most
    threads x CHUNKS_IN_FLIGHT_PER_WORKER chunks are pending, so results cannot pile up in
    memory while the consumer writes a shard. Each image is processed by the same function
    whatever `threads` is, so the bytes do not depend on it. With `keep_errors`, an
    unreadable image yields its `ImageLoadError` instead of raising it.
    """
    if threads <= 1:
        for path in paths:
            yield _load_one(path, size, keep_errors)
        return
    # spawn, not fork: the parent may hold threads (tqdm, torch) that fork would copy in a
    # locked state.
    executor = ProcessPoolExecutor(max_workers=threads, mp_context=multiprocessing.get_context("spawn"))
    work = partial(load_and_letterbox_many, size=size, keep_errors=keep_errors)
    pending: deque[Future] = deque()
    try:
        for chunk in _chunks(paths, CHUNK_SIZE):
            pending.append(executor.submit(work, chunk))
            if len(pending) >= threads * CHUNKS_IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _description_row(record: Record, description: str, image: bytes) -> dict:
    return {
        "image_id": record.image_id,
        "patient_id": record.patient_id,
        "split": record.split,
        "image": image,
        "description": description,
        "attributes": json.dumps(dict(record.attributes), sort_keys=True, ensure_ascii=False),
    }


def _question_row(record: Record, question: Question, image: bytes) -> dict:
    return {
        "question_id": f"{record.image_id}:{question.attribute}",
        "image_id": record.image_id,
        "split": record.split,
        "attribute": question.attribute,
        "question": question.question,
        "options": list(question.options),
        "answer_index": int(question.answer_index),
        "image": image,
    }


def _remove_stale_outputs(out_dir: Path) -> None:
    """Delete files of an earlier run that this run might not overwrite (fewer shards)."""
    for pattern in ("descriptions-*.parquet", "questions-*.parquet", MANIFEST_NAME):
        for path in out_dir.glob(pattern):
            path.unlink()


def _totals(files: list[dict], n_images: int) -> dict:
    rows = {kind: {split: 0 for split in SPLITS} for kind in KINDS}
    for entry in files:
        rows[entry["kind"]][entry["split"]] += entry["rows"]
    return {
        "images": n_images,
        "files": len(files),
        "descriptions": rows[DESCRIPTIONS] | {"all": sum(rows[DESCRIPTIONS].values())},
        "questions": rows[QUESTIONS] | {"all": sum(rows[QUESTIONS].values())},
    }


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    # Written last and renamed into place: its presence means every shard is complete.
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST_NAME)


def write_shards(
    records: Sequence[Record],
    descriptions: Mapping[str, str],
    questions: Mapping[str, Sequence[Question]],
    out_dir: Path,
    image_size: int,
    rows_per_shard: int = 512,
    threads: int = 1,
    *,
    seed: int | None = None,
    unreadable: list[tuple[Record, str]] | None = None,
    adapter_options: dict | None = None,
) -> dict:
    """Write the shard directory for one dataset and return its manifest.

    `descriptions` maps every record's image_id to its description; `questions` maps val/test
    image_ids to their questions. `seed` is the seed the caller used to build splits and
    questions; it is recorded in the manifest for provenance (this function draws no random
    numbers). `threads` only changes speed, never the output.

    An unreadable or truncated image raises `ImageLoadError` naming the file, unless
    `unreadable` is a list: then the record (and its questions) is left out of the shards
    and `(record, error message)` is appended to it, for the caller to count.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    dataset = _validate_inputs(records, descriptions, questions)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_outputs(out_dir)

    ordered = _ordered_records(records)
    writers = {(kind, split): _ShardWriter(out_dir, kind, split, rows_per_shard) for kind in KINDS for split in SPLITS}
    log.info(
        "writing shards of %s: %d images, size %d, %d rows/shard, %d worker(s) -> %s",
        dataset,
        len(ordered),
        image_size,
        rows_per_shard,
        threads,
        out_dir,
    )
    keep_errors = unreadable is not None
    images = letterboxed_in_order(
        [record.image_path for record in ordered], image_size, threads, keep_errors=keep_errors
    )
    progress = tqdm(total=len(ordered), desc=f"shards {dataset}", unit="img", file=sys.stderr)
    written = 0
    try:
        for record, image in zip(ordered, images, strict=True):
            progress.update(1)
            if isinstance(image, ImageLoadError):
                unreadable.append((record, str(image)))
                continue
            written += 1
            writers[DESCRIPTIONS, record.split].add(_description_row(record, descriptions[record.image_id], image))
            for question in questions.get(record.image_id, ()):
                writers[QUESTIONS, record.split].add(_question_row(record, question, image))
    finally:
        progress.close()
        images.close()  # stops the worker pool if a row failed
    for writer in writers.values():
        writer.flush()

    files = [entry for kind in KINDS for split in SPLITS for entry in writers[kind, split].files]
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "config": {
            "image_size": image_size,
            "rows_per_shard": rows_per_shard,
            "seed": seed,
            "image_format": "png",
            "letterbox_fill": [0, 0, 0],
            # An adapter configured per dataset (captions) is rebuilt from these by later steps.
            **({"adapter_options": adapter_options} if adapter_options else {}),
        },
        "files": files,
        "totals": _totals(files, written),
    }
    _write_manifest(out_dir, manifest)
    log.info(
        "wrote %d files: %d description rows, %d question rows",
        len(files),
        manifest["totals"]["descriptions"]["all"],
        manifest["totals"]["questions"]["all"],
    )
    return manifest


def write_generated_shards(
    out_dir: Path,
    kind: str,
    rows: Iterable[dict],
    summary: Callable[[], dict],
    rows_per_shard: int = 512,
    split: str = "train",
) -> dict:
    """Write a method's generated rows (`kind`: conversations, preferences or candidates; split
    `split`, train by default) as shards with a manifest, in the order given, and return the manifest. `summary()`
    (what was generated, kept and rejected, and how), called once every row is written, goes
    into the manifest as it is."""
    if kind not in (*GENERATED_KINDS, BENCHMARK):
        raise ValueError(f"unknown generated kind {kind!r}; expected one of {(*GENERATED_KINDS, BENCHMARK)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in [*out_dir.glob(f"{kind}-*.parquet"), out_dir / MANIFEST_NAME]:
        if path.exists():
            path.unlink()
    writer = _ShardWriter(out_dir, kind, split, rows_per_shard)
    for row in rows:
        writer.add(row)
    writer.flush()
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "files": writer.files,
        "totals": {kind: {split: sum(entry["rows"] for entry in writer.files)}},
        "summary": summary(),
    }
    _write_manifest(out_dir, manifest)
    return manifest


def generated_kind(shard_dir: Path) -> str:
    """The kind of a generated shard directory (its manifest's `kind`)."""
    manifest = _load_manifest_file(Path(shard_dir))
    kind = manifest.get("kind")
    if kind not in GENERATED_KINDS:
        raise ShardError(f"{shard_dir}: not a directory of generated training rows (kind {kind!r})")
    return kind


# --------------------------------------------------------------------------- reading


def _load_manifest_file(shard_dir: Path) -> dict:
    path = shard_dir / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"no {MANIFEST_NAME} in {shard_dir} (shards missing or their write was interrupted)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ShardError(f"unreadable manifest {path}: {error}") from error
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path} has format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def _verify_file(shard_dir: Path, entry: dict) -> None:
    path = shard_dir / entry["path"]
    if not path.is_file():
        raise ShardError(f"shard file listed in the manifest is missing: {path}")
    actual = _sha256(path)
    if actual != entry["sha256"]:
        raise ShardError(
            f"checksum mismatch for {path}: manifest {entry['sha256']}, file {actual} "
            "(modified or corrupted after writing; rewrite the shards)"
        )


def read_manifest(shard_dir: Path, verify: bool = True) -> dict:
    """The manifest of `shard_dir`, after checking every listed file exists and matches its sha256."""
    shard_dir = Path(shard_dir)
    manifest = _load_manifest_file(shard_dir)
    if verify:
        for entry in manifest["files"]:
            _verify_file(shard_dir, entry)
    return manifest


def verify_split(shard_dir: Path, kind: str, split: str) -> int:
    """Check every file of one (kind, split) against the manifest's sha256; the number of files checked.

    Training calls it on rank 0 alone (the other ranks wait for its verdict): the files are
    the same for every rank, and hashing them on each would read them once per rank.
    """
    shard_dir = Path(shard_dir)
    entries = [e for e in _load_manifest_file(shard_dir)["files"] if e["kind"] == kind and e["split"] == split]
    for entry in entries:
        _verify_file(shard_dir, entry)
    return len(entries)


class ShardRows:
    """Rows of one (kind, split), read row group by row group: memory stays flat in dataset size.

    Only an index (file, row group, row within it: 12 bytes a row) and the last
    `cached_groups` row groups read stay in memory (the oldest read is dropped first), so any
    row can be read in any order and a pass in file order (evaluation) decodes each row group
    once. Training shuffles within windows of row groups (`train.epoch_batches`) and caches a
    window's worth, so it too decodes each row group once per epoch. Each file's checksum and row count are checked
    against the manifest when the reader is made (`verify=False`: the row counts only). Picklable: a DataLoader
    worker reopens
    the files itself (open parquet handles are never shared across processes).
    """

    def __init__(
        self,
        shard_dir: Path,
        kind: str,
        split: str,
        columns: Sequence[str],
        cached_groups: int = 2,
        verify: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.shard_dir, self.columns, self.cached_groups = Path(shard_dir), list(columns), cached_groups
        unknown = [c for c in self.columns if c not in SCHEMAS[kind].names]
        if unknown:
            raise ValueError(f"{kind} shards have no column(s) {unknown}; they have {SCHEMAS[kind].names}")
        manifest = _load_manifest_file(self.shard_dir)
        self.paths: list[Path] = []
        files, groups, rows = [], [], []
        for entry in (e for e in manifest["files"] if e["kind"] == kind and e["split"] == split):
            path = self.shard_dir / entry["path"]
            if verify:
                _verify_file(self.shard_dir, entry)
            metadata = pq.ParquetFile(path).metadata
            if metadata.num_rows != entry["rows"]:
                raise ShardError(f"{path} has {metadata.num_rows} rows, manifest says {entry['rows']}")
            for group in range(metadata.num_row_groups):
                n = metadata.row_group(group).num_rows
                files.append(np.full(n, len(self.paths), dtype=np.int32))
                groups.append(np.full(n, group, dtype=np.int32))
                rows.append(np.arange(n, dtype=np.int32))
            self.paths.append(path)
        empty = np.empty(0, dtype=np.int32)
        self._file = np.concatenate(files) if files else empty
        self._group = np.concatenate(groups) if groups else empty
        self._row = np.concatenate(rows) if rows else empty
        self._open: dict[int, pq.ParquetFile] = {}
        self._cache: dict[tuple[int, int], dict[str, list]] = {}

    def __len__(self) -> int:
        return len(self._row)

    def group_sizes(self) -> list[int]:
        """Rows of each row group, in index order (a row group's rows have consecutive indices)."""
        starts = np.flatnonzero(self._row == 0)
        return np.diff(np.append(starts, len(self._row))).tolist()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_cache": {}}

    def _read_group(self, file: int, group: int) -> dict[str, list]:
        key = (file, group)
        if key not in self._cache:
            if file not in self._open:
                while len(self._open) >= self.cached_groups:  # open files stay as few as the cached groups
                    self._open.pop(next(iter(self._open))).close()
                self._open[file] = pq.ParquetFile(self.paths[file])
            table = self._open[file].read_row_group(group, columns=self.columns)
            while len(self._cache) >= self.cached_groups:
                self._cache.pop(next(iter(self._cache)))  # the oldest read goes first
            self._cache[key] = {c: table.column(c).to_pylist() for c in self.columns}
        return self._cache[key]

    def row(self, index: int) -> dict:
        """The configured columns of row `index` (in manifest, file, row order)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        group = self._read_group(int(self._file[index]), int(self._group[index]))
        return {c: group[c][int(self._row[index])] for c in self.columns}

    def row_groups(self, share: tuple[int, int] = (0, 1)) -> Iterator[pd.DataFrame]:
        """Every row, one row group at a time, in order (each decoded once); a question's
        `options` as a Python list. `share` (rank, ranks): only the row groups whose number
        (counted over the files, in order) is rank modulo ranks, the others not even read."""
        rank, ranks = share
        number = -1
        for path in self.paths:
            handle = pq.ParquetFile(path)
            for group in range(handle.metadata.num_row_groups):
                number += 1
                if number % ranks != rank:
                    continue
                frame = handle.read_row_group(group, columns=self.columns).to_pandas()
                if "options" in frame:
                    frame["options"] = [list(options) for options in frame["options"]]
                yield frame

    def frame(self) -> pd.DataFrame:
        """Every row at once (the configured columns)."""
        frames = list(self.row_groups())
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in self.columns})
        return pd.concat(frames, ignore_index=True)


def load_descriptions(shard_dir: Path, split: str) -> pd.DataFrame:
    """All description rows of `split` (columns as DESCRIPTION_SCHEMA), checksums verified."""
    return ShardRows(shard_dir, DESCRIPTIONS, split, DESCRIPTION_SCHEMA.names).frame()


def load_questions(shard_dir: Path, split: str) -> pd.DataFrame:
    """All question rows of `split`; `options` as Python lists; checksums verified."""
    return ShardRows(shard_dir, QUESTIONS, split, QUESTION_SCHEMA.names).frame()
