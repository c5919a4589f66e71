"""Loading the base model: in the training dtype onto the training device, partitioned under
ZeRO-3; the real Llama-3.2-11B-Vision configuration's sizes; job resources from model size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures import load_bench

ROOT = Path(__file__).resolve().parents[1]

real_models = load_bench("real_models")


def test_full_size_real_config_has_the_real_parameter_counts():
    counts = real_models.parameter_counts()
    # Llama-3.2-11B-Vision: 10.67 B; vision tower 0.86 B; 8 cross-attention layers 1.74-1.75 B; projector 0.03 B.
    assert counts["total"] / 1e9 == pytest.approx(10.67, abs=0.005)
    assert counts["vision"] / 1e9 == pytest.approx(0.86, abs=0.005)
    assert counts["cross_attention_layers"] / 1e9 == pytest.approx(1.745, abs=0.005)
    assert counts["projector"] / 1e9 == pytest.approx(0.031, abs=0.001)


def test_reduced_depth_keeps_a_valid_real_config():
    config = real_models.mllama_config(text_layers=9, vision_layers=4, global_layers=1)
    assert config.text_config.cross_attention_layers == [3, 8]
    assert config.vision_config.intermediate_layers_indices == [3, 3, 3, 3, 3]
    assert config.vision_config.vision_output_dim == 7680 and config.text_config.hidden_size == 4096
    with pytest.raises(ValueError, match="at least 4 layers"):
        real_models.mllama_config(text_layers=3)


def test_bf16_training_loads_bf16_on_the_training_device():
    from medift import engine
    from medift.model.loading import load_base_model
    from medift.train import TrainConfig, training_dtype

    config = TrainConfig(shards="x", base_model=str(ROOT / "models/embedded-mllama"), out_dir="y", bf16=True)
    assert training_dtype(config) == "bfloat16"
    assert training_dtype(TrainConfig(shards="x", base_model="y", out_dir="z")) == "float32"
    model, _ = load_base_model(config.base_model, dtype=training_dtype(config), device=engine.training_device())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {engine.training_device().type}


@pytest.mark.slow
def test_two_rank_zero3_load_holds_half_the_parameters_per_rank(tmp_path):
    """Through bench/load_memory.py (torchrun, gloo): a tiny Mllama without a proxy token, so the
    embedding resize and its mean rows run on partitioned weights too."""
    load_memory = load_bench("load_memory")

    from medift.testing.tiny_checkpoints import build_tiny_checkpoint

    checkpoint = str(build_tiny_checkpoint("mllama", tmp_path / "mllama"))
    one = load_memory.measure(checkpoint, "bf16_zero3", 1)[0]
    two = load_memory.measure(checkpoint, "bf16_zero3", 2)
    total = one["local_parameters"]
    n_tensors = 200  # each partition is padded by less than one element per tensor
    assert [r["rank"] for r in two] == [0, 1]
    for rank in two:
        assert rank["dtype"] == "bfloat16"
        assert abs(rank["local_parameters"] - total / 2) <= n_tensors
    assert sum(r["local_parameters"] for r in two) >= total


# ------------------------------------------------------------------ job resources


def _dry_run_resources(workdir: Path, overrides: dict | None = None) -> dict[str, dict]:
    """mem_mb and runtime of train_model and evaluate_model from a Snakemake dry run."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    args = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--cores",
        "2",
        "--directory",
        str(workdir),
        "-s",
        str(ROOT / "workflow/Snakefile"),
        "results/table1.csv",
    ]
    if overrides:
        overlay = workdir / "overlay.json"
        overlay.write_text(json.dumps(overrides))
        args += ["--configfile", str(ROOT / "config/config.yaml"), str(overlay)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    found = {}
    for rule, resources in re.findall(r"rule (train_model|evaluate_model):.*?resources: ([^\n]*)", done.stdout, re.S):
        found[rule] = {k: int(v) for k, v in re.findall(r"\b(mem_mb|runtime)=(\d+)", resources)}
    return found


def _fake_11b_checkpoint(directory: Path) -> Path:
    """The real 11B config and processor, and a safetensors file whose header lists the real
    model's tensors (bf16) and whose data is a hole: the 21 GB are never written."""
    from transformers import MllamaForConditionalGeneration

    directory.mkdir(parents=True)
    processor = real_models.mllama_processor()
    config = real_models.mllama_config(tokenizer=processor.tokenizer)
    config.save_pretrained(directory)
    processor.save_pretrained(directory)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    header, offset = {}, 0
    for name, p in model.state_dict().items():
        size = p.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(directory / "model.safetensors", "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        handle.truncate(8 + len(encoded) + offset)  # sparse: no data blocks
    return directory


@pytest.mark.slow
def test_job_resources_follow_the_model_size(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "models").symlink_to(ROOT / "models")
    (workdir / "config").symlink_to(ROOT / "config")
    embedded = _dry_run_resources(workdir)
    # 2.8 M parameters on the CPU: the per-rank overhead (1.5 GB) x 1.25, start-up (10 min) x 1.5.
    assert embedded["train_model"] == {"mem_mb": 1938, "runtime": 16}
    checkpoint = _fake_11b_checkpoint(tmp_path / "llama-11b")
    on_gpus = _dry_run_resources(
        workdir, {"base_model": {"path": str(checkpoint)}, "train": {"accelerator": "cuda", "ranks": 8}}
    )
    # 10.67 B: the checkpoint's pages once (21.3 GB) + 8 x 4 GB, x 1.25; read at 100 MB/s.
    assert on_gpus["train_model"]["mem_mb"] == pytest.approx(1.25 * (2 * 10.67e9 + 8 * 4e9) / 1e6, rel=0.01)
    assert on_gpus["train_model"]["runtime"] == pytest.approx(1.5 * (600 + 2 * 10.67e9 / 100e6) / 60, abs=1)
    assert on_gpus["train_model"]["mem_mb"] > 32000  # what the slurm profile gave every training job
