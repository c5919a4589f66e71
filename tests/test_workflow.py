"""The Snakemake workflow: lint, dry runs of the real DAG, invalidation, and an end-to-end run.

Every run goes into a temporary working directory (`--directory`) with the repository's
Snakefile, so nothing is written to the checkout. The end-to-end test (marked `e2e`,
deselect with `-m "not e2e"`) fine-tunes and evaluates the committed embedded base
model `models/embedded-mllama` (the tiny Mllama) on tiny synthetic data; it is skipped while that model is
absent.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from medift.tables import PREDICTION_COLUMNS
from tests.fixtures.processes import kill_tree
from tests.fixtures.workflow import (
    DATA_TARGETS,
    DATASETS,
    DEFAULT_CONFIG,
    REPO,
    SNAKEFILE,
    TABLE1,
    TABLE2,
    TABLE3,
    copy_embedded_models,
    default_config,
    dry_run,
    dry_run_jobs,
    embedded_base_available,
    printed_dry_run,
    rule_counts,
    snakemake,
    tiny_config,
    workflow_env,
    write_config,
)

# --------------------------------------------------------------------------- static checks


def test_lint_is_clean():
    result = snakemake("--lint")
    assert "Congratulations" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "results/table1.csv",
            {"synthesize_raw_data": 2, "make_shards": 2, "train_model": 4, "evaluate_model": 6, "make_table": 1},
        ),
        (
            "all",
            {
                "synthesize_raw_data": 2,
                "make_shards": 2,
                "make_instructions": 2,
                "make_candidates": 2,
                "select_candidates": 2,
                "make_preferences": 2,
                "train_model": 18,
                "evaluate_model": 18,
                "make_table": 3,
                "evaluate_base_model": 1,
                "all": 1,
            },
        ),
    ],
)
def test_dry_run_default_config(tmp_path, target, expected):
    """A fresh clone: the committed embedded base model is there, nothing else."""
    if (REPO / "models").is_dir():
        (tmp_path / "models").symlink_to(REPO / "models")  # a dry run writes nothing
    jobs = dry_run(target, workdir=tmp_path, configfile=DEFAULT_CONFIG)
    if not embedded_base_available():
        expected = {**expected, "pretrain_base_model": 1, "distill_base_model": 1}
    assert rule_counts(jobs) == expected
    evaluated = {(w["dataset"], w["method"]) for rule, w in jobs if rule == "evaluate_model"}
    assert {w["seed"] for rule, w in jobs if rule in ("evaluate_model", "train_model")} == {"1"}
    methods = TABLE1 if target == "results/table1.csv" else TABLE1 + TABLE2[1:] + TABLE3[3:]
    assert evaluated == {(d, m) for d in DATASETS for m in methods}
    trained = {(w["dataset"], w["method"]) for rule, w in jobs if rule == "train_model"}
    # st_dpo's first stage is trained (st_dpo starts from it) but in no table.
    stages = {(d, "st_dpo_stage1") for d in DATASETS} if target == "all" else set()
    assert trained == {(d, m) for d, m in evaluated if m != "zero_shot"} | stages


@pytest.mark.parametrize(
    ("forced", "expected"),
    [
        (["distill_base_model"], ["distill_base_model", "evaluate_base_model"]),
        # The teacher is `ancient` to the Mllama: rebuilding it does not by itself rebuild the
        # Mllama (README: two commands rebuild both).
        (["pretrain_base_model"], ["pretrain_base_model"]),
        (["pretrain_base_model", "distill_base_model"], ["pretrain_base_model"]),
    ],
)
def test_the_embedded_models_are_rebuilt_only_when_forced(tmp_path, forced, expected):
    """Committed, so a fresh clone runs neither rule (the teacher is `ancient`: checkout
    times never make the Mllama look out of date)."""
    copy_embedded_models(tmp_path)
    jobs = dry_run("results/base_model.json", workdir=tmp_path, configfile=DEFAULT_CONFIG)
    assert [rule for rule, _ in jobs] == ["evaluate_base_model"]
    (tmp_path / "models" / "embedded-base" / "model.safetensors").touch()  # a newer teacher
    jobs = dry_run("results/base_model.json", workdir=tmp_path, configfile=DEFAULT_CONFIG)
    assert [rule for rule, _ in jobs] == ["evaluate_base_model"]
    # (the target first: --forcerun takes every argument after it)
    result = snakemake(
        "-n", f"--configfile={DEFAULT_CONFIG}", "results/base_model.json", "--forcerun", *forced, workdir=tmp_path
    )
    assert [rule for rule, _ in dry_run_jobs(result.stdout + result.stderr)] == expected


def test_dry_run_real_checkpoint_has_no_pretraining(tmp_path):
    from medift.testing.tiny_checkpoints import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("mllama", tmp_path / "checkpoint")
    config = write_config(tmp_path / "config.yaml", {**default_config(), "base_model": {"path": str(checkpoint)}})
    result = snakemake("-n", f"--configfile={config}", "all", workdir=tmp_path / "work")
    output = result.stdout + result.stderr
    counts = rule_counts(dry_run_jobs(output))
    assert "pretrain_base_model" not in counts and "evaluate_base_model" not in counts
    assert counts["train_model"] == 18 and counts["make_table"] == 3
    assert f"--base_model {checkpoint} " in output
    assert f"--model {checkpoint} " in output  # zero_shot evaluates the checkpoint itself
    assert "--image_size 28 " in output  # image_size: auto is the checkpoint's tile (tiny Mllama: 28 px)


def test_real_checkpoint_settings_are_checked_before_any_job(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "bert"}')
    config = write_config(tmp_path / "config.yaml", {**default_config(), "base_model": {"path": str(checkpoint)}})
    result = snakemake("-n", f"--configfile={config}", "all", workdir=tmp_path / "work", check=False)
    assert result.returncode != 0 and "model_type 'bert' is not a known VLM family" in result.stdout + result.stderr
    lora = copy.deepcopy(default_config())
    lora["methods"]["ift"].update(train_modules="vision,lora", zero_stage=3)
    result = snakemake(
        "-n",
        f"--configfile={write_config(tmp_path / 'lora.yaml', lora)}",
        "all",
        workdir=tmp_path / "work",
        check=False,
    )
    assert (
        result.returncode != 0
        and "methods.ift on wbcatt: LoRA with ZeRO-3 is not supported" in result.stdout + result.stderr
    )


def test_several_ranks_start_through_torchrun_with_their_threads(tmp_path):
    config = copy.deepcopy(default_config())
    config["methods"]["ift"].update(ranks=2, gradient_accumulation=2)
    output = printed_dry_run(config, tmp_path)
    ift = [
        block
        for block in output.split("\n\n")
        if "seed-1/model.safetensors" in block and "medift.train" in block and "/ift/" in block
    ]
    assert ift and all(
        "torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 -m medift.train" in b for b in ift
    )
    assert all(
        "--gradient_accumulation 2" in b and "--threads $(( (2 + 2 - 1) / 2 ))" in b and "threads: 2" in b for b in ift
    )
    caption = [
        block
        for block in output.split("\n\n")
        if "/caption_ft/seed-1/model.safetensors" in block and "medift.train" in block
    ]
    assert caption and all("HF_HUB_OFFLINE=1 python -m medift.train" in b for b in caption)


def _job_blocks(output: str, rule: str) -> list[tuple[dict[str, str], str]]:
    """(resources, shell command) of every job of `rule` in a dry run's `-p` output."""
    jobs = []
    for block in output.split("\n\n"):
        if re.search(rf"^(?:local)?rule {rule}:$", block, re.M):
            resources = dict(
                item.split("=", 1) for item in re.search(r"^\s+resources: (.*)$", block, re.M).group(1).split(", ")
            )
            jobs.append((resources, re.search(r"^Shell command: (.*)$", block, re.M).group(1)))
    return jobs


def test_evaluation_ranks_start_through_torchrun(tmp_path):
    config = copy.deepcopy(default_config())
    config["evaluate"].update(ranks=2, threads=2)
    output = printed_dry_run(config, tmp_path)
    jobs = _job_blocks(output, "evaluate_model")
    assert len(jobs) == 6
    launcher = "python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 -m medift.evaluate"
    # 2 threads x 2 ranks, capped at the test's --cores 2, shared out over the ranks.
    assert all(launcher in shell and "--threads $(( 2 / 2 ))" in shell for _, shell in jobs)


def test_local_gpu_jobs_take_cards_of_their_own(tmp_path):
    """On an 8-card machine (`gpus: 8`; no GPU needed for a dry run) each training job takes a
    card per rank and each evaluation one, through medift.gpus, and Snakemake's `gpu` resource
    caps them at 8; a dry run needs nothing of the machine's own cards."""
    config = copy.deepcopy(default_config())
    config["gpus"] = 8
    config["train"].update(accelerator="cuda")
    config["methods"]["ift"].update(ranks=2, global_batch=32)  # 16 x 2 ranks: accumulation 1
    config["evaluate"]["device"] = "cuda"
    output = printed_dry_run(config, tmp_path)
    train, evaluate = _job_blocks(output, "train_model"), _job_blocks(output, "evaluate_model")
    assert len(train) == 4 and len(evaluate) == 6
    for resources, shell in train:
        ranks = 2 if "/ift/" in shell else 1
        assert resources["gpu"] == str(ranks)
        launcher = "python -m torch.distributed.run --standalone" if ranks == 2 else "python -m medift.train"
        assert f"DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 python -m medift.gpus --take {ranks} -- {launcher}" in shell
        assert "--gradient_accumulation 1 --global_batch " + str(16 * ranks) in shell
    for resources, shell in evaluate:
        assert resources["gpu"] == "1" and "python -m medift.gpus --take 1 -- python -m medift.evaluate" in shell
    # CPU jobs (the default) take no card: their commands run as they are.
    for device, cards in (("cpu", "0"), ("auto", "0")):  # auto: this machine has no card
        config = copy.deepcopy(default_config())
        config["evaluate"]["device"] = device
        output = printed_dry_run(config, tmp_path / device)
        assert all(r["gpu"] == "0" and "python -m medift.gpus" not in s for r, s in _job_blocks(output, "train_model"))
        assert all(
            r["gpu"] == cards and f"medift.gpus --take {cards} --" in s
            for r, s in _job_blocks(output, "evaluate_model")
        )


def test_global_batch_derives_the_accumulation(tmp_path):
    config = copy.deepcopy(default_config())
    config["train"].update(batch_size=4, global_batch=32)
    config["methods"]["ift"].update(ranks=2)
    output = printed_dry_run(config, tmp_path)
    for _, shell in _job_blocks(output, "train_model"):
        accumulation = 4 if "/ift/" in shell else 8  # 32 / (4 x 2 ranks), 32 / (4 x 1 rank)
        assert f"--batch_size 4 --gradient_accumulation {accumulation} --global_batch 32 " in shell


def test_the_proxy_learns_at_the_model_lr_unless_its_own_is_set(tmp_path):
    config = copy.deepcopy(default_config())
    config["train"].update(lr=3.0e-5, proxy_lr=None)
    config["methods"]["ift_no_momentum"]["proxy_lr"] = 2.0e-3
    config["methods"]["caption_ft"]["proxy_lr"] = 5.0e-3  # no proxy: a job parameter that changes nothing
    output = printed_dry_run(config, tmp_path, "results/table1.csv", "results/table2.csv")
    blocks = [b for b in output.split("\n\n") if "medift.train" in b and "seed-1/model.safetensors" in b]
    of = {
        method: [b for b in blocks if f"/{method}/seed-1/" in b] for method in ("ift", "ift_no_momentum", "caption_ft")
    }
    assert all(of.values())
    assert all("--lr 3e-05 --proxy_lr 3e-05" in b for b in of["ift"] + of["caption_ft"])
    assert all("--lr 3e-05 --proxy_lr 0.002" in b for b in of["ift_no_momentum"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["tables"]["table1"].append("no_such_method"), "no_such_method"),
        (lambda c: c["datasets"]["wbcatt"].update(source="raw"), "raw_dir"),
        (lambda c: c["train"].update(accelerator="tpu"), "tpu"),
        (lambda c: c["train"].update(proxy_lr=0.0), "proxy_lr"),
        (lambda c: c["datasets"].update(mnist={"source": "synthetic"}), "adapter"),
        (lambda c: c["datasets"].update(skincon={"source": "synthetic"}), "needs a real checkpoint"),
        (
            lambda c: c["train"].update(offload="optimizer+parameters"),
            "offload optimizer+parameters needs zero_stage 3",
        ),
        (lambda c: c["methods"]["ift"].update(nodes=2), "every training job spans one node or every job several"),
        # The paper's global batch of 2 cannot come from micro-batches of 2 on 8 ranks.
        (
            lambda c: c["train"].update(batch_size=2, global_batch=2, ranks=8),
            "global_batch 2 cannot be made of micro-batches of 2 on 8 rank(s) in all",
        ),
        (
            lambda c: c["train"].update(global_batch=64, gradient_accumulation=3),
            "gradient_accumulation 3 contradicts global_batch 64",
        ),
        (
            lambda c: c["evaluate"].update(device="cuda:1"),
            "evaluate.device cuda:1: the workflow gives each evaluation job a card",
        ),
        (
            lambda c: c.update(gpus=2) or c["train"].update(accelerator="cuda", ranks=4),
            "needs 4 GPU card(s), but this machine has 2 (0,1)",
        ),
        # The baselines' keys and settings (docs/baselines.md).
        (lambda c: c["methods"]["st_dpo"].pop("start_from"), "methods.st_dpo: data preferences needs start_from"),
        (lambda c: c["methods"]["inst_ft"].update(proxy=True), "methods.inst_ft: data instructions"),
        (lambda c: c["methods"]["vital_select"].update(keep_fraction=1.5), "keep_fraction"),
        (lambda c: c.update(baselines={"candidates": {"top_p": 2.0}}), "top_p"),
        (lambda c: c.update(baselines={"instructions": {"forms": "mcq,essay"}}), "forms"),
        (lambda c: c.update(judge={"kind": "hosted", "url": "http://127.0.0.1:9/v1"}), "judge"),
    ],
)
def test_invalid_config_is_rejected(tmp_path, change, message):
    config = copy.deepcopy(default_config())
    change(config)
    result = snakemake(
        "-n", f"--configfile={write_config(tmp_path / 'config.yaml', config)}", workdir=tmp_path, check=False
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_several_nodes_need_the_slurm_executor(tmp_path):
    """train.nodes > 1 fails locally once the DAG is built, before any job runs."""
    config = copy.deepcopy(default_config())
    config["train"]["nodes"] = 2
    result = snakemake(
        f"--configfile={write_config(tmp_path / 'config.yaml', config)}",
        "results/table1.csv",
        workdir=tmp_path / "work",
        check=False,
    )
    assert result.returncode != 0
    assert "train.nodes 2: training on several nodes needs the SLURM executor" in result.stdout + result.stderr
    assert not (tmp_path / "work" / "resources").exists()


def _slurm_train_jobs(tmp_path, train: dict) -> list[tuple[dict[str, object], str]]:
    """(resources, shell command) of table 1's training jobs in a dry run with the SLURM executor."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    tmp_path.mkdir(exist_ok=True)
    config = copy.deepcopy(default_config())
    config["train"].update(train)
    result = snakemake(
        "-n",
        "-p",
        "results/table1.csv",
        f"--configfile={write_config(tmp_path / 'config.yaml', config)}",
        "--executor",
        "slurm",
        "--jobs",
        "10",
        workdir=tmp_path / "work",
    )
    jobs = []
    for block in (result.stdout + result.stderr).split("\n\n"):
        if "rule train_model:" in block:
            resources = dict(
                item.split("=", 1) for item in re.search(r"^\s+resources: (.*)$", block, re.M).group(1).split(", ")
            )
            jobs.append((resources, re.search(r"^Shell command: (.*)$", block, re.M).group(1)))
    assert len(jobs) == 4
    return jobs


def _sbatch_call(resources: dict[str, str], threads: int) -> str:
    """The plugin's sbatch command line for a job with these resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    values = Resources((k, int(v) if v.lstrip("-").isdigit() else v) for k, v in resources.items())
    job = type("Job", (), {"resources": values, "threads": threads})()
    params = dict(run_uuid="run", slurm_logfile="log", comment_str="c", account="", partition="", workdir="work")
    return get_submit_command(job, params) + set_gres_string(job)


def test_slurm_training_jobs_ask_for_their_gpus_and_nodes(tmp_path):
    # (Threads are capped at the dry run's --cores 2: ranks 2 x threads 1.)
    jobs = _slurm_train_jobs(tmp_path, {"ranks": 2, "threads": 1, "accelerator": "cuda"})
    for resources, shell in jobs:
        assert resources["nodes"] == "1" and resources["gpu"] == "2" and resources["cpus_per_task"] == "2"
        assert "mpi" not in resources and "tasks" not in resources
        call = _sbatch_call(resources, threads=2)
        assert "--nodes=1" in call and "--gpus=2" in call and "--cpus-per-task=2" in call
        assert "--ntasks-per-gpu" not in call and "--gres" not in call
        assert "torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 -m medift.train" in shell
        # The allocator stands aside inside a SLURM job (SLURM_JOB_ID): the cards are SLURM's.
        assert "python -m medift.gpus --take 2 -- python -m torch.distributed.run" in shell
    # CPU training: no GPU, one task.
    for resources, _ in _slurm_train_jobs(tmp_path / "cpu", {"ranks": 2}):
        call = _sbatch_call(resources, threads=2)
        assert resources["gpu"] == "0" and "--gpus" not in call and "--ntasks=1" in call and "--cpus-per-task=2" in call


def test_slurm_profile_gives_each_evaluation_a_gpu(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    result = snakemake(
        "-n",
        "-p",
        "results/table1.csv",
        f"--configfile={DEFAULT_CONFIG}",
        "--workflow-profile",
        str(REPO / "workflow" / "profiles" / "slurm"),
        workdir=tmp_path / "work",
    )
    jobs = _job_blocks(result.stdout + result.stderr, "evaluate_model")
    assert len(jobs) == 6
    for resources, shell in jobs:
        assert resources["gpu"] == "1" and "gres" not in resources
        assert "--gpus=1" in _sbatch_call(resources, threads=1)
        assert "python -m medift.gpus --take 1 -- python -m medift.evaluate" in shell  # stands aside under SLURM


def test_slurm_training_on_several_nodes_starts_one_torchrun_per_node(tmp_path):
    # global batch 64 = micro-batches of 4 x 4 ranks x 2 nodes x accumulation 2
    jobs = _slurm_train_jobs(
        tmp_path, {"nodes": 2, "ranks": 4, "accelerator": "cuda", "batch_size": 4, "global_batch": 64}
    )
    for resources, shell in jobs:
        assert "--gradient_accumulation 2 --global_batch 64 " in shell
        assert "medift.gpus" not in shell  # SLURM assigns each node's cards
        assert resources["mpi"] == "srun" and resources["tasks"] == "2" and resources["gres"] == "gpu:4"
        call = _sbatch_call(resources, threads=2)  # 4 ranks x 1 thread, capped at --cores 2
        assert "--nodes=2" in call and "--ntasks=2" in call and "--gres=gpu:4" in call and "--cpus-per-task=2" in call
        assert "--ntasks-per-gpu" not in call and "--gpus=" not in call
        assert shell.split(" --shards ")[0].endswith(
            "srun --nodes 2 --ntasks 2 --ntasks-per-node 1 --cpus-per-task 2 bash -c 'python -m torch.distributed.run"
            " --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint"
            " \"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1):$((29500 + SLURM_JOB_ID % 10000))\""
            " --rdzv_id \"$SLURM_JOB_ID\" -m medift.train \"$@\"' medift.train"
        )

    # The launcher's quoting, run by bash with stand-ins for srun, scontrol and python.
    resources, shell = jobs[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "srun": 'shift 8; SLURM_JOB_NODELIST="gpu[07-08]" SLURM_JOB_ID=123 exec "$@"',  # past its 8 options
        "scontrol": 'echo gpu07; echo gpu08',
        "python": 'printf "%s\\n" "$@"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    command = shell.split(" > logs/")[0]
    result = subprocess.run(
        ["bash", "-c", command],
        env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
        check=True,
    )
    args = result.stdout.splitlines()
    assert args[:12] == [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "4",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "gpu07:29623",
        "--rdzv_id",
        "123",
    ]
    assert args[12:16] == ["-m", "medift.train", "--shards", "resources/shards/" + args[15].split("/")[-1]]


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_changing_one_dataset_reruns_only_that_dataset(tmp_path):
    work = tmp_path / "work"
    config = tiny_config()
    configfile = write_config(tmp_path / "config.yaml", config)
    snakemake(f"--configfile={configfile}", *DATA_TARGETS, workdir=work)
    for dataset in DATASETS:
        report = json.loads((work / "results" / dataset / "data_report.json").read_text())
        assert report["dataset"] == dataset and report["records_kept"] > 0
        assert (work / "resources" / "shards" / dataset / "manifest.json").is_file()
    assert dry_run(*DATA_TARGETS, workdir=work, configfile=configfile) == []

    config["threads"]["prepare"] = 2  # threads change no result: nothing to re-run
    write_config(configfile, config)
    assert dry_run(*DATA_TARGETS, workdir=work, configfile=configfile) == []

    config["datasets"]["wbcatt"]["synthetic"]["n_train"] = 14
    write_config(configfile, config)
    jobs = dry_run(*DATA_TARGETS, workdir=work, configfile=configfile)
    assert sorted(rule for rule, _ in jobs) == ["make_shards", "synthesize_raw_data"]
    assert all(wildcards["dataset"] == "wbcatt" for _, wildcards in jobs)


def test_table2_ablations_reach_their_training_jobs(tmp_path):
    """Table 2's methods differ from ift by one setting each: a dry run's shell lines carry it
    (the shared end-to-end run trains table 1's methods; the same rules train these)."""
    config = tiny_config()
    output = printed_dry_run(config, tmp_path, "results/table2.csv")
    commands = {}
    for _, command in _job_blocks(output, "train_model"):
        trained = re.search(r"--out_dir resources/models/wbcatt/(\w+)/seed-1 ", command)
        if trained:
            commands[trained.group(1)] = command
    assert set(commands) == set(TABLE2)
    expected = {
        "ift": {"momentum": "0.999", "shuffle_responses": "True", "warmup_epochs": "1", "proxy": "True"},
        "ift_no_momentum": {"momentum": "0.0", "shuffle_responses": "True", "warmup_epochs": "1"},
        "ift_no_shuffle": {"momentum": "0.999", "shuffle_responses": "False", "warmup_epochs": "1"},
        "ift_no_warmup": {"momentum": "0.999", "shuffle_responses": "True", "warmup_epochs": "0"},
    }
    for method, settings in expected.items():
        for name, value in settings.items():
            assert f"--{name} {value} " in commands[method] + " ", (method, name, commands[method])


@pytest.mark.e2e
def test_end_to_end_table1(table1_run, tmp_path):
    """Table 1 of the tiny config through the real DAG (the shared run: two datasets, one seed,
    ift with 2 ranks): tables, predictions, descriptions, summaries, logs, invalidation, report."""
    work, config = table1_run["work"], copy.deepcopy(table1_run["config"])
    results = work / "results"
    table = pd.read_csv(results / "table1.csv", index_col=0)
    assert list(table.index) == TABLE1
    assert list(table.columns) == DATASETS + ["average"]
    assert table.notna().all().all()
    assert ((table >= 0) & (table <= 100)).all().all()
    assert (table["average"] - table[DATASETS].mean(axis=1)).abs().max() <= 0.011
    long = pd.read_csv(results / "table1_long.csv")
    assert len(long) == len(TABLE1) * len(DATASETS)
    assert (results / "table1.png").stat().st_size > 0
    long = long.set_index(["method", "dataset"])
    assert (long["seeds"] == 1).all()
    assert long["circular_accuracy"].notna().all()
    assert (long["circular_accuracy"] <= long["accuracy"]).all()
    attributes = pd.read_csv(results / "table1_attributes.csv")
    assert set(attributes["dataset"]) == set(DATASETS) and set(attributes["method"]) == set(TABLE1)
    assert (results / "table1_attributes.png").stat().st_size > 0
    # Description accuracy beside accuracy and format retention, for every method and dataset.
    assert long["description_accuracy"].between(0, 100).all()
    assert (long["description_ci_low"] <= long["description_accuracy"]).all()
    assert (results / "table1_metrics.png").stat().st_size > 0
    compared = pd.read_csv(results / "table1_comparisons.csv")
    assert set(zip(compared["method"], compared["baseline"])) == {("ift", "zero_shot"), ("ift", "caption_ft")}
    assert len(compared) == 2 * len(DATASETS) and compared["diff"].notna().all()

    trained = [m for m in TABLE1 if m != "zero_shot"]
    seeds = {m: [1] for m in TABLE1}
    for dataset in DATASETS:
        for method in TABLE1:
            for seed in seeds[method]:
                run = results / dataset / method / f"seed-{seed}"
                predictions = pd.read_csv(run / "predictions.csv")
                assert set(PREDICTION_COLUMNS) <= set(predictions.columns)
                assert len(predictions) > 0 and predictions["correct"].isin([0, 1]).all()
                assert predictions["rotation"].max() > 0  # circular evaluation is on by default
                metrics = json.loads((run / "metrics.json").read_text())
                assert metrics["n"] == (predictions["rotation"] == 0).sum()
                assert metrics["prompts_asked"] == len(predictions)
                described = pd.read_csv(run / "descriptions.csv", keep_default_na=False)
                assert len(described) == json.loads((run / "description_metrics.json").read_text())["images"] > 0
        for seed in (1,):
            summaries = {
                method: json.loads(
                    (work / "resources/models" / dataset / method / f"seed-{seed}" / "train_summary.json").read_text()
                )
                for method in trained
            }
            assert all(s["config"]["seed"] == seed for s in summaries.values())
            assert summaries["caption_ft"]["config"]["proxy"] is False and summaries["ift"]["config"]["proxy"] is True
            assert summaries["ift"]["ranks"] == 2 and summaries["caption_ft"]["ranks"] == 1
            assert all(s["config"]["epochs"] == 1 and s["config"]["batch_size"] == 4 for s in summaries.values())
            train_defaults = default_config()["train"]
            ift = summaries["ift"]["config"]
            assert (ift["lr"], ift["proxy_lr"]) == (train_defaults["lr"], train_defaults["proxy_lr"])
            # No proxy: no proxy_lr of its own.
            assert summaries["caption_ft"]["config"]["proxy_lr"] == train_defaults["lr"]
            # One validation per epoch where the shards have validation questions (the tiny CBIS-DDSM has none).
            assert all(len(s["validation"]) == (1 if dataset == "wbcatt" else 0) for s in summaries.values())
        for method in trained:
            assert list((work / "logs/tensorboard" / dataset / method / "seed-1").glob("events.out.tfevents.*"))
    # Every job's checkpoints are removed once its model is saved.
    assert not [p for p in (work / "resources" / "checkpoints").rglob("*") if p.is_file()]

    logs = work / "logs"
    expected_logs = (
        [logs / rule / f"{d}.log" for rule in ("synthesize_raw_data", "make_shards") for d in DATASETS]
        + [logs / "train_model" / d / m / f"seed-{s}.log" for d in DATASETS for m in trained for s in (1,)]
        + [logs / "evaluate_model" / d / m / f"seed-{s}.log" for d in DATASETS for m in TABLE1 for s in seeds[m]]
        + [logs / "make_table" / "table1.log"]
    )
    missing = [str(p.relative_to(work)) for p in expected_logs if not p.is_file() or p.stat().st_size == 0]
    assert not missing, f"missing or empty logs: {missing}"
    assert sorted(p for p in logs.rglob("*.log")) == sorted(expected_logs)  # no pre-training ran

    # Done means done, whatever the threads; one dataset's training settings touch only
    # that dataset's jobs. (A config file of this test's own: the shared run's stays as it was.)
    configfile = tmp_path / "config.yaml"
    config["train"]["threads"] = 2
    config["evaluate"]["threads"] = 2
    write_config(configfile, config)
    assert dry_run("results/table1.csv", workdir=work, configfile=configfile) == []
    config["datasets"]["cbis_ddsm"]["train"]["repeat_train"] = 2
    write_config(configfile, config)
    jobs = dry_run("results/table1.csv", workdir=work, configfile=configfile)
    assert rule_counts(jobs) == {"train_model": 2, "evaluate_model": 2, "make_table": 1}
    assert {w.get("dataset") for rule, w in jobs if rule != "make_table"} == {"cbis_ddsm"}
    # A second seed adds each trained method's training and evaluation for it, on each dataset;
    # zero_shot (nothing trained) is not evaluated again.
    config["datasets"]["cbis_ddsm"]["train"]["repeat_train"] = 1
    config["seeds"] = [1, 2]
    write_config(configfile, config)
    jobs = dry_run("results/table1.csv", workdir=work, configfile=configfile)
    assert rule_counts(jobs) == {"train_model": 4, "evaluate_model": 4, "make_table": 1}
    assert {(w["dataset"], w["method"], w["seed"]) for rule, w in jobs if rule != "make_table"} == {
        (d, m, "2") for d in DATASETS for m in trained
    }
    config["seeds"] = [1]

    # The Snakemake report holds every table and figure with its caption.
    config["datasets"]["cbis_ddsm"]["train"]["repeat_train"] = 1
    write_config(configfile, config)
    report = tmp_path / "report.html"
    snakemake(f"--configfile={configfile}", "--report", str(report), "results/table1.csv", workdir=work)
    html = report.read_text(errors="replace")
    assert "table1_attributes.png" in html and "table1_long.csv" in html


@pytest.mark.e2e
def test_end_to_end_table3_adds_only_the_baselines_jobs(table1_run, tmp_path):
    """Table 3 on a copy of the shared run, cut to one dataset and seed: zero_shot, caption_ft and
    ift are done already (nothing of theirs reruns); the baselines' data-making jobs, trainings
    and evaluations run, and the data table says what each method used."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(table1_run["work"], work, symlinks=True)
    config = copy.deepcopy(table1_run["config"])
    config["datasets"] = {"wbcatt": config["datasets"]["wbcatt"]}
    config["methods"]["vital_select"]["keep_fraction"] = 0.1  # fewer kept rows to train on
    configfile = write_config(tmp_path / "config.yaml", config)
    jobs = dry_run("results/table3.csv", workdir=work, configfile=configfile)
    assert rule_counts(jobs) == {
        "make_instructions": 1,
        "make_candidates": 1,
        "select_candidates": 1,
        "make_preferences": 1,
        "train_model": 4,
        "evaluate_model": 3,
        "make_table": 1,
    }
    assert {w["method"] for rule, w in jobs if rule == "train_model"} == {
        "inst_ft",
        "vital_select",
        "st_dpo_stage1",
        "st_dpo",
    }
    snakemake(f"--configfile={configfile}", "results/table3.csv", workdir=work, timeout=900)

    results = work / "results"
    table = pd.read_csv(results / "table3.csv", index_col=0)
    assert list(table.index) == TABLE3 and table["wbcatt"].notna().all()
    # The methods in both tables kept their table-1 predictions.
    for method in ("zero_shot", "caption_ft", "ift"):
        name = f"wbcatt/{method}/seed-1/predictions.csv"
        assert (results / name).read_bytes() == (table1_run["work"] / "results" / name).read_bytes()
    compared = pd.read_csv(results / "table3_comparisons.csv")
    assert set(zip(compared["method"], compared["baseline"])) == {("ift", m) for m in TABLE3 if m != "ift"}
    data = pd.read_csv(results / "table3_data.csv").set_index("method")
    manifests = {
        name: json.loads((work / "resources/generated/wbcatt" / name / "manifest.json").read_text())["summary"]
        for name in ("instructions", "candidates", "vital_select/selected", "st_dpo/seed-1/preferences")
    }
    train_images = config["datasets"]["wbcatt"]["synthetic"]["n_train"]
    assert data.loc["zero_shot", ["images", "training_tokens", "judge_calls"]].tolist() == [0, 0, 0]
    assert data.loc["ift", "images"] == data.loc["ift", "training_rows"] == train_images
    assert data.loc["inst_ft", "generated_rows"] == manifests["instructions"]["generated_rows"] > train_images
    candidates, selected = manifests["candidates"], manifests["vital_select/selected"]
    assert data.loc["vital_select", "generated_rows"] == candidates["generated_rows"] == selected["candidates"]
    assert (
        selected["kept_rows"] == math.ceil(0.1 * candidates["generated_rows"]) == data.loc["vital_select", "kept_rows"]
    )
    assert selected["agreement"]["held_out_rating_pairs"] is not None
    preferences = manifests["st_dpo/seed-1/preferences"]
    assert preferences["questions"] == train_images
    assert preferences["kept_rows"] + sum(preferences["dropped"].values()) == preferences["questions"]
    # st_dpo counts its first stage's instructions and training too.
    stage1 = json.loads((work / "resources/models/wbcatt/st_dpo_stage1/seed-1/train_summary.json").read_text())
    dpo = json.loads((work / "resources/models/wbcatt/st_dpo/seed-1/train_summary.json").read_text())
    assert data.loc["st_dpo", "training_tokens"] == stage1["training_tokens"] + dpo["training_tokens"]
    assert (
        data.loc["st_dpo", "generated_rows"] == manifests["instructions"]["generated_rows"] + preferences["questions"]
    )
    assert (data["judge_calls"] == 0).all()  # the offline judge
    if preferences["kept_rows"]:
        assert dpo["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for rule in ("make_instructions", "make_candidates"):
        assert (work / "logs" / rule / "wbcatt.log").stat().st_size > 0
    # Rerunning one method reruns only its jobs: a new kept fraction, a new selection and its training.
    config["methods"]["vital_select"]["keep_fraction"] = 0.8
    write_config(configfile, config)
    jobs = dry_run("results/table3.csv", workdir=work, configfile=configfile)
    assert rule_counts(jobs) == {"select_candidates": 1, "train_model": 1, "evaluate_model": 1, "make_table": 1}
    assert {w.get("method") for rule, w in jobs if rule != "make_table"} == {"vital_select"}


@pytest.mark.e2e
def test_end_to_end_table1_on_a_tiny_mllama_checkpoint(tmp_path):
    """The paper's family through the real DAG: a local Mllama checkpoint (base_model.path),
    the embedded datasets at its own image size, caption_ft and ift trained with vision +
    fusion, evaluated by generation and then by letter scoring."""
    from medift.testing.tiny_checkpoints import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("mllama", tmp_path / "tiny-mllama")
    work = tmp_path / "work"
    config = tiny_config(base_model=str(checkpoint))
    config["seeds"] = [1]
    # One dataset: the family's path is the same for every dataset (the embedded run covers both).
    config["datasets"] = {"wbcatt": config["datasets"]["wbcatt"]}
    config["train"]["train_modules"] = "vision,fusion"
    configfile = write_config(tmp_path / "config.yaml", config)
    snakemake(f"--configfile={configfile}", "results/table1.csv", workdir=work, timeout=900)
    table = pd.read_csv(work / "results" / "table1.csv", index_col=0)
    assert list(table.index) == TABLE1 and table["wbcatt"].notna().all()
    manifest = json.loads((work / "resources/shards/wbcatt/manifest.json").read_text())
    assert manifest["config"]["image_size"] == 28  # image_size: auto, the checkpoint's tile
    summary = json.loads((work / "resources/models/wbcatt/ift/seed-1/train_summary.json").read_text())
    assert set(summary["trainable_parameters"]["per_group"]) == {"vision", "fusion", "projector"}
    generated = pd.read_csv(work / "results/wbcatt/ift/seed-1/predictions.csv")

    # Letter scoring: a new evaluation setting reruns the evaluations (here only ift's is asked for).
    config["evaluate"]["scoring"] = "letter"
    write_config(configfile, config)
    jobs = dry_run("results/table1.csv", workdir=work, configfile=configfile)
    assert rule_counts(jobs) == {"evaluate_model": 3, "make_table": 1}
    snakemake(f"--configfile={configfile}", "results/wbcatt/ift/seed-1/predictions.csv", workdir=work, timeout=900)
    scored = pd.read_csv(work / "results/wbcatt/ift/seed-1/predictions.csv")
    assert len(scored) == len(generated) and scored["parse_failed"].eq(0).all()
    assert scored["letter_scores"].map(json.loads).map(len).eq(scored["options"].map(json.loads).map(len)).all()
    assert not (work / "logs" / "pretrain_base_model").exists()


@pytest.mark.e2e
def test_your_own_captions_tuned_and_evaluated_on_published_benchmark_forms(tmp_path):
    """docs/data.md's "your own data" through the real DAG on a tiny Mllama checkpoint: two
    datasets tuned on one captions CSV, one evaluated on a VLMEvalKit TSV, the other on JSONL records."""
    from medift.testing.tiny_checkpoints import build_tiny_checkpoint
    from tests.fixtures.own_data import write_captions, write_jsonl_records, write_vlmevalkit_tsv

    checkpoint = build_tiny_checkpoint("mllama", tmp_path / "tiny-mllama")
    captions = write_captions(tmp_path / "captions")
    tsv = write_vlmevalkit_tsv(tmp_path / "bench.tsv")
    config = tiny_config(base_model=str(checkpoint))
    own = {"adapter": "captions", "source": "raw", "raw_dir": str(tmp_path / "captions"), "captions": captions}
    own["train"] = {"shuffle_responses": False}  # free text: no comma-separated phrases to shuffle
    config["datasets"] = {"slides_tsv": {**own, "eval_from": "tsv"}, "slides_jsonl": {**own, "eval_from": "jsonl"}}
    config["benchmarks"] = {"tsv": {"file": str(tmp_path / "bench.tsv")}, "jsonl": write_jsonl_records(tmp_path)}
    config["methods"] = {"zero_shot": {"train": False}, "ift": {"proxy": True}}
    config["tables"] = {"own": ["zero_shot", "ift"]}
    config["comparisons"] = {"ift": "zero_shot"}
    config["seeds"] = [1]
    config["train"]["train_modules"] = "vision,fusion"
    configfile = write_config(tmp_path / "config.yaml", config)
    work = tmp_path / "work"
    snakemake(f"--configfile={configfile}", "results/own.csv", workdir=work, timeout=900)

    table = pd.read_csv(work / "results/own.csv", index_col=0)
    assert list(table.columns) == ["slides_tsv", "slides_jsonl", "average"] and table.notna().all().all()
    # The TSV's questions: the labelled ones scored (Mllama takes the two-image one), the unlabelled written.
    predictions = pd.read_csv(work / "results/slides_tsv/ift/seed-1/predictions.csv", dtype=str)
    assert sorted(set(predictions["question_id"])) == ["1", "2", "3", "4", "5"]
    unlabelled = pd.read_csv(work / "results/slides_tsv/ift/seed-1/unlabelled.csv", dtype=str)
    assert list(unlabelled["question_id"]) == ["6"]
    assert json.loads((work / "results/slides_tsv/ift/seed-1/metrics.json").read_text())["unlabelled"] == 1
    jsonl = pd.read_csv(work / "results/slides_jsonl/zero_shot/seed-1/predictions.csv", dtype=str)
    assert sorted(set(jsonl["question_id"])) == [f"q{i}" for i in range(5)]
    # Per-category accuracy: the benchmark's categories are the attribute table's rows.
    attributes = pd.read_csv(work / "results/own_attributes.csv")
    assert set(attributes[attributes["dataset"] == "slides_tsv"]["attribute"]) == tsv["categories"]
    # Tuned on the captions' train split (by patient), described on its own test images.
    report = json.loads((work / "results/slides_tsv/data_report.json").read_text())
    assert report["adapter_options"]["attributes"] == ["stain"]
    summary = json.loads((work / "resources/models/slides_tsv/ift/seed-1/train_summary.json").read_text())
    assert summary["train_images"] == report["splits"]["train"]["records"]
    described = pd.read_csv(work / "results/slides_tsv/ift/seed-1/descriptions.csv", keep_default_na=False)
    assert len(described) == report["splits"]["test"]["records"]
    bench = json.loads((work / "results/benchmarks/tsv/data_report.json").read_text())
    assert bench["questions"] == tsv["rows"] and bench["quarantined"] == 0


@pytest.mark.e2e
def test_an_evaluation_only_column_scores_the_base_model_on_a_benchmark(tmp_path):
    """A benchmark as a table column of its own (source none, eval_from): zero_shot on a
    VLMEvalKit TSV, no tuning data, no shards of its own, nothing described."""
    from medift.testing.tiny_checkpoints import build_tiny_checkpoint
    from tests.fixtures.own_data import write_vlmevalkit_tsv

    checkpoint = build_tiny_checkpoint("mllama", tmp_path / "tiny-mllama")
    facts = write_vlmevalkit_tsv(tmp_path / "bench.tsv")
    config = tiny_config(base_model=str(checkpoint))
    config["datasets"] = {"gmai": {"source": "none", "eval_from": "tsv"}}
    config["benchmarks"] = {"tsv": {"file": str(tmp_path / "bench.tsv"), "category": "l2_category"}}
    config["methods"] = {"zero_shot": {"train": False}, "ift": {"proxy": True}}
    config["tables"] = {"bench": ["zero_shot"]}
    config["comparisons"] = {}
    configfile = write_config(tmp_path / "config.yaml", config)
    work = tmp_path / "work"
    jobs = dry_run("results/bench.csv", workdir=work, configfile=configfile)
    assert rule_counts(jobs) == {"make_benchmark_shards": 1, "evaluate_on_benchmark_only": 1, "make_table": 1}
    snakemake(f"--configfile={configfile}", "results/bench.csv", workdir=work, timeout=600)
    table = pd.read_csv(work / "results/bench.csv", index_col=0)
    assert list(table.index) == ["zero_shot"] and list(table.columns) == ["gmai", "average"]
    long = pd.read_csv(work / "results/bench_long.csv")
    assert long["n"].tolist() == [facts["labelled_single"] + facts["several_images"]]
    assert long["description_accuracy"].isna().all()  # nothing of its own to describe
    attributes = pd.read_csv(work / "results/bench_attributes.csv")
    assert set(attributes["attribute"]) == {"colour", "shape", "count", "all"}  # its l2-categories
    assert not (work / "resources/shards").exists()
    # A trained method has no tuning data in such a column: refused before any job.
    config["tables"] = {"bench": ["zero_shot", "ift"]}
    result = snakemake("-n", f"--configfile={write_config(configfile, config)}", workdir=work, check=False)
    assert result.returncode != 0 and "an evaluation-only column (source none)" in result.stdout + result.stderr


def test_the_own_data_example_config_is_complete(tmp_path):
    """config/own-data.yaml with its /path/to placeholders pointed at files of the forms it names:
    the DAG it plans (a dry run) tunes both datasets and evaluates one on the benchmark."""
    import yaml

    from medift.testing.tiny_checkpoints import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("mllama", tmp_path / "checkpoint")
    slides = tmp_path / "my-slides"
    slides.mkdir()
    (slides / "captions.csv").write_text("path,report,patient,split,stain,tissue\n")
    (tmp_path / "GMAI-MMBench_VAL.tsv").write_text("index\timage\tquestion\tA\tB\tanswer\n")
    text = (REPO / "config" / "own-data.yaml").read_text()
    text = text.replace("/path/to/Llama-3.2-11B-Vision-Instruct", str(checkpoint)).replace("/path/to/", f"{tmp_path}/")
    config = yaml.safe_load(text)
    assert config["datasets"]["slides"]["captions"]["attributes"] == ["stain", "tissue"]
    configfile = write_config(tmp_path / "config.yaml", config)
    jobs = dry_run("results/own.csv", workdir=tmp_path / "work", configfile=configfile)
    assert rule_counts(jobs) == {
        "make_shards": 2,
        "make_benchmark_shards": 1,
        "train_model": 4,
        "evaluate_model": 6,
        "make_table": 1,
    }
    assert {w["benchmark"] for rule, w in jobs if rule == "make_benchmark_shards"} == {"gmai"}


@pytest.mark.e2e
def test_a_killed_training_job_resumes_under_rerun_incomplete(tmp_path):
    """Snakemake killed (with its job) after the job's first checkpoint; `--unlock` and
    `--rerun-incomplete` then resume the job from that checkpoint instead of step 0."""

    if not embedded_base_available():
        pytest.skip("the embedded base model is not built")
    work = tmp_path / "work"
    copy_embedded_models(work)
    config = tiny_config()
    config["seeds"] = [1]
    config["train"].update(checkpoint_every=1, batch_size=2, epochs=2)  # 6 steps an epoch
    configfile = write_config(tmp_path / "config.yaml", config)
    target = "resources/models/wbcatt/ift/seed-1/model.safetensors"
    latest = work / "resources/checkpoints/wbcatt/ift/seed-1/latest"
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--cores",
        "2",
        "--directory",
        str(work),
        f"--configfile={configfile}",
        target,
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=workflow_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 600
        while not latest.is_file() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert latest.is_file(), "no checkpoint was written"
        kill_tree(process.pid)
    finally:
        process.wait(timeout=60)
    killed_at = int(latest.read_text().split("-")[1])
    assert not (work / target).exists() and killed_at < 18

    snakemake("--unlock", f"--configfile={configfile}", target, workdir=work)
    snakemake("--rerun-incomplete", f"--configfile={configfile}", target, workdir=work, timeout=600)
    summary = json.loads((work / "resources/models/wbcatt/ift/seed-1/train_summary.json").read_text())
    assert summary["resumed_at_step"] >= killed_at and summary["steps"] == 18
    assert (
        "resuming from resources/checkpoints/wbcatt/ift/seed-1/step-"
        in (work / "logs/train_model/wbcatt/ift/seed-1.log").read_text()
    )
    assert not latest.parent.exists()


def test_workflow_adapters_are_the_package_datasets():
    """common.smk takes the adapters from medift/settings.py (standard library only: a conda driver
    env may lack medift's dependencies), which lists those medift.datasets provides."""
    from medift import settings
    from medift.datasets import DATASETS, get_dataset
    from medift.datasets.captions import CaptionsAdapter

    common = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "common.smk").read_text()
    assert "ADAPTERS = SETTINGS.ADAPTERS" in common
    assert set(settings.ADAPTERS) == set(DATASETS) | {"captions"}
    assert isinstance(get_dataset("captions", {"file": "captions.csv"}), CaptionsAdapter)
    import yaml

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    adapter = schema["properties"]["datasets"]["additionalProperties"]["properties"]["adapter"]
    assert adapter["enum"] == [*settings.ADAPTERS, None]
    # The embedded datasets come from medift/settings.py (tests/test_settings.py), not a copy.
    assert "EMBEDDED_DATASETS = SETTINGS.EMBEDDED_DATASETS" in common
