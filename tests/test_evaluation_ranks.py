"""Evaluation on several ranks (torchrun, gloo on the CPU): the questions are shared out by row
group and merged in order, so two ranks write the same predictions, byte for byte, as one; a
benchmark's unlabelled and refused questions are merged too. The workflow starts it (evaluate.ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from medift.benchmarks import BenchmarkConfig, make_benchmark_shards
from medift.settings import launcher_arguments, option_arguments
from medift.shards import QUESTIONS, ShardRows
from medift.testing.tiny_checkpoints import build_tiny_checkpoint
from tests.fixtures.data import synthetic_shards
from tests.fixtures.own_data import write_vlmevalkit_tsv


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation-ranks")
    # 70 test questions: two row groups of the shards (64 rows a group), so each rank has one.
    synthetic_shards(root, seed=5, n_train=2, n_val=1, n_test=70, image_size=32)
    assert len(ShardRows(root / "shards", QUESTIONS, "test", ["question_id"]).group_sizes()) == 2
    write_vlmevalkit_tsv(root / "bench.tsv")
    make_benchmark_shards(
        BenchmarkConfig(
            file=str(root / "bench.tsv"), out_dir=str(root / "bench"), report=str(root / "bench.json"), image_size=32
        )
    )
    return root, build_tiny_checkpoint("qwen2_vl", root / "qwen2_vl")


def run_evaluation(setup, shards: str, ranks: int, name: str) -> dict:
    root, checkpoint = setup
    out = root / name
    out.mkdir()
    settings = {
        "model": checkpoint,
        "shards": root / shards,
        "out": out / "predictions.csv",
        "summary": out / "metrics.json",
        "unlabelled": out / "unlabelled.csv",
        "scoring": "letter",
        "batch_size": 8,
        "device": "cpu",
    }
    command = [
        *launcher_arguments(ranks, ("-m", "medift.evaluate"), python=sys.executable),
        *option_arguments(settings),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return {"dir": out, "summary": json.loads((out / "metrics.json").read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("shards", ["shards", "bench"])
def test_two_ranks_write_what_one_rank_writes(setup, shards):
    one = run_evaluation(setup, shards, 1, f"{shards}-one")
    two = run_evaluation(setup, shards, 2, f"{shards}-two")
    assert two["summary"]["ranks"] == 2 and one["summary"]["ranks"] == 1
    for name in ("predictions.csv", "unlabelled.csv"):
        assert (two["dir"] / name).read_bytes() == (one["dir"] / name).read_bytes(), name
    drop = ("seconds", "scoring_seconds", "ranks")
    assert {k: v for k, v in two["summary"].items() if k not in drop} == {
        k: v for k, v in one["summary"].items() if k not in drop
    }
