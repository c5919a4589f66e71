"""Resumable training checkpoints, kept outside a job's declared outputs.

Snakemake deletes a failed job's outputs, so a job killed by a cluster's time limit would
otherwise start again from step 0. Every `checkpoint_minutes` of training (the slowest rank's
clock, so every rank picks the same step) and/or every `checkpoint_every` optimizer steps the
job writes

    <checkpoint_dir>/step-000040/
        state.json            position (epoch of the plan, steps done in it), history, validation, best epoch
        proxy.safetensors     the proxy P and its momentum copy P_bar
        proxy_optimizer.pt    the proxy's AdamW state (read back with weights_only)
        best.safetensors      the trainable weights of the best validation epoch (train.select: best_val)
        rng-rank<r>.pt        each rank's torch RNG state (weights_only)
        engine/               DeepSpeed's own checkpoint: trainable weights and optimizer state, per rank
    <checkpoint_dir>/latest   the name of the last complete step directory

A step directory is written under a temporary name and renamed once every rank has written
its part; `latest` is replaced after that. A kill at any moment therefore leaves either the
previous checkpoint or the new one, never a half-written one. A restarted job resumes from
`latest` if it was written with the same settings (the fingerprint), and otherwise says so and
starts at step 0. The directory is removed once the job has saved its model.

The trainable weights and optimizer state make a checkpoint large (about 37 GB for
Llama-3.2-11B-Vision with vision,fusion trained), so the log gives each one's size and the
seconds it took: the interval should keep writing them a small share of the training time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from medift import engine as ds_engine

log = logging.getLogger(__name__)

LATEST = "latest"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def directory_bytes(directory: Path) -> int:
    """Bytes of every file under `directory`."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


class Checkpoints:
    def __init__(self, directory: str, fingerprint: dict):
        self.root = Path(directory)
        self.fingerprint = fingerprint

    # ------------------------------------------------------------------ reading

    def latest(self) -> Path | None:
        """The last complete checkpoint written with these settings, or None (then any stale one is reported)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        step_dir = self.root / pointer.read_text().strip()
        state_file = step_dir / "state.json"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{pointer} names {step_dir.name}, which has no state.json (remove {self.root} to start over)"
            )
        saved = json.loads(state_file.read_text())["fingerprint"]
        if saved != self.fingerprint:
            changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            log.warning(
                "checkpoint %s was written with other settings (%s differ): not resumed, starting at step 0",
                step_dir,
                ", ".join(changed),
            )
            return None
        return step_dir

    @staticmethod
    def load_state(step_dir: Path) -> dict:
        return json.loads((step_dir / "state.json").read_text())

    @staticmethod
    def load_proxy(step_dir: Path, proxy, optimizer) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(step_dir / "proxy.safetensors"))
        with torch.no_grad():
            proxy.weight.copy_(tensors["proxy"])
            proxy.momentum_copy.copy_(tensors["momentum_copy"])
        optimizer.load_state_dict(torch.load(step_dir / "proxy_optimizer.pt", weights_only=True))

    @staticmethod
    def load_best(step_dir: Path) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = step_dir / "best.safetensors"
        return load_file(str(path)) if path.is_file() else None

    @staticmethod
    def load_rng(step_dir: Path) -> None:
        torch.set_rng_state(torch.load(step_dir / f"rng-rank{ds_engine.rank()}.pt", weights_only=True))

    # ------------------------------------------------------------------ writing

    def save(self, step: int, state: dict, proxy, proxy_optimizer, engine, best: dict | None) -> Path:
        """Write checkpoint `step` (every rank calls this: DeepSpeed's part is collective)."""
        from safetensors.torch import save_file

        started = time.perf_counter()
        name = f"step-{step:06d}"
        partial = self.root / f"{name}.partial"
        if ds_engine.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        if engine is not None:
            # Frozen weights come back from the base model; only what trains is saved.
            engine.save_checkpoint(str(partial), tag="engine", save_latest=False, exclude_frozen_parameters=True)
        torch.save(torch.get_rng_state(), partial / f"rng-rank{ds_engine.rank()}.pt")
        if ds_engine.rank() == 0:
            (partial / "state.json").write_text(json.dumps({**state, "fingerprint": self.fingerprint}, indent=1))
            if proxy is not None:
                save_file(
                    {"proxy": proxy.weight.detach().contiguous(), "momentum_copy": proxy.momentum_copy.contiguous()},
                    str(partial / "proxy.safetensors"),
                )
                torch.save(proxy_optimizer.state_dict(), partial / "proxy_optimizer.pt")
            if best is not None:
                save_file({k: v.contiguous() for k, v in best.items()}, str(partial / "best.safetensors"))
        _barrier()
        final = self.root / name
        if ds_engine.rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            pointer = self.root / f"{LATEST}.partial"
            pointer.write_text(name)
            os.replace(pointer, self.root / LATEST)
            for old in self.root.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
            log.info(
                "checkpoint %s written: %d bytes in %.2f s",
                final,
                directory_bytes(final),
                time.perf_counter() - started,
            )
        _barrier()
        return final

    def remove(self) -> None:
        """After the model is saved the checkpoints have served their purpose."""
        _barrier()
        if ds_engine.rank() == 0:
            shutil.rmtree(self.root, ignore_errors=True)
