"""Benchmark: the paper's experiment at the size users run it (Llama-3.2-11B-Vision, `vision,fusion`).

No weights are needed: the model is the REAL Llama-3.2-11B-Vision configuration with random
weights (bench/real_models.py), written once as a local checkpoint with its MllamaProcessor and
loaded through medift's own loader. On a GPU it runs at full size; on a CPU at reduced depth
and image size (`--text_layers 4 --vision_layers 1 --global_layers 1 --image_size 112`, the
default there), which keeps every width of the real model. `--checkpoint DIR` runs it on any
local Mllama checkpoint instead (a user's real one; the tests' tiny one). Every figure is measured in this
run; each fix is shown as a ratio against the as-shipped baseline measured in the same run.

Sections (`--sections`, all by default):
- `counts`: parameters of the full-size model per part (meta device, no memory).
- `load`: peak host memory per rank while loading (bench/load_memory.py): main's fp32 load of
  the whole model vs bf16 onto the rank's device (ZeRO-2) vs partitioned (ZeRO-3), 1 and 2 ranks
  on a CPU (gloo); on a GPU one rank (two ranks cannot share one GPU under NCCL).
- `step`: the main stage's training step at batch 2 (bf16 on a GPU, fp32 on a CPU), ZeRO-2,
  `vision,fusion` + the proxy (ift), through the real DeepSpeed engine: median step time,
  samples/s, text and image tokens/s, peak GPU memory, MFU and HFU (medift/flops.py), for
  activation checkpointing as shipped (transformers' own: decoder layers only, input-gradient
  hooks on every tower), as fixed (medift.train.enable_activation_checkpointing: the vision
  encoder's layers too, no hooks), and off.
- `tiles`: the vision tower's forward on a one-tile (560 px) image as the model computes it
  (padded to max_num_tiles 4) vs the real tile alone (the same weights in a one-tile tower),
  their times and the largest difference of their outputs (Mllama's real patches attend to the
  padding tiles, so the two are different computations: docs/training.md).
- `scoring`: letter scoring (evaluation and validation) in questions/s at batch 8 and 32.

    python bench/real_size.py --out results/bench/real_size.json            (or: snakemake results/bench/real_size.json)
    python bench/real_size.py --size full --out /tmp/real_size.json           (a GPU: the full 11B)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import load_memory  # noqa: E402  (bench/ is not a package)
import real_models  # noqa: E402
import torch  # noqa: E402

SECTIONS = ("counts", "load", "step", "tiles", "scoring")
REDUCED = dict(text_layers=4, vision_layers=1, global_layers=1, vocab_size=8192, image_size=112)
FULL = dict(text_layers=40, vision_layers=32, global_layers=8, vocab_size=128256, image_size=560)
CHECKPOINTING = ("fixed", "shipped", "off")  # the order they run in: the lowest memory first
WORDS = (
    "segmented nucleus",
    "fine granules",
    "pale cytoplasm",
    "round cell",
    "irregular membrane",
    "dense chromatin",
    "small vacuoles",
    "violet granules",
    "large nucleolus",
    "thin rim",
)


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def description(rng: random.Random, phrases: int) -> str:
    """A WBCAtt-like description: comma-separated attribute phrases."""
    return ", ".join(rng.choice(WORDS) for _ in range(phrases))


def images(n: int, side: int, seed: int) -> list:
    """n square RGB images of `side` px (one tile each at the real tile size)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


# ------------------------------------------------------------------ step


def training_batch(processor, proxy_text: str, batch_size: int, side: int, phrases: int) -> dict:
    """A micro-batch as training builds it: the proxy's placeholder as the user turn, a description as
    the response, through the one model-input builder."""
    from medift.chat import encode_conversation, model_inputs

    rng = random.Random(0)
    rows = [
        encode_conversation(processor, [proxy_text], [description(rng, phrases)], with_image=True)
        for _ in range(batch_size)
    ]
    return model_inputs(processor, rows, images(batch_size, side, seed=1), padding_side="right")


def set_checkpointing(model, mode: str) -> None:
    """Activation checkpointing as shipped (main's call), as fixed (medift's), or off."""
    from medift.train import disable_activation_checkpointing, enable_activation_checkpointing

    disable_activation_checkpointing(model)
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    if mode == "shipped":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "fixed":
        enable_activation_checkpointing(model)


def host_peak_gib() -> float:
    """This process's resident-set high-water mark (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 2)
    raise KeyError("VmHWM")


def step_section(checkpoint: str, device: torch.device, steps: int, batch_size: int, phrases: int, modes) -> dict:
    """Main-stage training steps through the real engine, once per checkpointing mode."""
    from medift import engine as ds_engine
    from medift import flops
    from medift.model.loading import load_base_model, select_trainable
    from medift.proxy import ProxyInstruction
    from medift.train import TrainConfig, on_device, proxy_optimizer

    bf16 = device.type == "cuda"
    ds_engine.init_distributed()
    model, processor = load_base_model(
        checkpoint, dtype="bfloat16" if bf16 else "float32", device=ds_engine.training_device()
    )
    host_after_load = host_peak_gib()
    trainable = select_trainable(model, "vision,fusion")
    hidden = model.get_input_embeddings().weight.shape[1]
    proxy = ProxyInstruction(8, hidden, processor.tokenizer.proxy_token_id, torch.Generator().manual_seed(1)).attach(
        model
    )
    proxy.to(ds_engine.training_device())
    config = TrainConfig(shards="", base_model=checkpoint, out_dir="", lr=2e-5, bf16=bf16, batch_size=batch_size)
    engine = ds_engine.initialize(model, ds_engine.deepspeed_config(batch_size, 2, 1.0, bf16), config.lr)
    optimizer = proxy_optimizer(proxy, config)
    side = model.config.vision_config.image_size
    batch = training_batch(processor, processor.tokenizer.proxy_token * 8, batch_size, side, phrases)
    dtype = next(engine.module.parameters()).dtype
    peak = flops.device_peak_flops()

    def one_step() -> float:
        synchronize(device)
        started = time.perf_counter()
        proxy.load_momentum_copy()
        optimizer.zero_grad(set_to_none=True)
        loss = engine(**on_device(batch, engine.device, dtype)).loss
        engine.backward(loss)
        engine.step()
        optimizer.step()
        proxy.update_momentum_copy(0.999)
        synchronize(device)
        return time.perf_counter() - started

    results = {}
    for mode in modes:
        set_checkpointing(engine.module, mode)
        try:
            one_step()  # the first step of a mode allocates (and, the first time, creates the optimizer state)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = [one_step() for _ in range(steps)]
        except torch.OutOfMemoryError as error:
            results[mode] = {"out_of_memory": str(error).splitlines()[0]}
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        seconds = statistics.median(times)
        # What each mode recomputes: medift's checkpointing every tower, transformers' own the decoder only.
        recompute = {"fixed": True, "shipped": {"text"}, "off": False}[mode]
        work = flops.step_flops(model.config, batch, trainable["groups"], proxy=True, recompute=recompute)
        results[mode] = {
            "step_seconds": round(seconds, 4),
            "step_seconds_all": [round(t, 4) for t in times],
            "samples_per_second": round(batch_size / seconds, 3),
            "text_tokens_per_second": round(work["text_tokens"] / seconds, 1),
            "image_tokens_per_second": round(work["image_tokens"] / seconds, 1),
            "model_flops_per_step": work["model_flops"],
            "hardware_flops_per_step": work["hardware_flops"],
            "model_tflops_per_second": round(work["model_flops"] / seconds / 1e12, 3),
            "mfu": None if peak is None else round(work["model_flops"] / seconds / peak, 4),
            "hfu": None if peak is None else round(work["hardware_flops"] / seconds / peak, 4),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda"
            else None,
        }
        print(f"step [{mode}]: {json.dumps(results[mode])}", flush=True)
    base = results.get("shipped", {})
    for mode, row in results.items():
        if "step_seconds" in row and "step_seconds" in base:
            row["speed_vs_shipped"] = round(base["step_seconds"] / row["step_seconds"], 3)
            if row["peak_gpu_memory_gib"] is not None:
                row["memory_vs_shipped"] = round(row["peak_gpu_memory_gib"] / base["peak_gpu_memory_gib"], 3)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "batch_size": batch_size,
        "text_tokens_per_row": int(batch["attention_mask"].sum()) // batch_size,
        "trainable_parameters": trainable["trainable"],
        "total_parameters": trainable["total"],
        "peak_flops": peak,
        # Host memory of this (single-rank) process: after loading, and its peak over every step.
        "host_peak_gib_after_load": host_after_load,
        "host_peak_gib": host_peak_gib(),
    }
    engine = model = optimizer = None  # free them (one_step closes over them)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"setup": info, "modes": results}


# ------------------------------------------------------------------ tiles


def one_tile_tower(tower):
    """The same vision tower for images of one tile: Mllama's tile-dependent embeddings cut to the
    first tile and to the aspect ratios of one tile (ids 0 and 1, whose rows are the same in both)."""
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    config = type(tower.config).from_dict(
        {**tower.config.to_dict(), "max_num_tiles": 1, "supported_aspect_ratios": [[1, 1]]}
    )
    small = MllamaVisionModel(config).to(device=tower.device, dtype=tower.dtype)
    state = tower.state_dict()
    hidden, patches = config.hidden_size, (config.image_size // config.patch_size) ** 2 + 1
    for name, width in (
        ("pre_tile_positional_embedding.embedding.weight", hidden),
        ("post_tile_positional_embedding.embedding.weight", hidden),
        ("gated_positional_embedding.tile_embedding.weight", patches * hidden),
    ):
        state[name] = state[name][: config.max_aspect_ratio_id + 1, :width]
    small.load_state_dict(state)
    return small.eval()


def tiles_section(checkpoint: str, device: torch.device, repeats: int, batch_size: int) -> dict:
    """Vision forward on one-tile images, padded to the processor's 4 tiles vs the real tile alone."""
    from medift.model.loading import load_base_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = load_base_model(
        checkpoint, dtype="bfloat16" if dtype == torch.bfloat16 else "float32", device=device
    )
    tower = model.model.vision_model.eval()
    side = tower.config.image_size
    inputs = processor.image_processor(
        images=[[image] for image in images(batch_size, side, seed=2)], return_tensors="pt"
    )
    padded = {
        "pixel_values": inputs["pixel_values"].to(device, dtype),
        "aspect_ratio_ids": inputs["aspect_ratio_ids"].to(device),
        "aspect_ratio_mask": inputs["aspect_ratio_mask"].to(device),
    }
    real = {
        "pixel_values": padded["pixel_values"][:, :, :1],
        "aspect_ratio_ids": padded["aspect_ratio_ids"],
        "aspect_ratio_mask": padded["aspect_ratio_mask"][:, :, :1],
    }
    small = one_tile_tower(tower)

    def timed(module, kwargs) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            out = module(**kwargs).last_hidden_state  # warm-up (kernels, allocator)
            times = []
            for _ in range(repeats):
                synchronize(device)
                started = time.perf_counter()
                out = module(**kwargs).last_hidden_state
                synchronize(device)
                times.append(time.perf_counter() - started)
        return statistics.median(times), out

    padded_seconds, padded_out = timed(tower, padded)
    real_seconds, real_out = timed(small, real)
    # (images, media, tiles, tokens, features): the real tile's outputs in both computations.
    difference = (padded_out[:, :, :1].float() - real_out.float()).abs()
    result = {
        "tiles_computed": int(padded["pixel_values"].shape[2]),
        "real_tiles": int(padded["aspect_ratio_mask"].sum()) // batch_size,
        "padded_seconds": round(padded_seconds, 4),
        "real_tile_seconds": round(real_seconds, 4),
        "speedup": round(padded_seconds / real_seconds, 2),
        "max_abs_difference": float(difference.max()),
        "output_max_abs": float(padded_out[:, :, :1].float().abs().max()),
        "mean_abs_difference": float(difference.mean()),
        "dtype": str(dtype),
        "images": batch_size,
    }
    print(f"tiles: {json.dumps(result)}", flush=True)
    del model, tower, small
    gc.collect()
    return result


# ------------------------------------------------------------------ scoring


def scoring_section(checkpoint: str, device: torch.device, questions: int, batch_sizes) -> dict:
    """Letter scoring (one forward per question) in questions/s, at each batch size."""
    from medift import mcq
    from medift.generation import score_letters
    from medift.model.loading import load_base_model

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model, processor = load_base_model(checkpoint, dtype=dtype, device=device)
    model.eval()
    rng = random.Random(3)
    side = model.config.vision_config.image_size
    pictures = images(questions, side, seed=3)
    options = [[rng.choice(WORDS) for _ in range(4)] for _ in range(questions)]
    instructions = [mcq.build_mcq_instruction("Which attribute does the nucleus show?", o) for o in options]
    result = {}
    for batch_size in batch_sizes:
        score_letters(
            model, processor, instructions[:batch_size], pictures[:batch_size], [4] * batch_size, batch_size, None
        )
        synchronize(device)
        started = time.perf_counter()
        score_letters(model, processor, instructions, pictures, [4] * questions, batch_size, None)
        synchronize(device)
        seconds = time.perf_counter() - started
        result[f"batch_{batch_size}"] = {
            "questions": questions,
            "seconds": round(seconds, 3),
            "questions_per_second": round(questions / seconds, 2),
        }
        print(f"scoring batch {batch_size}: {json.dumps(result[f'batch_{batch_size}'])}", flush=True)
    del model
    gc.collect()
    return result


# ------------------------------------------------------------------ driver


def build_once(directory: Path, sizes: dict, device: torch.device) -> Path:
    """The checkpoint of `sizes`, built once (a build stopped half-way has no marker and is redone)."""
    marker = directory / ".built"
    if marker.is_file():
        return directory
    started = time.perf_counter()
    real_models.build_checkpoint(directory, device=device, **sizes)
    marker.write_text(json.dumps(sizes))
    print(f"built {directory} in {time.perf_counter() - started:.1f}s", flush=True)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        default="auto",
        choices=("auto", "full", "reduced"),
        help=("full: the 11B; reduced: reduced depth and tile size; auto: full on a GPU, reduced on a CPU."),
    )
    for key, value in REDUCED.items():
        parser.add_argument(f"--{key}", type=int, default=None, help=f"Reduced size's {key} (default {value}).")
    parser.add_argument("--device", default="auto", help="auto (a GPU if torch sees one), cpu, cuda.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated, of {', '.join(SECTIONS)}.")
    parser.add_argument(
        "--steps", type=int, default=2, help="Timed training steps per checkpointing mode (after one untimed)."
    )
    parser.add_argument("--batch_size", type=int, default=2, help="Training micro-batch (the paper: 2).")
    parser.add_argument(
        "--phrases", type=int, default=24, help="Attribute phrases per description (sets the text length)."
    )
    parser.add_argument("--checkpointing", default=",".join(CHECKPOINTING), help="Modes of the step section, in order.")
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=None, help="Rank counts of the load section (CPU: 1 2; GPU: 1)."
    )
    parser.add_argument("--load_modes", nargs="+", default=list(load_memory.MODES), help="Modes of the load section.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed forwards per tiles variant.")
    parser.add_argument("--questions", type=int, default=32, help="Questions of the scoring section.")
    parser.add_argument("--checkpoint", default="", help="A local Mllama checkpoint to run on instead of building one.")
    parser.add_argument(
        "--work_dir", default="resources/bench/real_size", help="Where the checkpoint is built (reused)."
    )
    parser.add_argument("--out", default="results/bench/real_size.json")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    device = device_of(args.device)
    full = args.size == "full" or (args.size == "auto" and device.type == "cuda")
    sizes = dict(FULL if full else REDUCED)
    sizes.update({k: getattr(args, k) for k in REDUCED if getattr(args, k) is not None})
    name = "full" if sizes == FULL else "-".join(f"{k}{v}" for k, v in sizes.items())
    if args.checkpoint:
        checkpoint, sizes = Path(args.checkpoint), {"checkpoint": args.checkpoint}
    else:
        checkpoint = build_once(Path(args.work_dir) / f"mllama-{name}", sizes, device)
    out = {"sizes": sizes, "device": str(device), "sections": {}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write():  # after every section, so a run stopped by its time limit keeps what it measured
        out_path.write_text(json.dumps(out, indent=1))

    for section in sections:
        started = time.perf_counter()
        if section == "counts":
            result = real_models.parameter_counts()
        elif section == "load":
            ranks = args.ranks or ([1] if device.type == "cuda" else [1, 2])
            result = load_memory.run(str(checkpoint), ranks, args.load_modes)
        elif section == "step":
            result = step_section(
                str(checkpoint),
                device,
                args.steps,
                args.batch_size,
                args.phrases,
                [m for m in args.checkpointing.split(",") if m],
            )
        elif section == "tiles":
            result = tiles_section(str(checkpoint), device, args.repeats, args.batch_size)
        else:
            result = scoring_section(str(checkpoint), device, args.questions, (8, 32))
        out["sections"][section] = result | {"section_seconds": round(time.perf_counter() - started, 1)}
        write()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
