"""DeepSpeed ZeRO as the training engine, in one process, on CPU or CUDA.

Every training rule is one Snakemake job = one process = one DeepSpeed rank, so the
rendezvous is set up here (a file of its own per job lets jobs run side by side).
`DS_ACCELERATOR` decides the device: `cpu` here, CUDA where there is a GPU.
"""

from __future__ import annotations

import os
import tempfile

import torch


def init_single_process() -> None:
    """One rank, when no launcher started this process: a file rendezvous, no TCP port.

    Picking a free port and binding it later races when two jobs start side by side (both
    can be handed the same port; one then fails with EADDRINUSE), so a job's single rank
    rendezvouses through a file of its own instead.
    """
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
    deepspeed.init_distributed(dist_backend=backend)


def training_device() -> torch.device:
    """The device DeepSpeed trains on (`DS_ACCELERATOR`): the CPU here, the rank's GPU on a cluster."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(name if name == "cpu" else f"{name}:{get_accelerator().current_device()}")


def deepspeed_config(batch_size: int, zero_stage: int, grad_clip: float, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
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

    init_single_process()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: check train_modules")
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def save_hf(engine, processor, out_dir, zero_stage: int) -> None:
    """Save in the standard Hugging Face layout (safetensors), gathering ZeRO-3 shards first."""
    module = engine.module
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    else:
        module.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def build_ops() -> None:
    """Compile (or load from the torch extensions cache) the op DeepSpeed's CPU backend needs."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
