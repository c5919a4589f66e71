"""Benchmark: each image encoded once for all its prompts (`--encode_once`, the default) against
every prompt encoding its image, in the evaluation itself (`medift.evaluate.score_questions`).

The questions are a synthetic WBCAtt release's test questions, made by the pipeline's own
`prepare_shards`, asked three ways:
- `plain`: the questions as the pipeline makes them and as written (one question per image:
  medift.datasets.wbcatt.make_questions asks about one attribute), so no image is asked twice
  and encoding once can only cost or save the bookkeeping;
- `circular`: the same questions in every rotation of their options (2-6 prompts per image);
- `every_attribute`: an image asked about each of its attributes (11-12 questions, from the
  attributes its description row carries), in every rotation: about 31 prompts per image
  (`--every_attribute_images`, the first of the test images).

Each on two models, loaded through medift's loader:
- `embedded`: the committed tiny default (models/embedded-mllama);
- `reduced_real`: the REAL Llama-3.2-11B-Vision widths with random weights (bench/real_models.py),
  at a tenth of its depth in both towers (text 4 of 40 layers with the first real cross-attention
  layer; vision 3 + 1 global of 32 + 8, the real text:vision depth ratio), 4 tiles of
  `image_size` px (560 on a GPU; 224 by default on a CPU, where 560 px tiles take minutes).

Per (model, workload, scoring): seconds with encode_once off and on, measured in this run (the
median of `--repeats` runs of each, alternating), their ratio (off / on: above 1 is faster),
the images the vision model encoded, and the agreement of the two: the fraction of prompts
with the same parsed letter (must be 1.0), whether the generated texts are identical, and the
largest difference of the letter scores as predictions.csv saves them (4 decimals) relative to
the row's largest one.

    python bench/encode_once.py --out results/bench/encode_once.json     (or: snakemake results/bench/encode_once.json)
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_models  # noqa: E402  (bench/ is not a package)

WORKLOADS = ("plain", "circular", "every_attribute")
MODELS = ("embedded", "reduced_real")
EMBEDDED = "models/embedded-mllama"


@dataclass
class BenchConfig:
    images: int = field(default=4, metadata={"help": "Test images of the synthetic release (one question each)."})
    every_attribute_images: int = field(
        default=1, metadata={"help": "Images of the every_attribute workload (the first; ~31 prompts each)."}
    )
    models: str = field(default=",".join(MODELS), metadata={"help": f"Comma-separated, of {', '.join(MODELS)}."})
    workloads: str = field(default=",".join(WORKLOADS), metadata={"help": f"Comma-separated, of {WORKLOADS}."})
    scorings: str = field(default="letter,generate", metadata={"help": "Scoring modes timed (medift.evaluate)."})
    max_new_tokens: int = field(
        default=8, metadata={"help": "Generation budget (the paper: 50; the embedded model answers in 6 tokens)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Prompts per generate call (the evaluation's default)."})
    repeats: int = field(default=5, metadata={"help": "Timed runs of each way on the embedded model (median)."})
    reduced_real_repeats: int = field(default=1, metadata={"help": "Timed runs of each way on reduced_real."})
    image_size: int = field(default=0, metadata={"help": "reduced_real's tile side; 0: 560 on a GPU, 224 on a CPU."})
    text_layers: int = field(default=4, metadata={"help": "reduced_real's decoder layers (the real model: 40)."})
    vision_layers: int = field(default=3, metadata={"help": "reduced_real's local vision layers (the real: 32)."})
    global_layers: int = field(default=1, metadata={"help": "reduced_real's global vision layers (the real: 8)."})
    vocab_size: int = field(default=8192, metadata={"help": "reduced_real's vocabulary (the real: 128256)."})
    device: str = field(default="auto", metadata={"help": "auto (a GPU if torch sees one), cpu or cuda."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (the evaluation's default: 1)."})
    work_dir: str = field(default="resources/bench/encode_once", metadata={"help": "Release, shards, checkpoint."})
    out: str = field(default="results/bench/encode_once.json", metadata={"help": "JSON with the figures."})


def shards(work_dir: Path, images: int) -> Path:
    """A synthetic WBCAtt release of `images` test images, through the pipeline's prepare_shards (reused)."""
    from medift.datasets.synthetic import write_synthetic
    from medift.prepare import ShardsConfig, prepare_shards

    out = work_dir / f"wbcatt-{images}" / "shards"
    if not (out / "manifest.json").is_file():
        raw = out.parent / "raw"
        write_synthetic("wbcatt", raw, seed=5, n_train=2, n_val=2, n_test=images, image_size=64)
        prepare_shards(
            ShardsConfig(
                dataset="wbcatt", raw_dir=str(raw), out_dir=str(out), report=str(out.parent / "report.json"), seed=5
            )
        )
    return out


def every_attribute_questions(shard_dir: Path, images: int) -> pd.DataFrame:
    """The first `images` test images, each asked about each attribute it has (the questions' columns,
    from its description row)."""
    from medift.datasets import wbcatt
    from medift.shards import load_descriptions

    rows = []
    for d in load_descriptions(shard_dir, "test").head(images).itertuples():
        attributes = json.loads(d.attributes)
        for key, options in wbcatt.QUESTION_OPTIONS.items():
            if attributes.get(key) in options:
                rows.append(
                    {
                        "question_id": f"{d.image_id}:{key}",
                        "image_id": d.image_id,
                        "attribute": key,
                        "question": wbcatt.QUESTION_TEXT[key],
                        "options": list(options),
                        "answer_index": list(options).index(attributes[key]),
                        "image": d.image,
                    }
                )
    return pd.DataFrame(rows)


def reduced_real_checkpoint(config: BenchConfig, device: torch.device) -> tuple[Path, dict]:
    sizes = dict(
        text_layers=config.text_layers,
        vision_layers=config.vision_layers,
        global_layers=config.global_layers,
        vocab_size=config.vocab_size,
        image_size=config.image_size or (560 if device.type == "cuda" else 224),
    )
    directory = Path(config.work_dir) / ("mllama-" + "-".join(f"{k}{v}" for k, v in sizes.items()))
    marker = directory / ".built"
    if not marker.is_file():
        real_models.build_checkpoint(directory, device=device, **sizes)
        marker.write_text(json.dumps(sizes))
    return directory, sizes


class ImagesEncoded:
    """Images the vision model encodes (a forward pre-hook on it)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.base_model.vision_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.count += len(args[0] if args else kwargs["pixel_values"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_once(model, processor, questions, scoring, circular, encode_once, config, device) -> tuple:
    from medift.evaluate import score_questions, scoring_settings

    settings = scoring_settings(
        scoring=scoring,
        circular=circular,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        encode_once=encode_once,
    )
    counter = ImagesEncoded(model)
    synchronize(device)
    started = time.perf_counter()
    try:
        frame = score_questions(model, processor, questions, settings, progress=_Silent())
        synchronize(device)
    finally:
        counter.handle.remove()
    return frame, time.perf_counter() - started, counter.count


class _Silent:
    def update(self, n):
        pass


def largest_relative_difference(on: pd.Series, off: pd.Series) -> float | None:
    worst = None
    for a, b in zip(on, off):
        if not a:
            return None
        a, b = json.loads(a), json.loads(b)
        scale = max(abs(v) for v in b.values()) or 1.0
        difference = max(abs(a[k] - b[k]) for k in b) / scale
        worst = difference if worst is None else max(worst, difference)
    return worst


def bench_model(name, path, config, device, workloads, scorings, questions_of, repeats: int) -> dict:
    from medift.model.loading import load_base_model

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model, processor = load_base_model(str(path), dtype=dtype, device=device)
    model.eval()
    # Warm-up (kernels, allocator, the forced-prefix tokenization): a few prompts of each mode.
    first = questions_of("plain").head(2)
    for scoring in scorings:
        for encode_once in (False, True):
            evaluate_once(model, processor, first, scoring, False, encode_once, config, device)
    results = {}
    for workload in workloads:
        questions = questions_of(workload)
        circular = workload != "plain"
        for scoring in scorings:
            # The two ways alternate, so that a load that changes during the run weighs on both alike.
            times = {False: [], True: []}
            for _ in range(repeats):
                for encode_once in (False, True):
                    frame, seconds, encoded = evaluate_once(
                        model, processor, questions, scoring, circular, encode_once, config, device
                    )
                    times[encode_once].append(seconds)
                    if encode_once:
                        on, on_encoded = frame, encoded
                    else:
                        off, off_encoded = frame, encoded
            off_seconds, on_seconds = statistics.median(times[False]), statistics.median(times[True])
            row = {
                "questions": len(questions),
                "prompts": len(off),
                "images": int(questions["image_id"].nunique()),
                "seconds_encode_per_prompt": round(off_seconds, 3),
                "seconds_encode_once": round(on_seconds, 3),
                "seconds_all_runs": {"encode_per_prompt": times[False], "encode_once": times[True]},
                "speedup": round(off_seconds / on_seconds, 3),
                "images_encoded_per_prompt": off_encoded,
                "images_encoded_once": on_encoded,
                "agreement": float((on["parsed_letter"] == off["parsed_letter"]).mean()),
                "identical_outputs": bool((on["raw_output"] == off["raw_output"]).all()),
                "letter_score_max_relative_difference": largest_relative_difference(
                    on["letter_scores"], off["letter_scores"]
                ),
            }
            results[f"{workload}/{scoring}"] = row
            print(
                f"{name} {workload:<16} {scoring:<9} {row['prompts']:>4} prompts of {row['images']} images: "
                f"per prompt {row['seconds_encode_per_prompt']:.2f} s ({off_encoded} images encoded), once "
                f"{row['seconds_encode_once']:.2f} s ({on_encoded}): {row['speedup']:.2f}x; "
                f"agreement {row['agreement']:.3f}",
                flush=True,
            )
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    from medift.runtime import set_torch_threads
    from medift.shards import load_questions

    (config,) = HfArgumentParser(BenchConfig).parse_args_into_dataclasses(argv)
    set_torch_threads(config.threads)
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    workloads = [w for w in config.workloads.split(",") if w]
    models = [m for m in config.models.split(",") if m]
    scorings = [s for s in config.scorings.split(",") if s]
    unknown = sorted(set(workloads) - set(WORKLOADS)) + sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown workloads or models: {unknown}")
    work_dir = Path(config.work_dir)
    shard_dir = shards(work_dir, config.images)
    written = load_questions(shard_dir, "test")
    every = every_attribute_questions(shard_dir, config.every_attribute_images)

    def questions_of(workload: str) -> pd.DataFrame:
        return every if workload == "every_attribute" else written

    out = {
        "config": asdict(config),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "models": {},
    }
    for name in models:
        if name == "embedded":
            path, sizes = Path(EMBEDDED), {"checkpoint": EMBEDDED}
        else:
            path, sizes = reduced_real_checkpoint(config, device)
        started = time.perf_counter()
        repeats = config.repeats if name == "embedded" else config.reduced_real_repeats
        rows = bench_model(name, path, config, device, workloads, scorings, questions_of, repeats)
        out["models"][name] = {"sizes": sizes, "results": rows, "seconds": round(time.perf_counter() - started, 1)}
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(out, indent=1))  # after each model: a stopped run keeps its figures
    agreement = min(row["agreement"] for m in out["models"].values() for row in m["results"].values())
    print(f"lowest agreement: {agreement} (must be 1.0)")
    print(json.dumps(out, indent=1))
    return 0 if agreement == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
