"""Where work runs: the GPU card allocator (medift/gpus.py), the global batch rule
(medift/batching.py) and the validation's share of each rank (medift.train.rank_share).

The allocator only hands out card indices, so it is tested with real processes on the CPU:
each job is `python -m medift.gpus --take N -- python <holder>`, whose holder writes the
CUDA_VISIBLE_DEVICES it was given and then waits until told to stop (or is killed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medift import gpus
from medift.batching import accumulation_for, resolve_accumulation
from medift.train import TrainConfig, rank_share

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import os, sys, time, pathlib
out, stop = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
while not stop.exists():
    time.sleep(0.05)
"""


class Jobs:
    """Allocator jobs started side by side, sharing one lock directory."""

    def __init__(self, root: Path, pool_size: int | None, visible: str | None = None, slurm: bool = False):
        self.root, self.stop = root, root / "stop"
        root.mkdir()
        self.lock_dir = root / "locks"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", gpus.COUNT_VARIABLE)
        }
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH")) if p)
        if pool_size is not None:
            self.env[gpus.COUNT_VARIABLE] = str(pool_size)
        if visible is not None:
            self.env["CUDA_VISIBLE_DEVICES"] = visible
        if slurm:
            self.env["SLURM_JOB_ID"] = "123"
        (root / "holder.py").write_text(HOLDER)
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, take: int = 1) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "medift.gpus",
            "--take",
            str(take),
            "--lock_dir",
            str(self.lock_dir),
            "--",
            sys.executable,
            str(self.root / "holder.py"),
            str(self.root / f"{name}.cards"),
            str(self.stop),
        ]
        self.processes[name] = subprocess.Popen(command, env=self.env, stderr=subprocess.PIPE, text=True)
        return self.processes[name]

    def cards(self, name: str, timeout: float = 30.0) -> str | None:
        """The cards job `name` runs on, once it runs (None if it has not started within `timeout`)."""
        path = self.root / f"{name}.cards"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file() and path.read_text():
                return path.read_text()
            time.sleep(0.05)
        return None

    def finish(self) -> None:
        self.stop.touch()
        for process in self.processes.values():
            process.wait(timeout=30)


@pytest.fixture
def jobs(tmp_path):
    made = []

    def make(*args, **kwargs) -> Jobs:
        made.append(Jobs(tmp_path / f"run{len(made)}", *args, **kwargs))
        return made[-1]

    yield make
    for run in made:
        run.stop.touch()
        for process in run.processes.values():
            if process.poll() is None:
                process.kill()


@pytest.mark.slow
def test_eight_jobs_get_eight_cards_a_ninth_waits_and_a_crashed_job_frees_its_card(jobs):
    run = jobs(pool_size=8)
    for index in range(8):
        run.start(f"job{index}")
    cards = {f"job{index}": run.cards(f"job{index}") for index in range(8)}
    assert sorted(cards.values()) == [str(card) for card in range(8)]  # one card each, all distinct
    ninth = run.start("job8")
    assert run.cards("job8", timeout=3.0) is None and ninth.poll() is None  # waits for a free card
    crashed = run.processes["job5"]
    crashed.send_signal(signal.SIGKILL)  # the lock dies with the process
    crashed.wait()
    assert run.cards("job8") == cards["job5"]
    run.finish()
    assert "waiting for 1 free card(s) of 0,1,2,3,4,5,6,7" in ninth.stderr.read()


def test_a_job_of_several_ranks_takes_several_cards_from_cuda_visible_devices(jobs):
    run = jobs(pool_size=None, visible="3,5,6")
    run.start("ranks", take=2)
    run.start("single", take=1)
    taken = run.cards("ranks").split(","), run.cards("single").split(",")
    assert len(taken[0]) == 2 and sorted(taken[0] + taken[1]) == ["3", "5", "6"]
    run.finish()


def test_under_slurm_and_without_cards_the_command_runs_as_it_is(jobs):
    run = jobs(pool_size=8, visible="0", slurm=True)  # SLURM gave this job card 0 of its own
    run.start("slurm", take=4)
    assert run.cards("slurm") == "0"
    plain = jobs(pool_size=0)
    plain.start("cpu", take=0)
    assert plain.cards("cpu") == "<unset>"
    run.finish()
    plain.finish()
    assert not run.lock_dir.exists() and not plain.lock_dir.exists()


def test_more_cards_than_the_pool_is_an_error(jobs):
    run = jobs(pool_size=2)
    process = run.start("big", take=4)
    assert process.wait(timeout=30) == 2
    assert "4 cards asked for, but the pool has 2 (0,1)" in process.stderr.read()


def test_the_pool_honours_cuda_visible_devices():
    assert gpus.card_pool("2,GPU-abc, 7", None) == ["2", "GPU-abc", "7"]
    assert gpus.card_pool("2,4,7", 2) == ["2", "4"]
    assert gpus.card_pool(None, 3) == ["0", "1", "2"]
    assert gpus.card_pool("", None) == []  # set but empty: no card visible
    with pytest.raises(ValueError, match="gpus: 3 cards asked for, but CUDA_VISIBLE_DEVICES lists 2"):
        gpus.card_pool("0,1", 3)


@pytest.mark.parametrize(
    ("global_batch", "batch_size", "world", "accumulation"),
    [(2, 2, 1, 1), (2, 1, 1, 2), (2, 1, 2, 1), (16, 2, 8, 1), (64, 2, 8, 4), (64, 2, 16, 2)],
)
def test_the_accumulation_gives_the_global_batch(global_batch, batch_size, world, accumulation):
    assert accumulation_for(global_batch, batch_size, world) == accumulation


@pytest.mark.parametrize(("global_batch", "batch_size", "world"), [(2, 2, 8), (10, 2, 4), (3, 2, 1)])
def test_a_global_batch_the_ranks_cannot_make_is_refused(global_batch, batch_size, world):
    with pytest.raises(ValueError, match="is not a whole number >= 1"):
        accumulation_for(global_batch, batch_size, world)


def test_an_explicit_accumulation_must_agree_with_the_global_batch():
    assert resolve_accumulation(None, 4, 3, 2) == 3  # no global batch: the accumulation set
    assert resolve_accumulation(32, 4, 4, 2) == 4  # the same as derived: fine
    with pytest.raises(ValueError, match="gradient_accumulation 3 contradicts global_batch 32"):
        resolve_accumulation(32, 4, 3, 2)


def test_train_config_derives_the_accumulation_from_its_launcher_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    assert TrainConfig(shards="x", base_model="y", out_dir="z", batch_size=2, global_batch=8).gradient_accumulation == 2
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="global_batch 2 cannot be made of micro-batches of 2 on 8 rank"):
        TrainConfig(shards="x", base_model="y", out_dir="z", batch_size=2, global_batch=2)
    monkeypatch.delenv("WORLD_SIZE")
    assert (
        TrainConfig(
            shards="x", base_model="y", out_dir="z", batch_size=2, gradient_accumulation=3
        ).gradient_accumulation
        == 3
    )


@pytest.mark.parametrize("n", [0, 1, 5, 8, 33])
@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
def test_the_ranks_shares_cover_every_row_once_and_have_one_length(n, ranks):
    shares = [rank_share(n, rank, ranks) for rank in range(ranks)]
    assert len({len(positions) for positions, _ in shares}) == 1  # the same number of forwards on every rank
    counted = sorted(p for positions, k in shares for p in positions[:k])
    assert counted == list(range(n))  # every question counted exactly once
