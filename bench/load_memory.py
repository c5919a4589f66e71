"""Benchmark: host memory per rank while a training job loads its base model.

Each (mode, ranks) runs in fresh processes started by torchrun (gloo, CPU ranks), which load
a checkpoint exactly as `medift.train` does and report, per rank:

- `peak_rss_mb`: the resident-set high-water mark (VmHWM) of the rank after loading, and
  `load_peak_rss_mb`, that minus the resident set just before loading (interpreter, torch,
  DeepSpeed and the process group: the same in every mode);
- `rss_anon_after_mb` / `rss_file_after_mb`: the rank's own memory and the checkpoint's
  page cache mapped into it, after loading;
- `pss_mb`: the proportional set size after loading (pages shared between the ranks, such
  as the checkpoint's page cache mapped by both, counted once in all);
- `local_parameters` and `local_parameter_mb`: the parameter elements this rank holds (its
  ZeRO-3 partition, `p.ds_tensor`, or the whole tensor) and their bytes.

Modes:
- `fp32_full`: main's training load before this change: float32, the whole model on
  every rank (then moved to the device by the warm-up); the same on every rank, so it is
  measured with the first rank count only;
- `bf16_zero2`: the load for bf16 training at ZeRO stages 0-2: bf16 straight onto the
  rank's device (here the CPU), the whole model on every rank;
- `bf16_zero3`: the ZeRO-3 load: partitioned over the ranks while it loads
  (`medift.model.loading.partitioned_loading`), bf16.

The default checkpoint is the real Llama-3.2-11B-Vision configuration at reduced depth
(bench/real_models.py: 4 decoder layers, one of them cross-attention, a 1+1-layer vision
tower at full width, vocabulary cut to 8192 rows: 1.09 B parameters, 2.2 GB in bf16), which
a 2-core, 24 GB machine loads in all five runs in about a minute and a half once it is built (30 s).
Every weight is read once after loading (as training does), so memory-mapped weights count.

    python bench/load_memory.py --out results/bench/load_memory.json
    python bench/load_memory.py --checkpoint /path/to/Llama-3.2-11B-Vision-Instruct --ranks 1 2 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medift.settings import launcher_arguments

MODES = ("fp32_full", "bf16_zero2", "bf16_zero3")
REDUCED = dict(text_layers=4, vision_layers=1, global_layers=1, vocab_size=8192)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _pss_kb() -> int | None:
    rollup = Path("/proc/self/smaps_rollup")
    if not rollup.is_file():
        return None
    for line in rollup.read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def load_in_rank(checkpoint: str, mode: str) -> dict:
    """One rank's load in `mode` (run under torchrun); its memory figures."""
    import torch

    from medift import engine as ds_engine
    from medift.model.loading import load_base_model, partitioned_loading

    ds_engine.init_distributed()
    before_kb = _status_kb("VmRSS")
    started = time.perf_counter()
    stage = 3 if mode == "bf16_zero3" else 2
    ds_config = ds_engine.deepspeed_config(1, stage, 1.0, bf16=mode != "fp32_full")
    with partitioned_loading(ds_config):
        if mode == "fp32_full":
            model, _ = load_base_model(checkpoint, dtype="float32")
        else:
            model, _ = load_base_model(checkpoint, dtype="bfloat16", device=ds_engine.training_device())
        seconds = time.perf_counter() - started
        local = [(p.ds_tensor if hasattr(p, "ds_tensor") else p) for p in model.parameters()]
        # Read every weight once, as training does: weights that stay memory-mapped from the
        # checkpoint (bf16 on CPU) are resident only once touched.
        checksum = sum(float(t.float().sum()) for t in local)
        result = {
            "rank": ds_engine.rank(),
            "ranks": ds_engine.world_size(),
            "mode": mode,
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1),
            "load_peak_rss_mb": round((_status_kb("VmHWM") - before_kb) / 1024, 1),
            "rss_after_mb": round(_status_kb("VmRSS") / 1024, 1),
            # Anonymous memory is the rank's own; file pages are the checkpoint's page cache (shared, reclaimable).
            "rss_anon_after_mb": round(_status_kb("RssAnon") / 1024, 1),
            "rss_file_after_mb": round(_status_kb("RssFile") / 1024, 1),
            "pss_mb": None if _pss_kb() is None else round(_pss_kb() / 1024, 1),
            "local_parameters": sum(t.numel() for t in local),
            "local_parameter_mb": round(sum(t.numel() * t.element_size() for t in local) / 2**20, 1),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "checksum_finite": checksum == checksum,
        }
    del model
    torch.distributed.barrier()
    ds_engine.shutdown()
    return result


def measure(checkpoint: str, mode: str, ranks: int, timeout: int = 600) -> list[dict]:
    """Every rank's figures for one (mode, ranks), from fresh torchrun processes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
        env.update(
            DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
            HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
        )
        command = [
            *launcher_arguments(ranks, [str(Path(__file__).resolve())], python=sys.executable),
            "--worker",
            mode,
            "--checkpoint",
            checkpoint,
            "--out",
            tmp,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{mode} with {ranks} ranks failed:\n{done.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))]


def checkpoint_size(checkpoint: str) -> dict:
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    return {"path": checkpoint, "safetensors_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1)}


def run(checkpoint: str, ranks: list[int], modes: list[str]) -> dict:
    """Figures of every mode with every rank count, and the checkpoint's size."""
    results = []
    for mode in modes:
        # fp32_full loads the same whole model on every rank: one rank count shows it.
        for n in ranks if mode != "fp32_full" else ranks[:1]:
            results.append({"mode": mode, "ranks": n, "per_rank": measure(checkpoint, mode, n)})
    return {"checkpoint": checkpoint_size(checkpoint), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Host memory per rank while loading the base model.")
    parser.add_argument(
        "--checkpoint",
        default="",
        help="Checkpoint to load; empty: the reduced real-config one (built once under --build_dir).",
    )
    parser.add_argument(
        "--build_dir",
        default="results/bench/real-mllama-reduced",
        help="Where the reduced checkpoint is built and reused.",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", default="", help="Also write the JSON here.")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = load_in_rank(args.checkpoint, args.worker)
        Path(args.out, f"rank-{result['rank']}.json").write_text(json.dumps(result))
        return 0
    checkpoint = args.checkpoint
    if not checkpoint:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from real_models import build_checkpoint

        checkpoint = args.build_dir
        if not (Path(checkpoint) / "config.json").is_file():
            build_checkpoint(checkpoint, **REDUCED)
    report = run(checkpoint, args.ranks, args.modes)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
