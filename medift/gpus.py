"""Which GPU cards a local job runs on: a machine-wide allocator of card indices.

Snakemake limits how many GPU jobs run at once (`--resources gpu=N`, jobs asking for
`gpu=1` or `gpu=<ranks>`) but not which card each takes: without an assignment every job
would open `cuda:0`. A job's command is therefore started as

    python -m medift.gpus --take N -- <command ...>

which takes N free cards, exports them as CUDA_VISIBLE_DEVICES (torchrun's ranks inherit
it and open cuda:<LOCAL_RANK>, one card each) and replaces itself with the command (exec).
A card is taken by holding an exclusive `flock` on `<lock_dir>/card-<id>.lock`; the lock
belongs to the open file, which survives the exec, so it is held exactly as long as the
command's process lives and the kernel releases it when that process ends, however it ends
(a crashed or killed job frees its cards; no stale lock files to clean up).

The pool of cards: the entries of CUDA_VISIBLE_DEVICES when it is set where Snakemake runs
(indices, UUIDs or MIG ids alike), else 0 .. MEDIFT_GPUS - 1 (the workflow exports the
`gpus` setting, or the count it detected). Under SLURM (SLURM_JOB_ID set) the job's cards
are SLURM's assignment already: nothing is taken and the command runs as it is.

Standard library only: the workflow loads this file without importing medift's
dependencies (a conda driver environment may lack them).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Machine-wide, so that two Snakemake runs (or two users) on one machine share the cards.
DEFAULT_LOCK_DIR = "/tmp/medift-gpu-locks"
LOCK_DIR_VARIABLE = "MEDIFT_GPU_LOCK_DIR"
COUNT_VARIABLE = "MEDIFT_GPUS"


def visible_cards(value: str | None) -> list[str] | None:
    """The cards a CUDA_VISIBLE_DEVICES value lists (None when it is unset)."""
    if value is None:
        return None
    return [card.strip() for card in value.split(",") if card.strip()]


def detect_card_count() -> int:
    """GPUs of this machine by `nvidia-smi -L` (one line per GPU); 0 without the tool or a driver,
    so a dry run or CI on a machine without GPUs needs nothing."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def card_pool(visible: str | None, count: int | None) -> list[str]:
    """The cards local jobs share: CUDA_VISIBLE_DEVICES's list when set (its first `count` if
    `count` is given), else the indices 0 .. count - 1 (count None: detected)."""
    listed = visible_cards(visible)
    if listed is not None:
        if count is not None and count > len(listed):
            raise ValueError(f"gpus: {count} cards asked for, but CUDA_VISIBLE_DEVICES lists {len(listed)} ({visible})")
        return listed if count is None else listed[:count]
    return [str(index) for index in range(detect_card_count() if count is None else count)]


def under_slurm(environ=os.environ) -> bool:
    """A SLURM job: SLURM gave it its cards (CUDA_VISIBLE_DEVICES), so the allocator stands aside."""
    return "SLURM_JOB_ID" in environ


def _lock_file(lock_dir: Path, card: str) -> Path:
    return lock_dir / f"card-{card.replace('/', '_')}.lock"


def _open_lock_dir(lock_dir: Path) -> None:
    """Create the lock directory writable by everyone (sticky, like /tmp): users share the cards."""
    if not lock_dir.is_dir():
        lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock_dir.chmod(0o1777)
        except PermissionError:  # made by another user meanwhile
            pass


def try_take(pool: list[str], count: int, lock_dir: Path) -> tuple[list[str], list[int]] | None:
    """Lock `count` free cards of the pool without waiting: (cards, open lock descriptors), or
    None (nothing kept) when fewer are free."""
    import fcntl

    cards, descriptors = [], []
    for card in pool:
        # Read-only: flock needs no write access, so a lock file another user created still works.
        path = _lock_file(lock_dir, card)
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        cards.append(card)
        descriptors.append(descriptor)
        if len(cards) == count:
            return cards, descriptors
    for descriptor in descriptors:  # not enough: give back what was taken, so no two jobs deadlock
        os.close(descriptor)
    return None


def take(pool: list[str], count: int, lock_dir: Path, poll_seconds: float = 1.0) -> tuple[list[str], list[int]]:
    """Wait until `count` cards of the pool are free and lock them."""
    if count > len(pool):
        raise ValueError(
            f"{count} cards asked for, but the pool has {len(pool)} ({','.join(pool) or 'none'}): "
            "set `gpus` in the config or CUDA_VISIBLE_DEVICES, or ask for fewer ranks"
        )
    _open_lock_dir(lock_dir)
    announced = False
    while True:
        taken = try_take(pool, count, lock_dir)
        if taken is not None:
            return taken
        if not announced:
            print(
                f"medift.gpus: waiting for {count} free card(s) of {','.join(pool)} ({lock_dir})",
                file=sys.stderr,
                flush=True,
            )
            announced = True
        # Jittered, so that jobs waiting for several cards do not keep taking them in lockstep.
        time.sleep(poll_seconds * random.uniform(0.5, 1.5))


def run_on_cards(count: int, command: list[str], lock_dir: Path, environ=os.environ) -> None:
    """Exec `command` on `count` cards of its own (or as it is: no cards asked for, or SLURM's job)."""
    environment = dict(environ)
    if count > 0 and not under_slurm(environ):
        count_setting = environ.get(COUNT_VARIABLE)
        pool = card_pool(environ.get("CUDA_VISIBLE_DEVICES"), int(count_setting) if count_setting else None)
        cards, descriptors = take(pool, count, lock_dir)
        for descriptor in descriptors:
            os.set_inheritable(descriptor, True)  # kept across the exec: the command holds the cards
        environment["CUDA_VISIBLE_DEVICES"] = ",".join(cards)
        print(f"medift.gpus: card(s) {','.join(cards)} of {','.join(pool)}", file=sys.stderr, flush=True)
    os.execvpe(command[0], command, environment)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medift.gpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--take", type=int, required=True, help="Cards the command needs (0: none; it runs as it is).")
    parser.add_argument(
        "--lock_dir",
        default=os.environ.get(LOCK_DIR_VARIABLE, DEFAULT_LOCK_DIR),
        help=f"Directory of the cards' lock files, shared by every job of the machine (${LOCK_DIR_VARIABLE}).",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run on the cards.")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    if args.take < 0:
        parser.error("--take cannot be negative")
    try:
        run_on_cards(args.take, command, Path(args.lock_dir))
    except ValueError as error:
        print(f"medift.gpus: {error}", file=sys.stderr)
        return 2
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    raise SystemExit(main())
