"""Several ranks per training job: torchrun-started CPU ranks (gloo) against one rank with
gradient accumulation, ZeRO stages 2 and 3 and CPU offload, on a tiny LLaVA checkpoint.

Tolerances: two ranks sum two fp32 gradients where one rank accumulates the same two in the
same order, so the runs are expected to agree exactly (stated: 1e-6). ZeRO-3 reduce-scatters
partitioned gradients, which sums in another order; after 6 AdamW steps (whose division by
sqrt(v) amplifies differences in small gradients) 2.2e-6 was measured, so 1e-5 is allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from medift import engine
from medift.model.loading import load_base_model
from medift.model.tiny import build_tiny_checkpoint
from medift.train import TrainConfig, count_loads, global_batches, my_micro_batches


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_wbcatt_shards):
    root = tmp_path_factory.mktemp("ranks")
    return root, tiny_wbcatt_shards, build_tiny_checkpoint("llava", root / "llava")


def run_training(setup, name: str, ranks: int, **settings) -> dict:
    root, shards, checkpoint = setup
    out = root / name
    args = ["--shards", str(shards), "--base_model", str(checkpoint), "--out_dir", str(out),
            "--proxy", "True", "--proxy_tokens", "4", "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-3", "--seed", "3"]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    launcher = [sys.executable, "-m", "medift.train"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(ranks),
        "-m", "medift.train"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300,
                            env={**env, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "train_summary.json").read_text()) | {"out": out}


def weights(directory) -> dict[str, torch.Tensor]:
    model, _ = load_base_model(str(directory))  # plain transformers loads every result
    return {name: p.detach().float() for name, p in model.named_parameters()}


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_equal_one_rank_with_accumulation(setup):
    one = run_training(setup, "one-rank", 1, batch_size=1, gradient_accumulation=2)
    two = run_training(setup, "two-ranks", 2, batch_size=1, gradient_accumulation=1)
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["global_batch"] == two["global_batch"] == 2
    assert [h["loss"] for h in one["history"]] == pytest.approx([h["loss"] for h in two["history"]], abs=1e-6)
    assert len(two["history"]) == 6  # 2 global steps per epoch (4 images), warm-up + 2 epochs
    assert max_difference(weights(one["out"]), weights(two["out"])) <= 1e-6
    # The proxy is replicated: identical on both ranks at the end, and equal to one rank's.
    assert two["proxy_max_difference_across_ranks"] == 0.0
    from safetensors.torch import load_file

    p1, p2 = load_file(str(one["out"] / "proxy.safetensors")), load_file(str(two["out"] / "proxy.safetensors"))
    assert all(torch.allclose(p1[k], p2[k], atol=1e-6) for k in p1)


@pytest.mark.parametrize("stage,offload", [(3, "none"), (2, "optimizer"), (3, "optimizer+parameters")])
def test_zero_stages_and_offload_give_the_same_weights(setup, stage, offload):
    reference_dir = setup[0] / "zero2"
    if not (reference_dir / "train_summary.json").is_file():
        run_training(setup, "zero2", 2, batch_size=1, zero_stage=2)
    other = run_training(setup, f"zero{stage}-{offload}", 2, batch_size=1, zero_stage=stage, offload=offload)
    assert max_difference(weights(reference_dir), weights(other["out"])) <= 1e-5


def test_impossible_offload_fails_before_training():
    with pytest.raises(ValueError, match="offloading parameters needs zero_stage 3"):
        TrainConfig(shards="x", base_model="y", out_dir="z", zero_stage=2, offload="optimizer+parameters")
    with pytest.raises(ValueError, match="offload needs zero_stage 2 or 3"):
        TrainConfig(shards="x", base_model="y", out_dir="z", zero_stage=1, offload="optimizer")


@pytest.mark.parametrize("ranks,accumulation", [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_global_batches_do_not_depend_on_the_rank_count(monkeypatch, ranks, accumulation):
    """Same seed and global batch: the same global batches, every sample on exactly one rank's
    micro-batch, and the same load count (so the same shuffled description) wherever it lands."""
    config = TrainConfig(shards="x", base_model="y", out_dir="z", batch_size=4 // (ranks * accumulation),
                         gradient_accumulation=accumulation, repeat_train=2, seed=5)
    monkeypatch.setattr(engine, "world_size", lambda: ranks)
    batches = global_batches(10, config, epoch=0)
    monkeypatch.setattr(engine, "world_size", lambda: 1)
    reference = global_batches(10, TrainConfig(shards="x", base_model="y", out_dir="z", batch_size=4,
                                               repeat_train=2, seed=5), epoch=0)
    assert batches == reference  # 20 samples: 4 + 4 + 4 + 4 + 4
    monkeypatch.setattr(engine, "world_size", lambda: ranks)
    counts_seen, loads = [], {}
    for indices in batches:
        counts = count_loads(indices, loads)
        parts = []
        for r in range(ranks):
            monkeypatch.setattr(engine, "rank", lambda r=r: r)
            parts += [pair for micro in my_micro_batches(indices, counts, config) for pair in micro]
        assert parts == list(zip(indices, counts))
        counts_seen += counts
    assert sorted(loads.values()) == [2] * 10 and len(counts_seen) == 20


def test_a_last_batch_too_small_for_every_rank_joins_the_one_before(monkeypatch):
    monkeypatch.setattr(engine, "world_size", lambda: 2)
    config = TrainConfig(shards="x", base_model="y", out_dir="z", batch_size=2, gradient_accumulation=2)
    batches = global_batches(9, config, epoch=0)  # 8 + 1: the 1 cannot feed 4 micro-batches
    assert [len(b) for b in batches] == [9] and sorted(batches[0]) == list(range(9))
    with pytest.raises(ValueError, match="3 training samples cannot fill 4 micro-batches"):
        global_batches(3, config, epoch=0)
