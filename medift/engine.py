"""DeepSpeed ZeRO as the training engine, on CPU or CUDA, with one rank or several.

A training job is one process, or `train.ranks` processes started by torchrun
(`--standalone`: a rendezvous of its own per job, so jobs still run side by side). A
single process started without a launcher rendezvouses through a file of its own.
`DS_ACCELERATOR` decides the device: `cpu` here (gloo), CUDA where there is a GPU.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from medift.settings import check_offload


def _use_this_environments_ninja() -> None:
    """Put this interpreter's bin/ first on PATH before DeepSpeed may build its op.

    The op is rebuilt whenever a different ninja runs the build (each rewrites the build log
    in its own format): a workflow job finds the venv's ninja first on PATH, a plain shell may
    find the system's. Alternating cost every such job a 30 s rebuild (measured here).
    """
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def init_distributed() -> None:
    """Join the job's ranks (a launcher's environment), or be its only rank: a file rendezvous, no TCP port.

    Picking a free port and binding it later races when two jobs start side by side (both
    can be handed the same port; one then fails with EADDRINUSE), so a job's single rank
    rendezvouses through a file of its own instead.
    """
    _use_this_environments_ninja()
    import deepspeed  # imported late: it probes the accelerator at import
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
    if os.environ.get("WORLD_SIZE") is None and not dist.is_initialized():  # not started by a launcher
        # Only LOCAL_RANK (DeepSpeed insists on it) is written to the environment, not WORLD_SIZE
        # or MASTER_PORT: processes this one starts (a test running the workflow) inherit it,
        # and would take those for a launcher's, all on one port.
        os.environ.setdefault("LOCAL_RANK", "0")
        store = tempfile.NamedTemporaryFile(prefix="medift-rendezvous-", delete=False)
        store.close()
        os.unlink(store.name)  # the file store creates it; it must not exist yet
        dist.init_process_group(backend=backend, init_method=f"file://{store.name}", rank=0, world_size=1)
    elif get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank
    deepspeed.init_distributed(dist_backend=backend)


def shutdown() -> None:
    """Leave the job's process group once every rank is done (a rank that exits while a gloo
    thread still serves the group aborts: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        if world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def backend_device_types() -> list[str]:
    """Device types whose tensors the job's process group takes, read from its backend config:
    ["cuda"] for NCCL ("cuda:nccl"), ["cpu", "cuda"] for gloo or "cpu:gloo,cuda:nccl"."""
    import torch.distributed as dist

    return [entry.split(":")[0] for entry in dist.get_backend_config().split(",")]


def collective_device() -> torch.device:
    """Where medift's collectives put their tensors: the training device when the backend takes
    it (no copy), else the first device type the backend takes.

    NCCL takes CUDA tensors only: a CPU tensor in an NCCL group fails ("No backend type
    associated with device type cpu"), so a count made on the CPU must travel to the GPU first.
    """
    types = backend_device_types()
    if len(types) > 1:  # gloo, or a mixed "cpu:gloo,cuda:nccl" group: no copy where the training tensors live
        training = training_device()
        if training.type in types:
            return training
    if types[0] == "cpu":
        return torch.device("cpu")
    return torch.empty(0, device=types[0]).device  # the type's current device, index included (cuda:3 on rank 3)


def _collective_ready() -> bool:
    """Collectives run whenever a process group exists, one rank included: one code path for
    1 and N ranks (a one-GPU run then exercises the NCCL path; a scalar all-reduce costs microseconds)."""
    import torch.distributed as dist

    return dist.is_initialized()


def average_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of `tensor` over the ranks, reduced on `collective_device()`."""
    import torch.distributed as dist

    if not _collective_ready():
        return tensor
    work = tensor.detach().to(collective_device())  # `tensor` itself (a view) when it is there already
    dist.all_reduce(work)
    work /= world_size()
    if work.device != tensor.device:
        with torch.no_grad():
            tensor.copy_(work.to(tensor.device))
    return tensor


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `tensor` over the ranks, reduced on `collective_device()`."""
    import torch.distributed as dist

    if not _collective_ready():
        return tensor
    work = tensor.detach().to(collective_device())
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work.device != tensor.device:
        with torch.no_grad():
            tensor.copy_(work.to(tensor.device))
    return tensor


def gather_across_ranks(values: list[float]) -> torch.Tensor:
    """Every rank's `values`, one row per rank (float64, on the CPU): several per-step figures in
    one small collective instead of one collective each."""
    import torch.distributed as dist

    row = torch.tensor(values, dtype=torch.float64)
    if not _collective_ready():
        return row[None]
    row = row.to(collective_device())
    rows = [torch.empty_like(row) for _ in range(world_size())]
    dist.all_gather(rows, row)
    return torch.stack(rows).cpu()


def gather_objects(value) -> list:
    """Every rank's `value` (any picklable object, e.g. a frame of predictions), in rank order, on
    every rank; [value] without a process group."""
    import torch.distributed as dist

    if not _collective_ready():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)  # NCCL: through the rank's current device, set at init
    return gathered


def max_across_ranks(value: float) -> float:
    """The largest `value` of any rank (every rank gets the same answer)."""
    import torch.distributed as dist

    if not _collective_ready():
        return value
    work = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    return float(work.item())


def max_difference_across_ranks(tensor: torch.Tensor) -> float:
    """Largest absolute difference between this tensor on any rank and on rank 0."""
    import torch.distributed as dist

    if not _collective_ready() or world_size() == 1:
        return 0.0
    work = tensor.detach().to(collective_device()).contiguous()
    gathered = [torch.empty_like(work) for _ in range(world_size())]
    dist.all_gather(gathered, work)
    return max(float((t - gathered[0]).abs().max()) for t in gathered)


def on_rank_zero(task, what: str) -> None:
    """Run `task` on rank 0 only while the other ranks wait for its verdict; if it fails there,
    every rank fails (none is left waiting for a rank that stopped)."""
    error = None
    if rank() == 0:
        try:
            task()
        except Exception as caught:  # re-raised below, after the others have heard of it
            error = caught
    failed = max_across_ranks(float(error is not None))
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what} failed on rank 0 (its log says why)")


def training_device() -> torch.device:
    """The device DeepSpeed trains on (`DS_ACCELERATOR`): the CPU here, the rank's GPU on a cluster."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(name if name == "cpu" else f"{name}:{get_accelerator().current_device()}")


def zero_settings(zero_stage: int, offload: str) -> dict:
    """ZeRO settings; `offload` moves the optimizer state (and, at stage 3, the parameters) to CPU memory."""
    check_offload(zero_stage, offload)  # the one rule (medift/settings.py), also the workflow's
    settings: dict = {"stage": zero_stage}
    if offload != "none":
        settings["offload_optimizer"] = {"device": "cpu"}
    if offload == "optimizer+parameters":
        settings["offload_param"] = {"device": "cpu"}
    return settings


def deepspeed_config(
    batch_size: int, zero_stage: int, grad_clip: float, bf16: bool, accumulation: int = 1, offload: str = "none"
) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": zero_settings(zero_stage, offload),
        # torch's AdamW is kept under offload too (DeepSpeed would swap in its compiled CPU Adam).
        "zero_force_ds_cpu_optimizer": False,
        # The optimizer is torch's AdamW (see `initialize`), as in the reference code.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # progress is ours (tqdm); DeepSpeed's own prints would flood the log
        "wall_clock_breakdown": False,
    }


def initialize(model, config: dict, lr: float):
    """Wrap `model` in a ZeRO engine whose optimizer is torch's AdamW over the trainable parameters.

    torch's AdamW (not DeepSpeed's fused kernels) is what the reference trains with, and it
    spares every fresh machine a C++ build of DeepSpeed's fused Adam.
    """
    import deepspeed

    init_distributed()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: check train_modules")
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def save_hf(engine, processor, out_dir, zero_stage: int) -> None:
    """Save in the standard Hugging Face layout (safetensors) from rank 0; ZeRO-3 shards are
    gathered from every rank first (each rank must take part)."""
    module = engine.module
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank() == 0:
        if state is not None:
            module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        else:
            module.save_pretrained(out_dir, safe_serialization=True)
        processor.save_pretrained(out_dir)


def build_ops() -> None:
    """Compile (or load from the torch extensions cache) the op DeepSpeed's CPU backend needs."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _use_this_environments_ninja()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--build-ops"]:
        print("usage: python -m medift.engine --build-ops", file=sys.stderr)
        raise SystemExit(2)
    build_ops()
