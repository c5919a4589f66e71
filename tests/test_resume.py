"""Resume: a training job killed (SIGKILL) right after a checkpoint and restarted ends with the
same weights, proxy, losses and validation accuracies as a run that was never interrupted
(CPU, deterministic: the comparison is exact)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from medift.settings import launcher_arguments, option_arguments
from medift.testing.tiny_checkpoints import build_tiny_checkpoint
from tests.fixtures.processes import kill_tree


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint("llava", tmp_path_factory.mktemp("resume") / "llava")


def command(shards, base, out, checkpoints, ranks: int, *extra: str) -> list[str]:
    settings = {
        "shards": shards,
        "base_model": base,
        "out_dir": out,
        "proxy_tokens": 4,
        "warmup_epochs": 1,
        "epochs": 2,
        "batch_size": 2 // ranks,
        "lr": "1e-3",
        "seed": 4,
        "select": "best_val",
        "train_modules": "vision,projector",
        "checkpoint_dir": checkpoints,
        "checkpoint_every": 1,
        "tensorboard_dir": f"{out}-events",
    }
    return [*launcher_arguments(ranks, python=sys.executable), *option_arguments(settings), *extra]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


def run_until_checkpoint(cmd: list[str], step: int) -> str:
    """Start training and SIGKILL it (every rank) as soon as it logs checkpoint `step` (it may
    have written the next one by the time the signal lands: the caller reads `latest`)."""
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(), start_new_session=True
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "checkpoint" in line and f"step-{step:06d} written" in line:
            kill_tree(process.pid)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen[-40:])
    return "".join(seen)


def finish(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_killed_job_resumes_to_the_uninterrupted_result(tmp_path, tiny_wbcatt_shards, checkpoint, ranks):
    # 4 training images, global batch 2: 2 steps per epoch; warm-up 1 epoch + 2 epochs = 6 steps.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finish(command(tiny_wbcatt_shards, checkpoint, straight, tmp_path / "ck-straight", ranks))
    # The interrupted run also decodes its images in 2 DataLoader workers: that must change nothing.
    cmd = command(tiny_wbcatt_shards, checkpoint, resumed, tmp_path / "ck-resumed", ranks, "--data_workers", "2")
    latest = tmp_path / "ck-resumed" / "latest"
    run_until_checkpoint(cmd, 1)  # killed in the warm-up (steps 1 and 2)
    first = int(latest.read_text().split("-")[1])
    assert first in (1, 2)
    log = run_until_checkpoint(cmd, 4)  # resumed there, killed again in the main stage (steps 3-6)
    assert f"resuming from {latest.parent}/step-{first:06d}: step {first} " in log
    second = int(latest.read_text().split("-")[1])
    assert second in (4, 5)
    stderr = finish(cmd)
    assert f"step-{second:06d}: step {second} " in stderr, [line for line in stderr.splitlines() if "medift" in line]

    a = json.loads((straight / "train_summary.json").read_text())
    b = json.loads((resumed / "train_summary.json").read_text())
    assert a["resumed_at_step"] is None and b["resumed_at_step"] == second
    assert b["history"] == a["history"] and len(a["history"]) == 6
    assert b["validation"] == a["validation"] and len(a["validation"]) == 2
    assert b["selected_epoch"] == a["selected_epoch"]
    for name in ("model.safetensors", "proxy.safetensors"):
        wa, wb = load_file(str(straight / name)), load_file(str(resumed / name))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    # TensorBoard: every scalar, once per step; the resumed job's events after its checkpoint replace the killed runs'.
    sa, sb = scalars(straight.parent / "straight-events"), scalars(resumed.parent / "resumed-events")
    assert {
        "warmup/loss",
        "main/loss",
        "train/lr",
        "train/grad_norm",
        "proxy/drift",
        "train/tokens_per_second",
        "validation/accuracy",
    } <= set(sa)
    assert [s for s, _ in sa["main/loss"]] == [3, 4, 5, 6]
    for tag in ("warmup/loss", "main/loss", "proxy/drift", "validation/accuracy", "train/grad_norm"):
        assert sb[tag] == sa[tag], tag
    # The checkpoints are removed once the model is saved.
    assert not (tmp_path / "ck-resumed").exists() and not (tmp_path / "ck-straight").exists()


@pytest.mark.slow
def test_best_val_saves_the_best_epoch_and_validation_matches_evaluation(
    tmp_path, tiny_wbcatt_shards, checkpoint, monkeypatch
):
    """select best_val: with the first of 2 epochs validated best, the saved weights are those
    of a 1-epoch run. And the per-epoch validation accuracy is the evaluation's accuracy on
    the validation split (letter scoring) of the saved model."""
    from medift import train as train_module
    from medift.evaluate import EvaluateConfig, evaluate
    from medift.train import TrainConfig, train

    def config(out: str, **settings) -> TrainConfig:
        return TrainConfig(
            shards=str(tiny_wbcatt_shards),
            base_model=str(checkpoint),
            out_dir=str(tmp_path / out),
            proxy_tokens=4,
            warmup_epochs=1,
            lr=1e-3,
            batch_size=2,
            seed=4,
            train_modules="vision,projector",
            **settings,
        )

    one = train(config("one-epoch", epochs=1))
    metrics = evaluate(
        EvaluateConfig(
            model=str(tmp_path / "one-epoch"),
            shards=str(tiny_wbcatt_shards),
            split="val",
            scoring="letter",
            circular=False,
            out=str(tmp_path / "val.csv"),
            summary=str(tmp_path / "val.json"),
        )
    )
    assert [v["accuracy"] for v in one["validation"]] == [metrics["accuracy"]]

    measured = iter([50.0, 10.0])  # epoch 1 best, epoch 2 worse
    monkeypatch.setattr(train_module.Validation, "accuracy", lambda self, model, processor, proxy: next(measured))
    best = train(config("best", epochs=2, select="best_val"))
    assert best["selected_epoch"] == 0 and [v["accuracy"] for v in best["validation"]] == [50.0, 10.0]
    saved, reference = (
        load_file(str(tmp_path / "best" / "model.safetensors")),
        load_file(str(tmp_path / "one-epoch" / "model.safetensors")),
    )
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
    monkeypatch.undo()
    last = train(config("last", epochs=2))
    assert not all(
        torch.equal(load_file(str(tmp_path / "last" / "model.safetensors"))[k], reference[k]) for k in reference
    )
    assert last["selected_epoch"] == 1
