"""Choose the fine-tuning recipe of the embedded default on the validation split only.

Each trial is the default config (config/config.yaml) with some `train` settings (and
dataset sizes) changed, run through the real DAG (`results/table1.csv`) in its own work
directory under resources/recipe-search/, evaluated on `evaluate.split: val`: MCQ
accuracy, format retention and description accuracy per method and dataset, plus each
training job's final description loss. One row per (trial, method, dataset) is appended to
the output CSV, so trials can be run a few at a time and compared in one file.

    HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu .venv/bin/python research/recipe_search.py \
        --trials base lr3e-3 --out results/research/recipe_search.csv

The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]

# name -> overrides: {"train": {...}} merged into the global train block,
# {"datasets": {...}} into every dataset entry, {"base_model": {...}} into the base_model block.
TRIALS: dict[str, dict] = {
    "base": {},
    "lr3e-3": {"train": {"lr": 3e-3}},
    "lr3e-4": {"train": {"lr": 3e-4}},
    "lr1e-4": {"train": {"lr": 1e-4}},
    "lr3e-5": {"train": {"lr": 3e-5}},
    "lr1e-5": {"train": {"lr": 1e-5}},
    "epochs10": {"train": {"epochs": 10}},
    "lr3e-3_epochs10": {"train": {"lr": 3e-3, "epochs": 10}},
    "fusion_only": {"train": {"train_modules": "fusion"}},
    "vision_only_lr1e-4": {"train": {"train_modules": "vision", "lr": 1e-4}},
    "lr1e-5_epochs10": {"train": {"lr": 1e-5, "epochs": 10}},
    "lr3e-5_epochs10": {"train": {"lr": 3e-5, "epochs": 10}},
    "n1000": {"datasets": {"synthetic": {"n_train": 1000}}},
    "n1000_lr3e-3": {"datasets": {"synthetic": {"n_train": 1000}}, "train": {"lr": 3e-3}},
}
# The proxy's own lr, on 200 validation images per dataset (60 gave intervals of +-13 points).
VAL200 = {"datasets": {"synthetic": {"n_val": 200}}}
TRIALS["val200"] = VAL200
# The baselines do not depend on the proxy's lr: these trials train and evaluate ift alone.
for _proxy_lr in (1e-3, 1e-2, 3e-2, 1e-1):
    TRIALS[f"val200_plr{_proxy_lr:g}"] = {**VAL200, "train": {"proxy_lr": _proxy_lr}, "methods": ["ift"]}

# The model's lr with the proxy's, over three training seeds (ift alone; the baselines' rows
# come from the s3_baselines trials at the same model lr).
for _lr in (1e-5, 3e-5, 1e-4):
    for _proxy_lr in (1e-3, 3e-3, 1e-2):
        TRIALS[f"s3_lr{_lr:g}_plr{_proxy_lr:g}"] = {
            **VAL200,
            "seeds": [1, 2, 3],
            "methods": ["ift"],
            "train": {"lr": _lr, "proxy_lr": _proxy_lr},
        }
    TRIALS[f"s3_baselines_lr{_lr:g}"] = {
        **VAL200,
        "seeds": [1, 2, 3],
        "methods": ["zero_shot", "caption_ft"],
        "train": {"lr": _lr},
    }


def trial_config(overrides: dict) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["base_model"].update(overrides.get("base_model", {}))
    config["train"].update(overrides.get("train", {}))
    if "seeds" in overrides:
        config["seeds"] = overrides["seeds"]
    for entry in config["datasets"].values():
        for key, value in overrides.get("datasets", {}).items():
            entry[key] = {**entry.get(key, {}), **value} if isinstance(value, dict) else value
    config["evaluate"]["split"] = "val"
    config["tables"] = {"table1": overrides.get("methods", config["tables"]["table1"])}
    return config


def epoch_mean_loss(history: list[dict], stage: str, which: int) -> float | None:
    """Mean loss over the steps of one epoch (0: first, -1: last) of a stage; None without that stage."""
    steps = [h for h in history if h.get("stage") == stage]
    if not steps:
        return None
    epoch = steps[which]["epoch"]
    losses = [h["loss"] for h in steps if h["epoch"] == epoch]
    return round(sum(losses) / len(losses), 4)


def training_losses(work: Path) -> dict[tuple[str, str], dict[str, float | None]]:
    """Per (dataset, method), mean over seeds: the last main epoch's loss and the warm-up's first
    step and last epoch (how far the warm-up alone brought the proxy)."""
    per_job: dict[tuple[str, str], list[dict]] = {}
    for summary in work.glob("resources/models/*/*/seed-*/train_summary.json"):
        history = json.loads(summary.read_text()).get("history") or []
        warmup = [h for h in history if h.get("stage") == "warmup"]
        per_job.setdefault((summary.parts[-4], summary.parts[-3]), []).append(
            {
                "final_loss": epoch_mean_loss(history, "main", -1),
                "warmup_first_loss": warmup[0]["loss"] if warmup else None,
                "warmup_last_loss": epoch_mean_loss(history, "warmup", -1),
            }
        )
    return {
        key: {
            name: None if any(j[name] is None for j in jobs) else round(sum(j[name] for j in jobs) / len(jobs), 4)
            for name in jobs[0]
        }
        for key, jobs in per_job.items()
    }


def run_trial(name: str, overrides: dict, root: Path) -> pd.DataFrame:
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "models").exists():
        (work / "models").symlink_to(REPO / "models")
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(trial_config(overrides), sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    started = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "workflow" / "Snakefile"),
            "--cores",
            "2",
            "--directory",
            str(work),
            f"--configfile={configfile}",
            "results/table1.csv",
            "--quiet",
            "rules",
        ],
        cwd=REPO,
        env=env,
        check=True,
    )
    seconds = round(time.time() - started, 1)
    long = pd.read_csv(work / "results" / "table1_long.csv")
    losses = training_losses(work)
    for column in ("final_loss", "warmup_first_loss", "warmup_last_loss"):
        long[column] = [losses.get((d, m), {}).get(column) for d, m in zip(long["dataset"], long["method"])]
    long.insert(0, "trial", name)
    long.insert(1, "overrides", json.dumps(overrides, sort_keys=True))
    long["trial_seconds"] = seconds
    return long


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", nargs="+", required=True, help=f"trial names: {', '.join(TRIALS)}")
    parser.add_argument("--out", default="results/research/recipe_search.csv")
    parser.add_argument("--root", default="resources/recipe-search")
    parser.add_argument("--base-model", default="", help="base_model.path of every trial (default: the config's)")
    parser.add_argument(
        "--tag", default="", help="prefix of the trial names (and work directories), e.g. the base model's name"
    )
    args = parser.parse_args()
    unknown = [t for t in args.trials if t not in TRIALS]
    if unknown:
        parser.error(f"unknown trials {unknown}; known: {', '.join(TRIALS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = [
        "trial",
        "method",
        "dataset",
        "accuracy",
        "format_retention",
        "description_accuracy",
        "final_loss",
        "warmup_first_loss",
        "warmup_last_loss",
    ]
    for name in args.trials:
        overrides = TRIALS[name]
        if args.base_model:
            overrides = {**overrides, "base_model": {"path": str(Path(args.base_model).resolve())}}
        rows = run_trial(f"{args.tag}-{name}" if args.tag else name, overrides, Path(args.root).resolve())
        rows.to_csv(out, mode="a", header=not out.exists(), index=False)
        print(rows[columns].to_string(index=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
