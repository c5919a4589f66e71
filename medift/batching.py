"""How the micro-batch, gradient accumulation and ranks make the global batch.

    global batch = batch_size x gradient_accumulation x ranks x nodes

(ranks per node; the launcher's WORLD_SIZE is ranks x nodes). The global batch is what the
optimizer steps on, so it is the setting that keeps results comparable when a job moves
from one GPU to eight: given `global_batch`, the accumulation is derived from it, and a
combination that cannot give it exactly is refused before any work starts. Both the
workflow's config check and TrainConfig call `accumulation_for`.

Standard library only: the workflow loads this file without importing medift's dependencies.
"""

from __future__ import annotations


def accumulation_for(global_batch: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank that give `global_batch`:
    global_batch / (batch_size x world_size), which must be a whole number >= 1."""
    if global_batch < 1 or batch_size < 1 or world_size < 1:
        raise ValueError(
            f"global_batch {global_batch}, batch_size {batch_size} and ranks {world_size} must be at least 1"
        )
    per_step = batch_size * world_size  # samples of one micro-step over every rank
    accumulation, rest = divmod(global_batch, per_step)
    if accumulation < 1 or rest:
        raise ValueError(
            f"global_batch {global_batch} cannot be made of micro-batches of {batch_size} on {world_size} rank(s) "
            "in all (ranks x nodes): "
            f"global_batch / (batch_size x ranks) = {global_batch}/{per_step} is not a whole number >= 1; "
            f"choose batch_size and ranks whose product divides {global_batch} (e.g. fewer ranks, or jobs side by side)"
        )
    return accumulation


def resolve_accumulation(global_batch: int | None, batch_size: int, accumulation: int, world_size: int) -> int:
    """The accumulation a job runs with: `accumulation` itself when no global batch is asked for,
    else the one derived from it (an explicit different accumulation is a contradiction)."""
    if global_batch is None:
        return accumulation
    derived = accumulation_for(global_batch, batch_size, world_size)
    if accumulation not in (1, derived):
        raise ValueError(
            f"gradient_accumulation {accumulation} contradicts global_batch {global_batch} "
            f"(batch_size {batch_size} x {world_size} rank(s) needs {derived}); set one of them"
        )
    return derived
