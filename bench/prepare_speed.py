"""Benchmark: data preparation (parallel, streaming) against a plain single-process loop.

Writes a large synthetic release in the WBCAtt format (the three official CSVs and
`PBC_dataset_normal_DIB/<class>/<img_name>` JPEGs of WBCAtt's size, 360x363), then, each in
its own child process and in the same run:

- `pipeline`: `medift.prepare.prepare_shards` with `--threads` worker processes: records,
  descriptions, questions, parallel decoding and letterboxing, streamed to Parquet shards;
- `plain`: the same records read by the same adapter, then a plain loop decoding and
  letterboxing every image in one process (the same `load_and_letterbox`), collecting the
  rows and writing one Parquet file at the end (the obvious way to write it);
- `pipeline_small`: the pipeline on the first quarter of the rows, to show that its peak
  memory does not grow with the dataset.

`pipeline` runs the real command line (`python -m medift.prepare shards`), `plain` this
script in its plain mode. Reported per mode: images, seconds (the child's wall time,
interpreter start-up and worker start-up included, alike for both), images per second, and
peak resident memory of the child and all its worker processes together (sampled every
20 ms through psutil); then the ratios.

    python bench/prepare_speed.py --n_images 20000 --threads 2 --out results/bench/prepare_speed.json

To keep the set quick to write, `--pool` distinct cells are drawn and every image file is a
hard link to one of them (decoding cost does not depend on which pixels a JPEG holds); the
release is kept under `--raw_dir` and reused by a later run with the same settings.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medift.datasets import wbcatt

sys.path.insert(0, str(Path(__file__).parent))
from sampling import run_sampled  # noqa: E402  (bench/ is not a package)

WBCATT_SIDE = (360, 363)  # PBC images are 360 wide, 363 high
SPLIT_SHARES = (("train", 0.8), ("val", 0.1), ("test", 0.1))


@dataclass
class BenchConfig:
    n_images: int = field(default=20000, metadata={"help": "Images in the synthetic release (all splits)."})
    threads: int = field(default=2, metadata={"help": "Worker processes of the pipeline."})
    image_size: int = field(default=64, metadata={"help": "Model input size the images are letterboxed to."})
    pool: int = field(default=400, metadata={"help": "Distinct cell images drawn; the rest are hard links."})
    seed: int = field(default=0, metadata={"help": "Seeds attributes and pixels."})
    raw_dir: str = field(default="resources/bench/wbcatt", metadata={"help": "Where the release is written (reused)."})
    work_dir: str = field(default="resources/bench/prepare", metadata={"help": "Shards and files of the runs."})
    out: str = field(default="results/bench/prepare_speed.json", metadata={"help": "JSON with the figures."})
    mode: str = field(default="", metadata={"help": "Internal: `plain` runs the plain loop in this process."})


# --- the release --------------------------------------------------------------------------


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())


def write_release(root: Path, n_images: int, pool: int, seed: int) -> None:
    """WBCAtt-format release of `n_images` rows whose files are hard links to `pool` cells."""
    from medift.datasets.synthetic.drawing import save_jpeg
    from medift.datasets.synthetic.wbcatt import IMAGE_ROOT, _image_name, render_cell, sample_attributes

    marker = root / ".bench.json"
    settings = {"n_images": n_images, "pool": pool, "seed": seed, "side": list(WBCATT_SIDE)}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return
    rng = random.Random(seed)
    cells_dir = root / "pool"
    cells_dir.mkdir(parents=True, exist_ok=True)
    cells = []
    for index in range(pool):
        attributes = sample_attributes(rng)
        path = cells_dir / f"{index}.jpg"
        square = render_cell(attributes, WBCATT_SIDE[1], seed=rng.getrandbits(63))
        save_jpeg(square.resize(WBCATT_SIDE), path)
        cells.append((attributes, path))
    number, start = 0, 0
    for split, share in SPLIT_SHARES:
        count = n_images - start if split == "test" else int(n_images * share)
        rows = []
        for _ in range(count):
            number += 1
            attributes, source = cells[rng.randrange(pool)]
            name = _image_name(attributes["label"], attributes["nucleus_shape"], 100000 + number)
            relative = f"{IMAGE_ROOT}/{attributes['label'].lower()}/{name}"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            if not (root / relative).exists():
                _link_or_copy(source, root / relative)
            rows.append({**attributes, "img_name": name, "path": relative})
        start += count
        with (root / wbcatt.SPLIT_FILES[split]).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(wbcatt.CSV_HEADER)
            writer.writerows([row[column] for column in wbcatt.CSV_HEADER] for row in rows)
    marker.write_text(json.dumps(settings))


def write_subset(root: Path, subset: Path, fraction: float) -> None:
    """The first `fraction` of every split file, sharing the full release's image folder."""
    from medift.datasets.synthetic.wbcatt import IMAGE_ROOT

    subset.mkdir(parents=True, exist_ok=True)
    for file_name in wbcatt.SPLIT_FILES.values():
        lines = (root / file_name).read_text().splitlines(keepends=True)
        keep = 1 + int((len(lines) - 1) * fraction)
        (subset / file_name).write_text("".join(lines[:keep]))
    link = subset / IMAGE_ROOT
    if not link.exists():
        link.symlink_to((root / IMAGE_ROOT).resolve(), target_is_directory=True)


# --- the two ways, each run in a child process --------------------------------------------------


def run_plain(config: BenchConfig) -> dict:
    """Decode and letterbox every image in one process, collect the rows, write one file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medift.images import load_and_letterbox

    records = wbcatt.read_records(Path(config.raw_dir), seed=config.seed).records
    rows = [
        {
            "image_id": r.image_id,
            "split": r.split,
            "description": wbcatt.describe(r.attributes),
            "image": load_and_letterbox(r.image_path, config.image_size),
        }
        for r in records
    ]
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), Path(config.work_dir) / "plain.parquet")
    return {"images": len(rows)}


# --- measuring -----------------------------------------------------------------------------------


def measure(label: str, command: list[str], work_dir: Path) -> dict:
    """Run `command` as a child process; its wall time and the peak RSS of it and its workers."""
    work_dir.mkdir(parents=True, exist_ok=True)
    run = run_sampled(label, command)
    report = work_dir / "data_report.json"
    images = json.loads(report.read_text())["records_kept"] if report.is_file() else json.loads(run["output"])["images"]
    return {
        "mode": label,
        "images": images,
        "seconds": run["seconds"],
        "images_per_second": images / run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_pss_mb": run["peak_pss_mb"],
    }


def pipeline_command(config: BenchConfig, raw_dir: Path, work_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "medift.prepare",
        "shards",
        "--dataset",
        "wbcatt",
        "--raw_dir",
        str(raw_dir),
        "--out_dir",
        str(work_dir / "shards"),
        "--report",
        str(work_dir / "data_report.json"),
        "--image_size",
        str(config.image_size),
        "--seed",
        str(config.seed),
        "--threads",
        str(config.threads),
    ]


def plain_command(config: BenchConfig, raw_dir: Path, work_dir: Path) -> list[str]:
    arguments = {**asdict(config), "mode": "plain", "raw_dir": str(raw_dir), "work_dir": str(work_dir)}
    return [sys.executable, __file__, *(item for key, value in arguments.items() for item in (f"--{key}", str(value)))]


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(BenchConfig).parse_args_into_dataclasses(argv)
    if config.mode == "plain":
        print(json.dumps(run_plain(config)))
        return 0
    raw, work = Path(config.raw_dir), Path(config.work_dir)
    started = time.perf_counter()
    write_release(raw, config.n_images, config.pool, config.seed)
    print(f"release of {config.n_images} images ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    write_subset(raw, work / "raw_quarter", 0.25)
    results = [
        measure("pipeline", pipeline_command(config, raw, work / "pipeline"), work / "pipeline"),
        measure("plain", plain_command(config, raw, work / "plain"), work / "plain"),
        measure(
            "pipeline_small",
            pipeline_command(config, work / "raw_quarter", work / "pipeline_small"),
            work / "pipeline_small",
        ),
    ]
    pipeline, plain, small = results
    summary = {
        "config": {**asdict(config), "cpus": len(os.sched_getaffinity(0))},
        "runs": results,
        "speedup": pipeline["images_per_second"] / plain["images_per_second"],
        "peak_rss_ratio_pipeline_over_plain": pipeline["peak_rss_mb"] / plain["peak_rss_mb"],
        "peak_pss_ratio_pipeline_over_plain": pipeline["peak_pss_mb"] / plain["peak_pss_mb"],
        "peak_rss_ratio_pipeline_full_over_quarter": pipeline["peak_rss_mb"] / small["peak_rss_mb"],
    }
    print(f"{'mode':<16}{'images':>8}{'seconds':>10}{'images/s':>10}{'peak RSS MB':>13}{'peak PSS MB':>13}")
    for run in results:
        print(
            f"{run['mode']:<16}{run['images']:>8}{run['seconds']:>10.1f}"
            f"{run['images_per_second']:>10.1f}{run['peak_rss_mb']:>13.0f}{run['peak_pss_mb']:>13.0f}"
        )
    print(
        f"speed-up pipeline/plain: {summary['speedup']:.2f}x with {config.threads} worker(s); "
        f"peak RSS pipeline/plain: {summary['peak_rss_ratio_pipeline_over_plain']:.2f} "
        f"(PSS {summary['peak_pss_ratio_pipeline_over_plain']:.2f}); "
        f"pipeline full/quarter: {summary['peak_rss_ratio_pipeline_full_over_quarter']:.2f}"
    )
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    Path(config.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
