"""Run a command as a child process and sample the memory of it and all its descendants."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path


def tree_memory(process) -> tuple[int, int]:
    """(RSS, PSS) summed over a process and its descendants. RSS counts pages shared between
    the processes once per process; PSS splits them, so its sum is the memory really used."""
    import psutil

    rss = pss = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_full_info()
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return rss, pss


def run_sampled(label: str, command: list[str], log: Path | None = None, env: dict | None = None) -> dict:
    """Run `command`; its wall time, stdout, and the peak RSS and PSS of it and its workers
    (sampled every 20 ms). stderr goes to `log` (or nowhere). A failed run is an error."""
    import psutil

    started = time.perf_counter()
    errors = open(log, "w") if log is not None else subprocess.DEVNULL
    try:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        process, peak = psutil.Process(child.pid), [0, 0]

        def sample() -> None:
            while child.poll() is None:
                try:
                    rss, pss = tree_memory(process)
                    peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                except psutil.Error:
                    pass
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output, _ = child.communicate()
        sampler.join()
    finally:
        if log is not None:
            errors.close()
    if child.returncode != 0:
        raise RuntimeError(f"{label} run failed with exit code {child.returncode}" + (f" (log: {log})" if log else ""))
    return {
        "output": output,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": peak[0] / 2**20,
        "peak_pss_mb": peak[1] / 2**20,
    }
