"""Multiple-choice evaluation: the paper's generate-and-parse, or one-pass letter scoring.

Scoring modes (`--scoring`):
- `generate` (the paper's): greedy generation of up to `max_new_tokens`, then the letter
  after `The correct answer is` is parsed; an unparseable answer is wrong and counted;
- `letter`: the prompt is followed by the forced prefix `The correct answer is` and the
  prediction is the valid option letter with the highest next-token logit (one forward
  pass per question; no parse failure is possible).

With `--circular`, every question is also asked with its options rotated (all n
rotations); tables then count a question as right only if every rotation is.

With `--encode_once` (the default), the prompts are batched image by image and each image
is encoded once for all its questions and rotations (medift.image_encoding); the answers
are the same as with every prompt encoding its image.

Every asked prompt's options, raw output (or letter scores), parsed letter and
correctness are saved, so any number in a table can be audited back to the model.
`python -m medift.evaluate --help` lists the options.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm
from transformers import HfArgumentParser

from medift import engine as ds_engine
from medift import mcq, metrics
from medift.benchmarks import UNLABELLED
from medift.generation import best_letter, generate_answers, score_letters
from medift.images import decode_image
from medift.model.loading import load_base_model
from medift.runtime import resolve_device, set_torch_threads
from medift.settings import DEVICE_PATTERN, DTYPES, SCORING_MODES, SPLITS, check_fields
from medift.shards import BENCHMARK, QUESTIONS, ShardRows, read_manifest

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """One evaluation. Each field's default, help and limits are the only ones: the workflow's
    schema and config/README.md are generated from them (medift/settings.py)."""

    model: str = field(metadata={"help": "Local Hugging Face checkpoint to evaluate."})
    shards: str = field(metadata={"help": "Shard directory of one dataset."})
    out: str = field(metadata={"help": "predictions.csv to write (one row per asked prompt: question x rotation)."})
    summary: str = field(metadata={"help": "metrics.json to write (accuracy, parse failures, timing)."})
    split: str = field(default="test", metadata={"help": "Question split to evaluate: val or test."})
    scoring: str = field(
        default="generate",
        metadata={
            "help": (
                "generate: the paper's protocol, greedy generation, then the letter after `The correct answer is` is "
                "parsed (an unparseable answer is wrong and counted). letter: the prompt is followed by that forced "
                "prefix and the prediction is the valid option letter with the highest next-token logit, one "
                "forward pass "
                "per prompt (no parse failure possible; the letters' logits are saved in letter_scores)."
            )
        },
    )
    circular: bool = field(
        default=True,
        metadata={
            "help": (
                "Also ask every rotation of each question's options (n prompts for n options); a question counts for "
                "circular_accuracy only if all rotations are right. Plain accuracy is always on the question "
                "as written "
                "(rotation 0)."
            )
        },
    )
    max_new_tokens: int = field(
        default=50, metadata={"help": "Generation budget per answer (generate only; the paper: 50)."}
    )
    batch_size: int = field(
        default=32,
        metadata={
            "help": (
                "Prompts per forward or generate call; predictions do not depend on it (left padding, "
                "positions from the "
                "attention mask; tested per family)."
            )
        },
    )
    encode_once: bool = field(
        default=True,
        metadata={
            "help": (
                "Encode each image once for all the prompts about it (its questions and their rotations): the "
                "prompts are batched image by image and the image's vision encoding (Mllama's cross-attention "
                "states; the placeholder features of the families with image tokens in the sequence) is computed "
                "once and given to every prompt's own text. The answers are the same as with false (every prompt "
                "encodes its image); a family without the fact in medift/model/families.py runs as with false."
            )
        },
    )
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (the rule's `threads`)."})
    device: str = field(
        default="auto",
        metadata={
            "help": (
                "Where scoring runs: auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N (a "
                "named GPU "
                "that is absent is an error, not a silent CPU run; the workflow gives each evaluation job a "
                "card of its "
                "own and refuses cuda:N). metrics.json records the device."
            )
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": (
                "Weights' dtype while scoring: float32, bfloat16 (a real multi-billion-parameter checkpoint on a GPU; "
                "config/paper.yaml) or float16."
            )
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})
    descriptions: str = field(
        default="",
        metadata={
            "help": (
                "Also measure description accuracy (medift.describe) with the same model: descriptions.csv to write. "
                "Empty: not measured."
            )
        },
    )
    description_summary: str = field(
        default="", metadata={"help": "description_metrics.json to write (with --descriptions)."}
    )
    adapter: str = field(
        default="",
        metadata={
            "help": (
                "The dataset's adapter, whose attribute phrases description accuracy looks for (with --descriptions)."
            )
        },
    )
    describe_max_new_tokens: int = field(default=64, metadata={"help": "Generation budget per description."})
    describe_shards: str = field(
        default="",
        metadata={
            "help": (
                "Shard directory whose test images are described (with --descriptions); empty: --shards. A dataset "
                "evaluated on a benchmark (eval_from) describes its own test images."
            )
        },
    )
    unlabelled: str = field(
        default="",
        metadata={
            "help": (
                "CSV of the questions their release gives no answer for (benchmark shards), asked once and "
                "written, not scored; without such questions the file holds the header only."
            )
        },
    )

    def __post_init__(self):
        if self.descriptions and not (self.description_summary and self.adapter):
            raise ValueError("--descriptions needs --description_summary and --adapter")
        check_fields(self, EVALUATE_LIMITS)


def scoring_settings(**settings) -> EvaluateConfig:
    """Settings for questions scored in memory (`score_questions`: validation, benchmarks, tests):
    the files an evaluation job reads and writes are left empty unless given."""
    return EvaluateConfig(**{"model": "", "shards": "", "out": "", "summary": "", **settings})


# Each setting's limits (the CLI's check, check_fields, and the schema's, generated).
EVALUATE_LIMITS = {
    "split": {"choices": SPLITS},
    "scoring": {"choices": SCORING_MODES},
    "max_new_tokens": {"minimum": 1},
    "batch_size": {"minimum": 1},
    "threads": {"minimum": 1},
    "device": {"pattern": DEVICE_PATTERN},
    "dtype": {"choices": DTYPES},
    "describe_max_new_tokens": {"minimum": 1},
}


def asked_prompts(questions: pd.DataFrame, circular: bool) -> pd.DataFrame:
    """One row per prompt to ask: rotation 0 of every question, plus the others if circular."""
    rows = []
    for _, q in questions.iterrows():
        options = list(q["options"])
        for shift in range(len(options) if circular else 1):
            rotated, answer = mcq.rotate_options(options, int(q["answer_index"]), shift)
            rows.append(
                {
                    "question_id": q["question_id"],
                    "rotation": shift,
                    "image_id": q["image_id"],
                    "attribute": q["attribute"],
                    "question": q["question"],
                    "options": rotated,
                    "answer_index": answer,
                    "image": q["image"],
                }
            )
    return pd.DataFrame(rows)


def score_questions(model, processor, questions: pd.DataFrame, config: EvaluateConfig, progress=None) -> pd.DataFrame:
    """Ask every prompt in `config.scoring` mode; one output row per asked prompt.

    `progress` (a tqdm bar) advances by one per asked prompt; without it the call shows its own.
    """
    asked = asked_prompts(questions, config.circular)
    instructions = [mcq.build_mcq_instruction(q, opts) for q, opts in zip(asked["question"], asked["options"])]
    # Rotations of a question share its image: decode each image once (a question on several: each of them).
    decoded = {
        image_id: [decode_image(d) for d in data] if isinstance(data, list) else decode_image(data)
        for image_id, data in zip(asked["image_id"], asked["image"])
    }
    images = [decoded[image_id] for image_id in asked["image_id"]]
    n_options = [len(options) for options in asked["options"]]
    own_bar = progress is None
    bar = (
        tqdm(total=len(instructions), desc=f"evaluate ({config.scoring})", unit="q", mininterval=5)
        if own_bar
        else progress
    )
    if config.scoring == "generate":
        outputs = generate_answers(
            model,
            processor,
            instructions,
            images,
            config.max_new_tokens,
            config.batch_size,
            bar,
            encode_once=config.encode_once,
        )
        letters = [mcq.parse_answer_letter(output, n) for output, n in zip(outputs, n_options)]
        scores = [""] * len(outputs)
    else:
        letter_scores = score_letters(
            model, processor, instructions, images, n_options, config.batch_size, bar, encode_once=config.encode_once
        )
        letters = [best_letter(s) for s in letter_scores]
        outputs = [""] * len(letters)
        scores = [json.dumps({k: round(v, 4) for k, v in s.items()}) for s in letter_scores]
    if own_bar:
        bar.close()
    rows = []
    for (_, q), prompt, output, letter, score in zip(asked.iterrows(), instructions, outputs, letters, scores):
        answer = mcq.LETTERS[int(q["answer_index"])]
        rows.append(
            {
                "question_id": q["question_id"],
                "rotation": int(q["rotation"]),
                "image_id": q["image_id"],
                "attribute": q["attribute"],
                "question": q["question"],
                "options": json.dumps(list(q["options"])),
                "answer_index": int(q["answer_index"]),
                "answer_letter": answer,
                "prompt": prompt,
                "raw_output": output,
                "letter_scores": score,
                "parsed_letter": letter or "",
                "correct": int(letter == answer),
                "parse_failed": int(letter is None),
            }
        )
    return pd.DataFrame(rows)


def summarize(predictions: pd.DataFrame) -> dict:
    """metrics.json's metrics (`medift.metrics`, in percent there): accuracy on rotation 0 (the
    question as written), parse failures, format retention and, if asked, circular accuracy."""
    summary = {
        "n": metrics.answers(predictions),
        "accuracy": metrics.summary_percent(metrics.accuracy(predictions)),
        "parse_failures": metrics.parse_failures(predictions),
        "format_retention": metrics.summary_percent(metrics.format_retention(predictions)),
        "prompts_asked": len(predictions),
    }
    if metrics.is_circular(predictions):
        summary["circular_accuracy"] = metrics.summary_percent(metrics.circular_accuracy(predictions))
    return summary


QUESTION_COLUMNS = ("question_id", "image_id", "attribute", "question", "options", "answer_index", "image")
BENCHMARK_COLUMNS = (*QUESTION_COLUMNS, "images", "category", "l2_category")
SEVERAL_IMAGES = "question on several images: the family's processor takes one per row"


def is_benchmark(shards: str | Path) -> bool:
    """Whether a shard directory holds an evaluation-only benchmark (medift.benchmarks)."""
    return read_manifest(Path(shards), verify=False).get("kind") == BENCHMARK


def benchmark_parts(frame: pd.DataFrame, several_images: bool, refused: Counter) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A benchmark row group as (labelled, unlabelled) questions; a question on several images
    keeps them all in `image` where the family takes several, and is refused (counted) elsewhere."""
    several = frame["images"].map(len) > 1
    if several.any() and not several_images:
        refused[SEVERAL_IMAGES] += int(several.sum())
        frame = frame[~several]
    frame = frame.copy()
    frame["image"] = [
        list(images) if len(images) > 1 else image for image, images in zip(frame["image"], frame["images"])
    ]
    unlabelled = frame["answer_index"] == UNLABELLED
    return frame[~unlabelled], frame[unlabelled]


def unlabelled_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """Predictions of questions without an answer: what was asked and answered, nothing scored."""
    columns = ["question_id", "image_id", "attribute", "question", "options", "prompt", "raw_output", "letter_scores"]
    frame = predictions[columns + [c for c in ("category", "l2_category") if c in predictions]].copy()
    frame.insert(len(columns), "parsed_letter", predictions["parsed_letter"])
    return frame


def score_benchmark(model, processor, config: EvaluateConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Predictions of a benchmark's labelled questions, those of its unlabelled ones (asked once),
    and the questions refused by reason."""
    from medift.model.families import family_of

    shards = Path(config.shards)
    reader = ShardRows(shards, BENCHMARK, "test", BENCHMARK_COLUMNS)
    several_images = family_of(model.config).several_images
    refused: Counter = Counter()
    parts, unlabelled_parts = [], []
    plain = dataclasses.replace(config, circular=False)  # an unlabelled question is asked once
    share = (ds_engine.rank(), ds_engine.world_size())
    empty = pd.DataFrame()
    with tqdm(
        total=len(reader), desc=f"evaluate ({config.scoring})", unit="q", mininterval=5, disable=share[0] > 0
    ) as bar:
        for frame in reader.row_groups(share):
            labelled, unlabelled = benchmark_parts(frame, several_images, refused)
            for part, target, settings in ((labelled, parts, config), (unlabelled, unlabelled_parts, plain)):
                scored = score_questions(model, processor, part, settings) if len(part) else empty
                if len(part):
                    scored = scored.join(part.set_index("question_id")[["category", "l2_category"]], on="question_id")
                target.append(scored)  # one part per row group, empty or not: merged in order
            bar.update(len(frame))
    refused = sum((Counter(r) for r in ds_engine.gather_objects(dict(refused))), Counter())
    parts, unlabelled_parts = merged_in_order(parts), merged_in_order(unlabelled_parts)
    parts, unlabelled_parts = [parts] if len(parts) else [], [unlabelled_parts] if len(unlabelled_parts) else []
    if refused:
        log.warning("refused %d question(s): %s", sum(refused.values()), dict(refused))
    if not parts:
        raise ValueError(f"{config.shards}: no labelled question to score ({dict(refused) or 'all unlabelled'})")
    unlabelled = pd.concat(unlabelled_parts, ignore_index=True) if unlabelled_parts else None
    return (
        pd.concat(parts, ignore_index=True),
        unlabelled_predictions(unlabelled) if unlabelled is not None else pd.DataFrame(),
        dict(refused),
    )


def score_split(model, processor, config: EvaluateConfig) -> pd.DataFrame:
    """Predictions for every question of `config.split`, read and scored one shard row group at
    a time, so memory does not grow with the split (answers do not depend on batching)."""
    shards = Path(config.shards)
    reader = ShardRows(shards, QUESTIONS, config.split, QUESTION_COLUMNS)
    if len(reader) == 0:
        raise ValueError(f"{config.shards}: no {config.split} questions")
    # The prompt count for the progress bar: the options column alone is a cheap read.
    n_prompts = sum(
        len(options) if config.circular else 1
        for frame in ShardRows(shards, QUESTIONS, config.split, ["options"], verify=False).row_groups()
        for options in frame["options"]
    )
    share = (ds_engine.rank(), ds_engine.world_size())
    parts = []
    with tqdm(
        total=n_prompts, desc=f"evaluate ({config.scoring})", unit="q", mininterval=5, disable=share[0] > 0
    ) as bar:
        for frame in reader.row_groups(share):
            parts.append(score_questions(model, processor, frame, config, progress=bar))
    return merged_in_order(parts)


def merged_in_order(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Every rank's row groups' predictions, in the shards' order: rank r scored groups r, r + R,
    r + 2R, ... (ShardRows.row_groups' share), so group k is part k // R of rank k % R."""
    gathered = ds_engine.gather_objects(parts)
    ranks = len(gathered)
    ordered = [gathered[k % ranks][k // ranks] for k in range(sum(len(p) for p in gathered))]
    return pd.concat(ordered, ignore_index=True)


def join_evaluation_ranks() -> None:
    """Several ranks (a launcher's WORLD_SIZE > 1): one process group, each rank on its own card
    (LOCAL_RANK) when there are cards; the questions are shared out by row group."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def evaluate(config: EvaluateConfig) -> dict:
    set_torch_threads(config.threads)
    started = time.time()
    join_evaluation_ranks()
    # Straight onto the scoring device in its dtype: no full CPU copy of the model first.
    device = resolve_device(config.device)
    model, processor = load_base_model(
        config.model, trust_remote_code=config.trust_remote_code, dtype=config.dtype, device=device
    )
    if device.type == "cuda":
        # The workflow's jobs see only the card(s) medift.gpus gave them: cuda:0 is that card.
        log.info("scoring on %s (CUDA_VISIBLE_DEVICES=%s)", device, os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    scoring_started = time.time()
    extra = {}
    if is_benchmark(config.shards):
        predictions, unlabelled, refused = score_benchmark(model, processor, config)
        extra = {"unlabelled": len(unlabelled), "refused": refused}
    else:
        predictions = score_split(model, processor, config)
        unlabelled = unlabelled_predictions(predictions.iloc[:0])  # every question has its answer
    scoring_seconds = time.time() - scoring_started
    if ds_engine.rank() > 0:
        return {}  # every rank has every prediction: rank 0 writes the files and describes the images
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(config.out, index=False)
    if config.unlabelled:  # (the header only when every question has its answer: a workflow output)
        unlabelled.to_csv(config.unlabelled, index=False)
    summary = {
        **summarize(predictions),
        **extra,
        "scoring": config.scoring,
        "scoring_seconds": round(scoring_seconds, 2),
        "seconds": round(time.time() - started, 1),
        "split": config.split,
        "model": config.model,
        "device": str(model.device),
        "dtype": config.dtype,
        "ranks": ds_engine.world_size(),
    }
    Path(config.summary).write_text(json.dumps(summary, indent=1))
    if config.descriptions:
        from medift.describe import DescribeConfig, describe_with

        describe_with(
            model,
            processor,
            DescribeConfig(
                model=config.model,
                shards=config.describe_shards or config.shards,
                adapter=config.adapter,
                out=config.descriptions,
                summary=config.description_summary,
                split=config.split,
                max_new_tokens=config.describe_max_new_tokens,
                batch_size=config.batch_size,
                dtype=config.dtype,
            ),
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(EvaluateConfig).parse_args_into_dataclasses(argv)
    summary = evaluate(config)
    ds_engine.shutdown()  # the ranks leave together, once rank 0 has written and described
    if summary:
        log.info(
            "accuracy %.2f%% on %d questions, %d parse failures",
            summary["accuracy"],
            summary["n"],
            summary["parse_failures"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
