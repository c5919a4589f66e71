"""Test-only launcher (tests/test_ranks.py): `python -m medift.train` on each rank, with every
collective that medift itself calls checked for the device of its tensors.

Why: NCCL (CUDA runs) takes CUDA tensors only, so an all-reduce of a CPU tensor stops a
multi-GPU job at its first step; the CPU tests use gloo, which takes CPU tensors too, so there
nothing notices such a tensor. Here the engine is told, by a test-only backend mapping
(`torch.distributed.get_backend_config` answers "lazy:gloo"), that the process group takes
tensors of torch's `lazy` device only: a device that holds real data on a CPU-only machine
but is not where training tensors live (the CPU), as the GPU is not where a count made on the
CPU lives. The checker wraps torch.distributed's collectives: a call from a medift module with
a tensor anywhere but `engine.collective_device()` (lazy:0) fails the rank, as NCCL fails it;
an accepted call runs on the real gloo group through CPU copies. So `dist.all_reduce(torch.tensor(x))`
in medift, or a helper that forgets to move its tensor, fails this run. DeepSpeed's own
collectives pass through unchecked (under NCCL DeepSpeed puts its tensors on the GPU itself).

STRICT_CLOCK_SKEW=<factor> makes medift.train's clock run <factor> times fast on rank 1 only:
with checkpoint_minutes, the ranks then checkpoint at the same steps only if they agree on
the slowest clock (a rank deciding alone would wait forever in the checkpoint's barrier).

Each rank also counts the shard files it hashes (sha256): rank 0 alone should.

`--self-test`: one rank; the engine's helpers must pass and the pre-fix pattern (an
all-reduce of a CPU tensor from medift.train) must be refused.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

CHECKED = ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
           "reduce_scatter", "all_to_all_single", "gather", "scatter")
checked_calls = 0
hashed_files = 0


def tensors_of(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += [v for v in value if isinstance(v, torch.Tensor)]
    return found


def on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def copy_back(original, computed) -> None:
    """Results of the CPU run into the caller's tensors (outputs and in-place inputs)."""
    if isinstance(original, torch.Tensor):
        original.copy_(computed.to(original.device))
    elif isinstance(original, (list, tuple)):
        for o, c in zip(original, computed):
            copy_back(o, c)


def strict(name: str, real):
    def collective(*args, **kwargs):
        global checked_calls
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if not caller.startswith("medift"):
            return real(*args, **kwargs)
        from medift import engine

        wanted = engine.collective_device()
        wrong = [t.device for t in tensors_of(args, kwargs) if t.device != wanted]
        assert not wrong, (f"{caller} called dist.{name} with tensors on {wrong}; the backend takes {wanted} "
                           "(NCCL refuses CPU tensors): put them on engine.collective_device()")
        checked_calls += 1
        cpu_args, cpu_kwargs = on_cpu(args), {k: on_cpu(v) for k, v in kwargs.items()}
        result = real(*cpu_args, **cpu_kwargs)
        copy_back(args, cpu_args)
        copy_back(list(kwargs.values()), list(cpu_kwargs.values()))
        return result

    return collective


def install_checker() -> None:
    import torch._lazy
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    dist.get_backend_config = lambda group=None: "lazy:gloo"  # the test-only backend mapping
    for name in CHECKED:
        setattr(dist, name, strict(name, getattr(dist, name)))


class SkewedTime:
    """medift.train's `time`, its perf_counter `factor` times fast."""

    def __init__(self, factor: float):
        self.factor, self.origin = factor, time.perf_counter()

    def perf_counter(self) -> float:
        return self.origin + (time.perf_counter() - self.origin) * self.factor

    def __getattr__(self, name):
        return getattr(time, name)


def self_test() -> None:
    from medift import engine

    engine.init_distributed()
    grad = torch.full((3,), 2.0)
    assert torch.equal(engine.average_across_ranks(grad), torch.full((3,), 2.0)) and grad.device.type == "cpu"
    assert engine.gather_across_ranks([1.5, 7.0]).tolist() == [[1.5, 7.0]]
    assert engine.max_across_ranks(3.0) == 3.0
    helpers = checked_calls
    pre_fix = "dist.all_reduce(torch.tensor(float(tokens)))"  # Run.finish_step before the fix
    try:
        exec(compile(pre_fix, "medift/train.py", "exec"), {"__name__": "medift.train", "dist": dist, "torch": torch, "tokens": 5})
    except AssertionError as refused:
        print(f"strict collectives: {helpers} helper calls passed; the pre-fix all-reduce was refused: {refused}")
    else:
        raise SystemExit("the checker let an all-reduce of a CPU tensor through")
    engine.shutdown()


def main() -> int:
    install_checker()
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return 0
    from medift import shards, train

    real_sha256 = shards._sha256

    def counted_sha256(path):
        global hashed_files
        hashed_files += 1
        return real_sha256(path)

    shards._sha256 = counted_sha256
    skew = float(os.environ.get("STRICT_CLOCK_SKEW", "1"))
    if skew != 1 and os.environ.get("RANK") == "1":
        train.time = SkewedTime(skew)
    code = train.main(sys.argv[1:])
    print(f"strict collectives: rank {os.environ.get('RANK', 0)} checked {checked_calls} medift collectives, "
          f"hashed {hashed_files} shard files", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
