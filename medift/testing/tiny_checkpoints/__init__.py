"""Tiny random checkpoints of real VLM families, built offline from their config classes.

Each builder returns a model of the family's own transformers class and the family's own
processor (PIL image processor, a byte-level BPE tokenizer with the family's special
tokens, a chat template of the real one's structure). `build_tiny_checkpoint` saves both
with `save_pretrained`, so tests and benchmarks load them exactly like a real local
checkpoint. `python -m medift.testing.tiny_checkpoints FAMILY OUT_DIR` writes one.
`TINY_BUILDERS` maps a family's name to its builder; the family table the pipeline reads
(parameter groups, LoRA targets) is `medift.model.families.FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TINY_BUILDERS: dict[str, Callable] = {}


def _register() -> None:
    from medift.testing.tiny_checkpoints import families_a, families_b

    TINY_BUILDERS.update(families_a.BUILDERS)
    TINY_BUILDERS.update(families_b.BUILDERS)


def build_tiny(family: str, seed: int = 0):
    """(model, processor) of `family`, random weights from `seed`."""
    if not TINY_BUILDERS:
        _register()
    if family not in TINY_BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(sorted(TINY_BUILDERS))}")
    return TINY_BUILDERS[family](seed)


def build_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny `family` checkpoint (model + processor) to `out_dir` and return it."""
    model, processor = build_tiny(family, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def family_names() -> list[str]:
    if not TINY_BUILDERS:
        _register()
    return sorted(TINY_BUILDERS)
