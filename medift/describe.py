"""Description accuracy: does the model say what is in the image?

Every test image is described by the model under the fixed caption instruction (the one
caption fine-tuning trains with; every method is asked the same way, so the numbers
compare), by greedy generation. Each attribute phrase of the image's reference description
(`adapter.phrases`: "large cell size", "oval nucleus shape", ...) counts as found when it
occurs in the generated text as a whole phrase (case-insensitive, whitespace-normalised,
not inside a longer word). This measures what the model knows of the domain, apart from
whether it can answer in the multiple-choice format.

The evaluation job (`python -m medift.evaluate --descriptions ...`) runs this with the model
it has loaded; `python -m medift.describe` runs it alone.

Outputs: a CSV with one row per image (its generated description and, per attribute,
found or not) and a JSON summary: overall accuracy over every (image, attribute) phrase
with its 95 % bootstrap interval, and the same per attribute.

`python -m medift.describe --help` lists the options.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm
from transformers import HfArgumentParser

from medift import metrics
from medift.chat import CAPTION_INSTRUCTION
from medift.datasets import get_dataset
from medift.generation import generate_answers
from medift.images import decode_image
from medift.model.loading import load_base_model
from medift.runtime import resolve_device, set_torch_threads
from medift.shards import DESCRIPTIONS, ShardRows, read_manifest
from medift.stats import bootstrap_mean_ci

log = logging.getLogger(__name__)


@dataclass
class DescribeConfig:
    model: str = field(metadata={"help": "Local Hugging Face checkpoint to ask."})
    shards: str = field(metadata={"help": "Shard directory of one dataset."})
    adapter: str = field(
        metadata={"help": "The dataset's adapter (wbcatt, cbis_ddsm, skincon): whose phrases are looked for."}
    )
    out: str = field(metadata={"help": "descriptions.csv to write (one row per image)."})
    summary: str = field(metadata={"help": "description_metrics.json to write."})
    split: str = field(default="test", metadata={"help": "Description split whose images are described."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation budget per description."})
    batch_size: int = field(default=32, metadata={"help": "Images per generate call (results do not depend on it)."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N."})
    dtype: str = field(default="float32", metadata={"help": "Weights' dtype: float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def phrase_found(phrase: str, text: str) -> bool:
    """`phrase` in `text` as whole words (both normalised)."""
    pattern = r"(?<![a-z0-9])" + re.escape(normalise(phrase)) + r"(?![a-z0-9])"
    return re.search(pattern, normalise(text)) is not None


def describe_split(model, processor, config: DescribeConfig) -> pd.DataFrame:
    """One row per image: image_id, generated, found (JSON attribute -> 0/1)."""
    options = read_manifest(Path(config.shards), verify=False)["config"].get("adapter_options")
    adapter = get_dataset(config.adapter, options if config.adapter == "captions" else None)
    reader = ShardRows(
        Path(config.shards), DESCRIPTIONS, config.split, ("image_id", "image", "attributes", "description")
    )
    if len(reader) == 0:
        raise ValueError(f"{config.shards}: no {config.split} descriptions")
    rows = []
    with tqdm(total=len(reader), desc="describe", unit="image", mininterval=5) as bar:
        for frame in reader.row_groups():
            images = [decode_image(data) for data in frame["image"]]
            generated = generate_answers(
                model,
                processor,
                [CAPTION_INSTRUCTION] * len(images),
                images,
                config.max_new_tokens,
                config.batch_size,
                bar,
            )
            for image_id, attributes, description, text in zip(
                frame["image_id"], frame["attributes"], frame["description"], generated
            ):
                phrases = adapter.phrases(json.loads(attributes))
                if phrases and ", ".join(phrases.values()) != description:
                    raise ValueError(
                        f"{config.shards}: image {image_id}: the stored description is not the adapter's phrases"
                    )
                found = {key: int(phrase_found(phrase, text)) for key, phrase in phrases.items()}
                rows.append({"image_id": image_id, "generated": text, "found": json.dumps(found, sort_keys=True)})
    return pd.DataFrame(rows, columns=["image_id", "generated", "found"])


def found_phrases(descriptions: pd.DataFrame) -> list[dict[str, int]]:
    """Per image, in order: attribute -> 1 if its phrase was said, else 0."""
    return [json.loads(f) for f in descriptions["found"]]


def summarize(descriptions: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict:
    """Description accuracy (`medift.metrics.description_accuracy`, percent here): the mean over
    images of the fraction of each image's phrases found (every image weighs the same; the
    95 % interval resamples images, whose phrases are not independent), and per attribute the
    same over that attribute's phrase alone (an image has at most one phrase each)."""
    found = found_phrases(descriptions)
    if metrics.description_accuracy(descriptions) is None:
        return {
            "images": len(descriptions),
            "phrases": 0,
            "description_accuracy": None,
            "reason": "the dataset's descriptions have no attribute phrases (free text)",
        }

    def interval(frame: pd.DataFrame) -> dict:
        scores = metrics.description_scores(frame).to_numpy()
        low, high = bootstrap_mean_ci(scores, n_boot=n_boot, seed=seed)
        return {
            "n": len(scores),
            "accuracy": metrics.summary_percent(metrics.description_accuracy(frame)),
            "ci_low": metrics.percent(low),
            "ci_high": metrics.percent(high),
        }

    def one_attribute(key: str) -> pd.DataFrame:
        return descriptions.assign(found=[json.dumps({key: f[key]} if key in f else {}) for f in found])

    keys = sorted({k for f in found for k in f})
    per_attribute = {key: interval(one_attribute(key)) for key in keys}
    overall = interval(descriptions)
    return {
        "images": len(descriptions),
        "phrases": sum(len(f) for f in found),
        "description_accuracy": overall["accuracy"],
        "ci_low": overall["ci_low"],
        "ci_high": overall["ci_high"],
        "per_attribute": per_attribute,
    }


def run(config: DescribeConfig) -> dict:
    set_torch_threads(config.threads)
    # Onto the device as the weights load: no whole copy in host memory first.
    model, processor = load_base_model(
        config.model,
        trust_remote_code=config.trust_remote_code,
        dtype=config.dtype,
        device=resolve_device(config.device),
    )
    return describe_with(model, processor, config)


def describe_with(model, processor, config: DescribeConfig) -> dict:
    """Describe the split with a loaded model (the evaluation job does this after its questions); write both outputs."""
    started = time.time()
    descriptions = describe_split(model, processor, config)
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    descriptions.to_csv(config.out, index=False)
    summary = {
        **summarize(descriptions),
        "split": config.split,
        "instruction": CAPTION_INSTRUCTION,
        "max_new_tokens": config.max_new_tokens,
        "seconds": round(time.time() - started, 1),
        "model": config.model,
    }
    Path(config.summary).write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(DescribeConfig).parse_args_into_dataclasses(argv)
    summary = run(config)
    log.info(
        "description accuracy %s%% over %d phrases of %d images",
        summary["description_accuracy"],
        summary["phrases"],
        summary["images"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
