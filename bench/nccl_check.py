"""One-rank NCCL check of medift's collectives, for a machine with a GPU (not run by the tests).

NCCL takes CUDA tensors only. Before the fix, `Run.finish_step` all-reduced a CPU tensor (the
step's token count), which stops any CUDA run of several ranks at its first step; the CPU
tests use gloo, which takes CPU tensors, so they cannot see it. This script shows both sides
on one GPU: `before` is such an all-reduce in an NCCL group (it must fail), `after` is
medift.engine's helpers, which put every tensor on `collective_device()` (they must work).

    python bench/nccl_check.py        # prints one JSON line; exit status 1 if a check fails

It creates the one-rank NCCL group with torch itself (file rendezvous, as
`engine.init_distributed` does for a lone process), so it needs torch with CUDA, not DeepSpeed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medift import engine  # noqa: E402


def before() -> str:
    try:
        dist.all_reduce(torch.tensor(5.0))  # the pre-fix pattern: a CPU tensor
        torch.cuda.synchronize()
    except Exception as error:  # the failure is the expected outcome
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0]}"
    return "passed"


def after() -> dict:
    grad = torch.full((4,), 3.0, device="cuda")  # the proxy's gradient lives on the GPU
    count = torch.tensor(7.0)  # a count made on the CPU
    return {
        "collective_device": str(engine.collective_device()),
        "average_gpu_tensor": engine.average_across_ranks(grad).tolist(),
        "average_cpu_tensor": engine.average_across_ranks(count).item(),
        "gather_step_figures": engine.gather_across_ranks([2.5, 120.0, 31.0]).tolist(),
        "max_across_ranks": engine.max_across_ranks(4.0),  # the checkpoint clock's agreement
    }


def main() -> int:
    torch.cuda.set_device(0)
    rendezvous = tempfile.mktemp(prefix="nccl-check-")
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    report = {"backend": dist.get_backend_config(), "torch": torch.__version__, "before": before()}
    report["after"] = after()
    dist.destroy_process_group()
    expected = {
        "average_gpu_tensor": [3.0] * 4,
        "average_cpu_tensor": 7.0,
        "gather_step_figures": [[2.5, 120.0, 31.0]],
        "max_across_ranks": 4.0,
    }
    report["ok"] = report["before"].startswith("fails") and all(report["after"][k] == v for k, v in expected.items())
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
