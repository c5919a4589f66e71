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

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm
from transformers import HfArgumentParser

from medift import mcq, metrics
from medift.generation import best_letter, generate_answers, score_letters
from medift.images import decode_image
from medift.model.loading import load_base_model
from medift.runtime import resolve_device, set_torch_threads
from medift.settings import DEVICE_PATTERN, DTYPES, SCORING_MODES, SPLITS, check_fields
from medift.shards import QUESTIONS, ShardRows

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

    def __post_init__(self):
        if self.descriptions and not (self.description_summary and self.adapter):
            raise ValueError("--descriptions needs --description_summary and --adapter")
        check_fields(self, EVALUATE_LIMITS)


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
    # Rotations of a question share its image: decode each image once.
    decoded = {image_id: decode_image(data) for image_id, data in zip(asked["image_id"], asked["image"])}
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
    parts = []
    with tqdm(total=n_prompts, desc=f"evaluate ({config.scoring})", unit="q", mininterval=5) as bar:
        for frame in reader.row_groups():
            parts.append(score_questions(model, processor, frame, config, progress=bar))
    return pd.concat(parts, ignore_index=True)


def evaluate(config: EvaluateConfig) -> dict:
    set_torch_threads(config.threads)
    started = time.time()
    # Straight onto the scoring device in its dtype: no full CPU copy of the model first.
    device = resolve_device(config.device)
    model, processor = load_base_model(
        config.model, trust_remote_code=config.trust_remote_code, dtype=config.dtype, device=device
    )
    if device.type == "cuda":
        # The workflow's jobs see only the card(s) medift.gpus gave them: cuda:0 is that card.
        log.info("scoring on %s (CUDA_VISIBLE_DEVICES=%s)", device, os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    scoring_started = time.time()
    predictions = score_split(model, processor, config)
    scoring_seconds = time.time() - scoring_started
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(config.out, index=False)
    summary = {
        **summarize(predictions),
        "scoring": config.scoring,
        "scoring_seconds": round(scoring_seconds, 2),
        "seconds": round(time.time() - started, 1),
        "split": config.split,
        "model": config.model,
        "device": str(model.device),
        "dtype": config.dtype,
    }
    Path(config.summary).write_text(json.dumps(summary, indent=1))
    if config.descriptions:
        from medift.describe import DescribeConfig, describe_with

        describe_with(
            model,
            processor,
            DescribeConfig(
                model=config.model,
                shards=config.shards,
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
    log.info(
        "accuracy %.2f%% on %d questions, %d parse failures",
        summary["accuracy"],
        summary["n"],
        summary["parse_failures"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
