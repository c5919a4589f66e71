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
import re
import subprocess
import sys

import pytest
import torch

from medift import engine
from medift.model.loading import load_base_model
from medift.settings import launcher_arguments, option_arguments
from medift.testing.tiny_checkpoints import build_tiny_checkpoint
from medift.train import TrainConfig, checkpoint_due, count_loads, global_batches, my_micro_batches

# One pytest-xdist worker for the module: its slow tests share one reference run (`two_ranks`).
pytestmark = pytest.mark.xdist_group("ranks")

STRICT_LAUNCHER = os.path.join(os.path.dirname(__file__), "fixtures", "strict_collectives.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_wbcatt_shards):
    root = tmp_path_factory.mktemp("ranks")
    return root, tiny_wbcatt_shards, build_tiny_checkpoint("llava", root / "llava")


def run_training(
    setup, name: str, ranks: int, strict: bool = False, environment: dict | None = None, **settings
) -> dict:
    """Train on `ranks` ranks; `strict`: through tests/fixtures/strict_collectives.py (its docstring says why)."""
    root, shards, checkpoint = setup
    out = root / name
    defaults = {
        "shards": shards,
        "base_model": checkpoint,
        "out_dir": out,
        "proxy": True,
        "proxy_tokens": 4,
        "epochs": 2,
        "warmup_epochs": 1,
        "lr": "1e-3",
        "seed": 3,
        "train_modules": "vision,projector",  # the tiny LLaVA has no fusion layers
    }
    program = [STRICT_LAUNCHER] if strict else ["-m", "medift.train"]
    launcher = launcher_arguments(ranks, program, python=sys.executable)
    args = option_arguments({**defaults, **settings})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [*launcher, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **(environment or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return json.loads((out / "train_summary.json").read_text()) | {"out": out, "log": result.stderr + result.stdout}


def weights(directory) -> dict[str, torch.Tensor]:
    model, _ = load_base_model(str(directory))  # plain transformers loads every result
    return {name: p.detach().float() for name, p in model.named_parameters()}


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def two_ranks(setup) -> dict:
    """The module's reference run, trained once: two ranks, micro-batch 1, ZeRO-2 (the default)."""
    out = setup[0] / "two-ranks"
    if (out / "train_summary.json").is_file():
        return json.loads((out / "train_summary.json").read_text()) | {"out": out}
    return run_training(setup, "two-ranks", 2, batch_size=1, gradient_accumulation=1)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_accumulation(setup):
    one = run_training(setup, "one-rank", 1, batch_size=1, gradient_accumulation=2)
    two = two_ranks(setup)
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["global_batch"] == two["global_batch"] == 2
    assert [h["loss"] for h in one["history"]] == pytest.approx([h["loss"] for h in two["history"]], abs=1e-6)
    assert len(two["history"]) == 6  # 2 global steps per epoch (4 images), warm-up + 2 epochs
    assert max_difference(weights(one["out"]), weights(two["out"])) <= 1e-6
    # The proxy is replicated: identical on both ranks at the end, and equal to one rank's.
    assert two["proxy_max_difference_across_ranks"] == 0.0
    from safetensors.torch import load_file

    p1, p2 = load_file(str(one["out"] / "proxy.safetensors")), load_file(str(two["out"] / "proxy.safetensors"))
    assert all(torch.allclose(p1[k], p2[k], atol=1e-6) for k in p1)


@pytest.mark.slow
@pytest.mark.parametrize("stage,offload", [(3, "none"), (2, "optimizer"), (3, "optimizer+parameters")])
def test_zero_stages_and_offload_give_the_same_weights(setup, stage, offload):
    reference = two_ranks(setup)  # ZeRO-2 without offload
    assert reference["config"]["zero_stage"] == 2 and reference["config"]["offload"] == "none"
    other = run_training(setup, f"zero{stage}-{offload}", 2, batch_size=1, zero_stage=stage, offload=offload)
    assert max_difference(weights(reference["out"]), weights(other["out"])) <= 1e-5


def test_impossible_offload_fails_before_training():
    with pytest.raises(ValueError, match=r"offload optimizer\+parameters needs zero_stage 3"):
        TrainConfig(shards="x", base_model="y", out_dir="z", zero_stage=2, offload="optimizer+parameters")
    with pytest.raises(ValueError, match="offload optimizer needs zero_stage 2 or 3"):
        TrainConfig(shards="x", base_model="y", out_dir="z", zero_stage=1, offload="optimizer")


@pytest.mark.parametrize("ranks,accumulation", [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_global_batches_do_not_depend_on_the_rank_count(monkeypatch, ranks, accumulation):
    """Same seed and global batch: the same global batches, every sample on exactly one rank's
    micro-batch, and the same load count (so the same shuffled description) wherever it lands."""
    groups = [3, 3, 3, 1]  # 10 samples in row groups; windows of 2 groups
    config = TrainConfig(
        shards="x",
        base_model="y",
        out_dir="z",
        batch_size=4 // (ranks * accumulation),
        gradient_accumulation=accumulation,
        repeat_train=2,
        seed=5,
        shuffle_window=2,
    )
    monkeypatch.setattr(engine, "world_size", lambda: ranks)
    batches = global_batches(groups, config, epoch=0)
    monkeypatch.setattr(engine, "world_size", lambda: 1)
    reference = global_batches(
        groups,
        TrainConfig(shards="x", base_model="y", out_dir="z", batch_size=4, repeat_train=2, seed=5, shuffle_window=2),
        epoch=0,
    )
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
    batches = global_batches([9], config, epoch=0)  # 8 + 1: the 1 cannot feed 4 micro-batches
    assert [len(b) for b in batches] == [9] and sorted(batches[0]) == list(range(9))
    with pytest.raises(ValueError, match="3 training samples cannot fill 4 micro-batches"):
        global_batches([3], config, epoch=0)


@pytest.mark.slow
def test_collectives_use_the_backends_device_and_ranks_agree_on_checkpoints(setup):
    """Two ranks train under tests/fixtures/strict_collectives.py: every collective medift calls must hold
    its tensors on the device the engine says the backend takes (there a device other than the
    training tensors' CPU, as NCCL's is the GPU), else the rank fails. Rank 1's clock runs 10^4
    times fast, so with checkpoint_minutes 1 only it sees a minute pass at each step (0.3 s):
    both ranks checkpoint at every step only because they agree on the slowest clock (a rank
    checkpointing alone would block in the checkpoint's barrier until the timeout). And rank 0
    alone hashes the shard files."""
    root = setup[0]
    run = run_training(
        setup,
        "strict",
        2,
        strict=True,
        environment={"STRICT_CLOCK_SKEW": "10000"},
        batch_size=1,
        epochs=1,
        checkpoint_dir=root / "strict-checkpoints",
        checkpoint_minutes=1,
    )
    ranks = dict(
        (int(r), (int(n), int(h)))
        for r, n, h in re.findall(
            r"strict collectives: rank (\d) checked (\d+) medift collectives, hashed (\d+) shard files", run["log"]
        )
    )
    assert sorted(ranks) == [0, 1], run["log"][-3000:]
    # each step: its figures, the proxy's gradient
    assert min(n for n, _ in ranks.values()) >= 2 * len(run["history"]), ranks
    # The shards are verified once, on rank 0: its training descriptions and validation questions.
    assert ranks[0][1] == 2 and ranks[1][1] == 0, ranks
    written = re.findall(r"checkpoint \S+step-(\d+) written: (\d+) bytes in ([\d.]+) s", run["log"])
    assert [int(step) for step, _, _ in written] == list(range(1, len(run["history"]) + 1)) == [1, 2, 3, 4]
    assert all(int(size) > 0 for _, size, _ in written)


def test_checkpoints_fall_due_by_steps_or_by_minutes():
    assert [s for s in range(1, 8) if checkpoint_due(s, 0.0, every=3, minutes=0)] == [3, 6]
    assert not checkpoint_due(5, 1799.9, every=0, minutes=30) and checkpoint_due(5, 1800.0, every=0, minutes=30)
    assert checkpoint_due(4, 10.0, every=2, minutes=30) and checkpoint_due(3, 1800.0, every=2, minutes=30)
    assert not checkpoint_due(3, 1e9, every=0, minutes=0)


@pytest.mark.slow
def test_the_strict_checker_refuses_a_cpu_tensor_and_passes_the_helpers():
    """The checker of the two-rank test can fail: the pre-fix all-reduce of a CPU tensor is refused."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, STRICT_LAUNCHER, "--self-test"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "3 helper calls passed; the pre-fix all-reduce was refused" in result.stdout
