"""Benchmark: training throughput, the proxy's cost, data waiting and memory, in one run.

Every figure is a ratio against a baseline measured in the same run, on the same machine
and the same base model (the embedded default unless --base_model), each run a child
process of the real command line (`python -m medift.train`, torchrun for 2 ranks) that
trains `--steps` optimizer steps at global batch `--batch` on WBCAtt-format shards
(64 px, written once under --work_dir and reused):

- `caption_ft`     1 rank, the fixed instruction: the step-time baseline;
- `ift`            1 rank, the proxy (K=8) and its momentum copy: overhead = ift / caption_ft - 1
                   (target under 3 %), per step and per token (the prompts differ in length);
- `ift_2_ranks`    2 ranks x batch/2 (gloo on CPU, a thread each): tokens/s against `ift`
                   (same global batch, 2 threads);
- `ift_workers`    images decoded in --workers DataLoader workers: the data-wait fraction
                   against `ift`, which decodes them in the training process (target under 5 %);
- `ift_20k`        as `ift_workers` on 10x the training images: peak memory (RSS and PSS of the
                   job and its workers) against `ift_workers`, 2,000 images (target under 1.2).

Step times are medians over the run's steps, data wait excluded; the first three runs decode
in the training process so that workers do not take CPU from the step they are compared on.

    python bench/train_scaling.py --out results/bench/training.json     (or: snakemake results/bench/training.json)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medift.settings import launcher_arguments, option_arguments

sys.path.insert(0, str(Path(__file__).parent))
from prepare_speed import write_release  # noqa: E402  (bench/ is not a package)
from sampling import run_sampled  # noqa: E402

TRAIN_SHARE = 0.8  # write_release's train split


@dataclass
class BenchConfig:
    base_model: str = field(default="models/embedded-base", metadata={"help": "Checkpoint every run trains."})
    steps: int = field(default=40, metadata={"help": "Optimizer steps per run (train.max_steps)."})
    batch: int = field(default=16, metadata={"help": "Global batch (1 rank: micro-batch; 2 ranks: half each)."})
    workers: int = field(
        default=2, metadata={"help": "DataLoader workers of the runs that use them (per rank; 2 ranks: half)."}
    )
    threads: int = field(default=2, metadata={"help": "torch threads of a 1-rank job (2 ranks: half each)."})
    small_images: int = field(default=2000, metadata={"help": "Training images of every run but ift_20k."})
    large_images: int = field(default=20000, metadata={"help": "Training images of ift_20k."})
    work_dir: str = field(
        default="resources/bench/training", metadata={"help": "Releases, shards and run outputs (reused)."}
    )
    out: str = field(default="results/bench/training.json", metadata={"help": "JSON with every figure."})


def shards_of(config: BenchConfig, train_images: int) -> Path:
    """Shards of a WBCAtt-format release with `train_images` training images (written once)."""
    root = Path(config.work_dir) / f"wbcatt-{train_images}"
    shards = root / "shards"
    if not (shards / "manifest.json").is_file():
        write_release(root / "raw", int(train_images / TRAIN_SHARE), pool=400, seed=0)
        run_sampled(
            "shards",
            [
                sys.executable,
                "-m",
                "medift.prepare",
                "shards",
                "--dataset",
                "wbcatt",
                "--raw_dir",
                str(root / "raw"),
                "--out_dir",
                str(shards),
                "--report",
                str(root / "report.json"),
                "--image_size",
                "64",
                "--seed",
                "0",
                "--threads",
                str(config.threads),
            ],
        )
    return shards


def train_run(
    config: BenchConfig, name: str, shards: Path, proxy: bool, ranks: int = 1, workers: int | None = None
) -> dict:
    out = Path(config.work_dir) / "runs" / name
    workers = config.workers if workers is None else workers
    settings = {
        "shards": shards,
        "base_model": config.base_model,
        "out_dir": out,
        "proxy": proxy,
        "warmup_epochs": 0,
        "epochs": 1,
        "max_steps": config.steps,
        "batch_size": config.batch // ranks,
        "validate": False,
        "checkpoint_every": 0,
        "threads": max(1, config.threads // ranks),
        "data_workers": workers // ranks if workers else 0,
        "seed": 1,
    }
    command = [*launcher_arguments(ranks, python=sys.executable), *option_arguments(settings)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{name}: training {config.steps} steps ...", file=sys.stderr, flush=True)
    run = run_sampled(name, command, log=out.parent / f"{name}.log", env=env)
    summary = json.loads((out / "train_summary.json").read_text())
    steps = sum(1 for h in summary["history"] if h["stage"] == "main")
    step_seconds = summary["main_step_seconds"]
    wait = summary["data_wait_seconds"]
    return {
        "run": name,
        "ranks": ranks,
        "data_workers": workers,
        "train_images": summary["train_images"],
        "steps": steps,
        "step_seconds": step_seconds,
        "tokens_per_second": summary["main_tokens_per_second"],
        "tokens_per_step": summary["main_tokens_per_step"],
        "data_wait_fraction": wait / (wait + summary["main_step_seconds_total"]),
        "job_seconds": run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_pss_mb": run["peak_pss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(BenchConfig).parse_args_into_dataclasses(argv)
    started = time.perf_counter()
    small, large = shards_of(config, config.small_images), shards_of(config, config.large_images)
    runs = {
        r["run"]: r
        for r in [
            train_run(config, "caption_ft", small, proxy=False, workers=0),
            train_run(config, "ift", small, proxy=True, workers=0),
            train_run(config, "ift_2_ranks", small, proxy=True, ranks=2, workers=0),
            train_run(config, "ift_workers", small, proxy=True),
            train_run(config, "ift_20k", large, proxy=True),
        ]
    }
    caption, ift = runs["caption_ft"], runs["ift"]
    figures = {
        "tokens_per_second_2_ranks_over_1": runs["ift_2_ranks"]["tokens_per_second"] / ift["tokens_per_second"],
        "proxy_overhead_per_step": ift["step_seconds"] / caption["step_seconds"] - 1,
        "proxy_overhead_per_token": (ift["step_seconds"] / ift["tokens_per_step"])
        / (caption["step_seconds"] / caption["tokens_per_step"])
        - 1,
        "data_wait_fraction_without_workers": ift["data_wait_fraction"],
        "data_wait_fraction_with_workers": runs["ift_workers"]["data_wait_fraction"],
        "peak_rss_ratio_20k_over_2k": runs["ift_20k"]["peak_rss_mb"] / runs["ift_workers"]["peak_rss_mb"],
        "peak_pss_ratio_20k_over_2k": runs["ift_20k"]["peak_pss_mb"] / runs["ift_workers"]["peak_pss_mb"],
    }
    result = {
        "config": {**asdict(config), "cpus": len(os.sched_getaffinity(0))},
        "runs": list(runs.values()),
        "figures": figures,
        "seconds": time.perf_counter() - started,
    }
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    Path(config.out).write_text(json.dumps(result, indent=1))
    print(
        f"{'run':<16}{'ranks':>6}{'workers':>8}{'images':>8}{'s/step':>8}{'tokens/s':>10}{'wait':>7}"
        f"{'RSS MB':>8}{'PSS MB':>8}"
    )
    for r in runs.values():
        print(
            f"{r['run']:<16}{r['ranks']:>6}{r['data_workers']:>8}{r['train_images']:>8}{r['step_seconds']:>8.3f}"
            f"{r['tokens_per_second']:>10.0f}{r['data_wait_fraction']:>7.1%}{r['peak_rss_mb']:>8.0f}{r['peak_pss_mb']:>8.0f}"
        )
    for key, value in figures.items():
        print(f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
