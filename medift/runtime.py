"""Process-level settings shared by every step."""

from __future__ import annotations

import torch

from medift.settings import available_cpus  # the workflow's CPU count too


def set_torch_threads(requested: int) -> int:
    """torch threads = the rule's `threads`, but never more than the CPUs this process may use.

    `snakemake --cores 8` on a 2-core machine may hand a job 8 threads; oversubscribing
    OpenMP threads makes every matmul slower, so the count is clamped.
    """
    threads = max(1, min(requested, available_cpus()))
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU; a named device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device
