"""bench/real_size.py in its tiny form: every section runs on a tiny Mllama (2 tiles of 28 px) through
the same code that runs the full 11B on a GPU, and its figures hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medift.testing.tiny_checkpoints import build_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_real_size_benchmark_runs_every_section_on_a_tiny_mllama(tmp_path):
    checkpoint = build_tiny_checkpoint("mllama", tmp_path / "mllama")
    out = tmp_path / "real_size.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "real_size.py"),
            "--checkpoint",
            str(checkpoint),
            "--device",
            "cpu",
            "--steps",
            "1",
            "--questions",
            "8",
            "--repeats",
            "1",
            "--ranks",
            "1",
            "2",
            "--load_modes",
            "fp32_full",
            "bf16_zero3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]

    # The full-size model's parameters, counted on the meta device: the 11B's published 10.67 B.
    assert sections["counts"]["total"] == pytest.approx(10.67e9, rel=1e-3)

    # Each checkpointing mode trained; the shipped one is the baseline of the ratios.
    modes = sections["step"]["modes"]
    assert set(modes) == {"fixed", "shipped", "off"}
    for row in modes.values():
        assert row["step_seconds"] > 0 and row["samples_per_second"] > 0
        assert row["model_flops_per_step"] < row["hardware_flops_per_step"]  # padding tiles are not useful work
        assert row["mfu"] is None and row["peak_gpu_memory_gib"] is None  # no peak FLOP/s or GPU memory on a CPU
    assert modes["shipped"]["speed_vs_shipped"] == 1.0
    # Recompute is hardware work: medift's checkpointing recomputes the vision layers too, transformers'
    # own only the decoder's, none without checkpointing.
    hardware = {mode: row["hardware_flops_per_step"] for mode, row in modes.items()}
    assert hardware["fixed"] > hardware["shipped"] > hardware["off"]
    assert len({row["model_flops_per_step"] for row in modes.values()}) == 1  # useful work is the same in every mode

    # The real tile alone is a different computation than the padded one (Mllama's real patches
    # attend to the padding tiles): the outputs differ, and the bench says by how much.
    tiles = sections["tiles"]
    assert tiles["tiles_computed"] == 2 and tiles["real_tiles"] == 1
    assert 0 < tiles["max_abs_difference"] < tiles["output_max_abs"]

    for batch in ("batch_8", "batch_32"):
        assert sections["scoring"][batch]["questions"] == 8 and sections["scoring"][batch]["questions_per_second"] > 0

    # ZeRO-3 on two ranks: each rank holds about half of the parameters one rank holds.
    load = {(r["mode"], r["ranks"]): r["per_rank"] for r in sections["load"]["results"]}
    whole = load[("fp32_full", 1)][0]["local_parameters"]
    halves = [rank["local_parameters"] for rank in load[("bf16_zero3", 2)]]
    assert load[("bf16_zero3", 1)][0]["local_parameters"] == whole
    assert all(0.45 * whole <= half <= 0.55 * whole for half in halves)
