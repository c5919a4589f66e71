"""The SLURM profile on a real one-node SLURM cluster started by the test (marked `slurm`).

The fixture starts munged (unless it already runs), slurmctld and slurmd on this machine
with a slurm.conf of its own in a temporary directory (SLURM_CONF), waits until the node
is idle and stops every daemon it started, by process id, when the module ends (also on
failure). The test then makes table 1 of the tiny config (one dataset, one seed) through
`--workflow-profile workflow/profiles/slurm`, where every job but the local rules is an
sbatch job, and each job's files must equal those of the shared local run (conftest's
`table1_run`) byte for byte.

It needs root and slurmctld, slurmd, munged and sbatch (Debian: apt-get install slurmctld
slurmd slurm-client munge); without them it is skipped, unless MEDIFT_REQUIRE_SLURM=1
(set by .ci/run, which installs them), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures.workflow import (
    REPO,
    copy_embedded_models,
    dry_run_jobs,
    rule_counts,
    snakemake,
    table1_run_config,
    write_config,
)

pytestmark = pytest.mark.slurm

PROGRAMS = ("slurmctld", "slurmd", "munged", "sbatch", "srun")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# Rules that run on the submitting machine (the Snakefile's `localrules`), not as SLURM jobs.
LOCAL_RULES = {"all", "make_table"}


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _require_slurm() -> None:
    missing = [name for name in PROGRAMS if _which(name) is None]
    reason = None
    if missing:
        reason = (
            f"SLURM is not installed ({', '.join(missing)} not found; "
            "apt-get install slurmctld slurmd slurm-client munge)"
        )
    elif os.geteuid() != 0:
        reason = "starting a SLURM cluster (munged, slurmctld, slurmd) needs root"
    if reason is None:
        return
    if os.environ.get("MEDIFT_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEDIFT_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, name: str) -> None:
    """Stop one daemon this test started, by its process id."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _munge_works() -> bool:
    munge, unmunge = _which("munge"), _which("unmunge")
    if munge is None or unmunge is None:
        return False
    credential = subprocess.run([munge, "-n"], capture_output=True, text=True)
    if credential.returncode != 0:
        return False
    return subprocess.run([unmunge], input=credential.stdout, capture_output=True, text=True).returncode == 0


def _slurm_conf(root: Path, hostname: str) -> str:
    node = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    node_line = next(line for line in node.splitlines() if line.startswith("NodeName="))
    memory = int(re.search(r"RealMemory=(\d+)", node_line).group(1))
    # A little below what slurmd measures, or the node is drained for "low RealMemory".
    node_line = re.sub(r"RealMemory=\d+", f"RealMemory={memory - 512}", node_line)
    node_line = re.sub(r"^NodeName=\S+", f"NodeName={hostname}", node_line)
    return "\n".join(
        [
            "ClusterName=medift-test",
            f"SlurmctldHost={hostname}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1000",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={root}/jobcomp.txt",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/slurmctld.log",
            f"SlurmdLogFile={root}/slurmd.log",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "MinJobAge=600",  # finished jobs stay in squeue (the status checks) for 10 minutes
            f"{node_line} State=UNKNOWN",
            f"PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory, request):
    """A one-node SLURM cluster on this machine: {'env': SLURM_CONF etc., 'root', 'jobcomp', 'start_s'}."""
    _require_slurm()
    started = time.monotonic()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    hostname = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, hostname))
    # Inside a job, the plugin's job step drops SLURM_* variables (SLURM_CONF too) before
    # its `srun`, which then looks for /etc/slurm/slurm.conf, where a real cluster has its
    # configuration; this one's is in `root`, so an srun first on PATH passes it on.
    wrapper = root / "bin" / "srun"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {_which("srun")} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=os.pathsep.join([str(wrapper.parent), SBIN_PATH]))

    if not _munge_works():
        for directory in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            os.makedirs(directory, exist_ok=True)
            shutil.chown(directory, "munge", "munge")
        munged = subprocess.Popen(
            [_which("munged"), "--foreground"],
            user="munge",
            group="munge",
            stdout=open(root / "munged.out", "w"),
            stderr=subprocess.STDOUT,
        )
        request.addfinalizer(lambda: _stop(munged, "munged"))
        for _ in range(50):
            if _munge_works():
                break
            if munged.poll() is not None:
                pytest.fail(f"munged exited {munged.returncode}: {(root / 'munged.out').read_text()}")
            time.sleep(0.1)

    daemons = {}
    for name in ("slurmctld", "slurmd"):
        process = subprocess.Popen(
            [_which(name), "-D"], env=env, stdout=open(root / f"{name}.out", "w"), stderr=subprocess.STDOUT
        )
        daemons[name] = process
        request.addfinalizer(lambda process=process, name=name: _stop(process, name))

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(root.glob("*.log")) + sorted(root.glob("*.out"))
        )

    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        for name, process in daemons.items():
            if process.poll() is not None:
                pytest.fail(f"{name} exited {process.returncode}:\n{logs()}")
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True)
        state = result.stdout.strip()
        if result.returncode == 0 and state == "idle":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the node is not idle after 60 s (sinfo: {state!r}):\n{logs()}")
    yield {"env": env, "root": root, "jobcomp": root / "jobcomp.txt", "start_s": time.monotonic() - started}


def _sbatch_jobs(jobcomp: Path) -> list[dict[str, str]]:
    """The finished jobs of the jobcomp file (`sacct -c` reads the same)."""
    if not jobcomp.is_file():
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in jobcomp.read_text().splitlines() if line.strip()]


def test_table1_through_the_slurm_profile_equals_the_local_run(slurm_cluster, request, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["env"]["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_cluster["env"]["PATH"])
    # The shared local run's config (ift with 2 ranks: torchrun inside the sbatch job, 2 CPUs;
    # caption_ft with one), cut to one dataset and one seed: every rule goes through sbatch all
    # the same, in half the jobs. Its jobs' files must equal the local run's.
    config = table1_run_config()
    config["seeds"] = [1]
    config["datasets"] = {"wbcatt": config["datasets"]["wbcatt"]}
    configfile = write_config(tmp_path / "config.yaml", config)
    copy_embedded_models(tmp_path / "slurm")

    started, timings = time.monotonic(), {}
    result = snakemake(
        "results/table1.csv",
        f"--configfile={configfile}",
        "--workflow-profile",
        str(REPO / "workflow" / "profiles" / "slurm"),
        # No slurmdbd here: job states from squeue (see the profile's comments). The first status
        # check 1 s after a submission, not 5: the plugin adds 10 s to each wait without news and
        # starts over once a job ends, and these jobs take seconds (a 3 s job otherwise showed as 20 s).
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-keep-successful-logs",
        "--retries",
        "0",
        # The test node has 2 CPUs, ~23 GB and no GPU: CPU training, small memory requests
        # (these replace the profile's default-resources and set-resources, GPUs included).
        "--config",
        "train={accelerator: cpu}",
        "--default-resources",
        "mem_mb=1000",
        "runtime=10",
        "--set-resources",
        "train_model:mem_mb=3000",
        "evaluate_model:mem_mb=2000",
        workdir=tmp_path / "slurm",
        timeout=900,
    )
    timings["slurm"] = time.monotonic() - started
    output = result.stdout + result.stderr

    # Every job but the local rules went through sbatch, and finished there.
    expected = {rule: n for rule, n in rule_counts(dry_run_jobs(output)).items() if rule not in LOCAL_RULES}
    assert expected == {"synthesize_raw_data": 1, "make_shards": 1, "train_model": 2, "evaluate_model": 3}
    # "Job 13 has been submitted with SLURM jobid 10 (log: .../slurm_logs/rule_train_model/wbcatt_ift_1/10.log)."
    submitted = dict(
        (job_id, (rule, wildcards))
        for job_id, rule, wildcards in re.findall(
            r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+?)/(\S+)/\d+\.log\)", output
        )
    )
    sbatched = {}
    for rule, _ in submitted.values():
        sbatched[rule] = sbatched.get(rule, 0) + 1
    assert sbatched == expected, output[-4000:]
    logs = tmp_path / "slurm" / ".snakemake" / "slurm_logs"
    assert sorted(p.stem for p in logs.rglob("*.log")) == sorted(submitted)
    finished = {job["JobId"]: job for job in _sbatch_jobs(slurm_cluster["jobcomp"])}
    assert set(finished) >= set(submitted)
    assert all(finished[job_id]["JobState"] == "COMPLETED" for job_id in submitted), finished
    assert "localrule make_table:" in output
    # Training: one node, CPUs = ranks x threads.
    for job_id, (rule, wildcards) in submitted.items():
        if rule == "train_model":
            cpus = "2" if "_ift_" in wildcards else "1"
            assert finished[job_id]["NodeCnt"] == "1" and finished[job_id]["ProcCnt"] == cpus, finished[job_id]
    summary = json.loads((tmp_path / "slurm/resources/models/wbcatt/ift/seed-1/train_summary.json").read_text())
    assert summary["ranks"] == 2

    # Byte for byte the local run's files, job by job: shards, every model's predictions and descriptions.
    # The shared run is asked for only now: under pytest-xdist another worker makes it meanwhile.
    table1_run = request.getfixturevalue("table1_run")
    timings["local"] = table1_run["seconds"]
    local, slurm = table1_run["work"], tmp_path / "slurm"
    compared = [
        "resources/shards/wbcatt/manifest.json",
        *(
            f"results/wbcatt/{method}/seed-1/{name}"
            for method in ("zero_shot", "caption_ft", "ift")
            for name in ("predictions.csv", "descriptions.csv")
        ),
    ]
    for name in compared:
        assert (slurm / name).read_bytes() == (local / name).read_bytes(), name
    for name in ("table1.csv", "table1_long.csv"):
        assert list(pd.read_csv(slurm / "results" / name)["method"]) == ["zero_shot", "caption_ft", "ift"]
    print(
        f"cluster start {slurm_cluster['start_s']:.1f} s, local run {timings['local']:.1f} s, "
        f"SLURM run {timings['slurm']:.1f} s, {len(submitted)} sbatch jobs: {sbatched}"
    )
