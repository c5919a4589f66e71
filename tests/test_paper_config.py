"""config/paper.yaml: the paper's experiment on the four real releases. A dry run with the
placeholder paths replaced by empty folders (and a checkpoint folder with a config.json)
plans exactly the paper's jobs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.fixtures.workflow import REPO, dry_run, rule_counts, snakemake

PAPER_CONFIG = REPO / "config" / "paper.yaml"
DATASETS = ["wbcatt", "cbis_ddsm", "skincon", "mimic_cxr"]


def _filled_in(tmp_path: Path) -> Path:
    """paper.yaml with every /path/to/... placeholder pointing at a folder made here."""
    text = PAPER_CONFIG.read_text()
    placeholders = sorted(set(re.findall(r"/path/to/[\w.-]+", text)))
    assert len(placeholders) == 5  # four releases and the checkpoint
    for placeholder in placeholders:
        folder = tmp_path / "data" / placeholder.rsplit("/", 1)[1]
        folder.mkdir(parents=True)
        text = text.replace(placeholder, str(folder))
    (tmp_path / "data" / "Llama-3.2-11B-Vision-Instruct" / "config.json").write_text('{"model_type": "mllama"}')
    path = tmp_path / "paper.yaml"
    path.write_text(text)
    return path


def test_paper_config_has_the_papers_settings():
    config = yaml.safe_load(PAPER_CONFIG.read_text())
    assert list(config["datasets"]) == DATASETS
    assert all(entry["source"] == "raw" for entry in config["datasets"].values())
    assert config["base_model"]["path"].endswith("Llama-3.2-11B-Vision-Instruct")
    assert config["image_size"] == 560
    train = config["train"]
    assert (train["lr"], train["batch_size"], train["epochs"], train["warmup_epochs"]) == (2e-5, 2, 5, 1)
    assert train["proxy_lr"] is None  # the proxy learns at the model's lr, as in the reference
    assert (train["proxy_tokens"], train["momentum"], train["grad_clip"], train["bf16"]) == (8, 0.999, 1.0, True)
    assert train["train_modules"] == "vision,fusion" and train["shuffle_responses"] is True
    assert train["gradient_checkpointing"] is True
    assert config["datasets"]["cbis_ddsm"]["train"]["repeat_train"] == 3
    assert config["datasets"]["skincon"]["train"]["repeat_train"] == 3
    assert config["seeds"] == [1] and config["evaluate"]["max_new_tokens"] == 50


def test_paper_config_dry_run(tmp_path):
    configfile = _filled_in(tmp_path)
    jobs = dry_run("results/table1.csv", workdir=tmp_path / "work", configfile=configfile)
    assert rule_counts(jobs) == {"make_shards": 4, "train_model": 8, "evaluate_model": 12, "make_table": 1}
    assert {w["dataset"] for rule, w in jobs if rule == "make_shards"} == set(DATASETS)


def test_paper_config_placeholders_stop_the_run(tmp_path):
    result = snakemake("-n", f"--configfile={PAPER_CONFIG}", "results/table1.csv", workdir=tmp_path, check=False)
    assert result.returncode != 0
    assert "Llama-3.2-11B-Vision-Instruct" in result.stdout + result.stderr
