"""Multiple-choice evaluation as the paper does it: generate, parse the letter, score.

Every question's prompt, options, raw output, parsed letter and correctness are saved,
so any number in a table can be audited back to the model's words.
`python -m medift.evaluate --help` lists the options.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm
from transformers import HfArgumentParser

from medift.runtime import set_torch_threads
from medift import mcq
from medift.generation import generate_answers
from medift.images import decode_image
from medift.model.loading import load_base_model
from medift.shards import load_questions

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    model: str = field(metadata={"help": "Local Hugging Face checkpoint to evaluate."})
    shards: str = field(metadata={"help": "Shard directory of one dataset."})
    out: str = field(metadata={"help": "predictions.csv to write (one row per question)."})
    summary: str = field(metadata={"help": "metrics.json to write (accuracy, parse failures, timing)."})
    split: str = field(default="test", metadata={"help": "Question split to evaluate (val or test)."})
    max_new_tokens: int = field(default=50, metadata={"help": "Generation budget per answer (the paper: 50)."})
    batch_size: int = field(default=32, metadata={"help": "Questions per generate call."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (the rule's `threads`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})


def score_questions(model, processor, questions: pd.DataFrame, config: EvaluateConfig) -> pd.DataFrame:
    instructions = [mcq.build_mcq_instruction(q, opts) for q, opts in zip(questions["question"], questions["options"])]
    images = [decode_image(data) for data in questions["image"]]
    with tqdm(total=len(instructions), desc="evaluate", unit="q", mininterval=5) as bar:
        outputs = generate_answers(model, processor, instructions, images, config.max_new_tokens, config.batch_size, bar)
    rows = []
    for (_, q), prompt, output in zip(questions.iterrows(), instructions, outputs):
        letter = mcq.parse_answer_letter(output, len(q["options"]))
        answer = mcq.LETTERS[int(q["answer_index"])]
        rows.append({
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "attribute": q["attribute"],
            "question": q["question"],
            "options": json.dumps(list(q["options"])),
            "answer_index": int(q["answer_index"]),
            "answer_letter": answer,
            "prompt": prompt,
            "raw_output": output,
            "parsed_letter": letter or "",
            "correct": int(letter == answer),
            "parse_failed": int(letter is None),
        })
    return pd.DataFrame(rows)


def evaluate(config: EvaluateConfig) -> dict:
    set_torch_threads(config.threads)
    started = time.time()
    model, processor = load_base_model(config.model, trust_remote_code=config.trust_remote_code)
    questions = load_questions(Path(config.shards), config.split)
    if questions.empty:
        raise ValueError(f"{config.shards}: no {config.split} questions")
    predictions = score_questions(model, processor, questions, config)
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(config.out, index=False)
    summary = {
        "n": len(predictions),
        "accuracy": round(100 * predictions["correct"].mean(), 2),
        "parse_failures": int(predictions["parse_failed"].sum()),
        "format_retention": round(100 * (1 - predictions["parse_failed"].mean()), 2),
        "seconds": round(time.time() - started, 1),
        "split": config.split,
        "model": config.model,
    }
    Path(config.summary).write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(EvaluateConfig).parse_args_into_dataclasses(argv)
    summary = evaluate(config)
    log.info("accuracy %.2f%% on %d questions, %d parse failures", summary["accuracy"], summary["n"], summary["parse_failures"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
