"""Benchmark: letter scoring against the paper's generate-and-parse, on the same questions.

For each dataset's shards, the base model answers every test question (as written) three
ways, timed in the same process:
- `generate`: greedy generation (up to 50 new tokens, stopping at end of sequence), letter parsed;
- `generate_full`: the same with the end of sequence suppressed, i.e. the cost of the paper's
  50-token budget for a model that explains its answer instead of stopping after the letter;
- `letter`: one forward pass with `The correct answer is` forced; argmax over the valid letters.

Prints and writes (JSON) the agreement of `letter` with `generate` on the questions where
`generate` parsed, and the speed ratios generate/letter and generate_full/letter.

    python bench/scoring.py --model models/embedded-base --shards resources/shards/wbcatt \
        resources/shards/cbis_ddsm --out results/bench/scoring.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medift import mcq
from medift.generation import best_letter, generate_answers, score_letters
from medift.images import decode_image
from medift.model.loading import load_base_model
from medift.runtime import set_torch_threads
from medift.shards import load_questions


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def bench_dataset(model, processor, shards: Path, split: str, batch_size: int, max_new_tokens: int) -> dict:
    questions = load_questions(shards, split)
    instructions = [mcq.build_mcq_instruction(q, o) for q, o in zip(questions["question"], questions["options"])]
    images = [decode_image(data) for data in questions["image"]]
    n_options = [len(o) for o in questions["options"]]
    answers = [mcq.LETTERS[int(i)] for i in questions["answer_index"]]

    outputs, generate_s = timed(generate_answers, model, processor, instructions, images, max_new_tokens, batch_size)
    _, generate_full_s = timed(
        generate_answers,
        model,
        processor,
        instructions,
        images,
        max_new_tokens,
        batch_size,
        min_new_tokens=max_new_tokens,
    )
    scores, letter_s = timed(score_letters, model, processor, instructions, images, n_options, batch_size)

    generated = [mcq.parse_answer_letter(o, n) for o, n in zip(outputs, n_options)]
    scored = [best_letter(s) for s in scores]
    parsed = [i for i, letter in enumerate(generated) if letter is not None]
    agreeing = sum(generated[i] == scored[i] for i in parsed)
    return {
        "questions": len(instructions),
        "generate_parsed": len(parsed),
        "agreement": round(100 * agreeing / len(parsed), 2) if parsed else None,
        "accuracy_generate": round(100 * sum(g == a for g, a in zip(generated, answers)) / len(answers), 2),
        "accuracy_letter": round(100 * sum(s == a for s, a in zip(scored, answers)) / len(answers), 2),
        "seconds_generate": round(generate_s, 3),
        "seconds_generate_full": round(generate_full_s, 3),
        "seconds_letter": round(letter_s, 3),
        "speedup": round(generate_s / letter_s, 2),
        "speedup_full_budget": round(generate_full_s / letter_s, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model checkpoint directory")
    parser.add_argument("--shards", nargs="+", required=True, help="shard directories, one per dataset")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    model, processor = load_base_model(args.model)
    results = {}
    for shards in map(Path, args.shards):
        results[shards.name] = row = bench_dataset(
            model, processor, shards, args.split, args.batch_size, args.max_new_tokens
        )
        print(
            f"{shards.name}: {row['questions']} questions; letter agrees with generate on "
            f"{row['agreement']}% of the {row['generate_parsed']} parsed; generate {row['seconds_generate']} s, "
            f"50-token generate {row['seconds_generate_full']} s, letter {row['seconds_letter']} s: "
            f"{row['speedup']}x ({row['speedup_full_budget']}x against the full budget)",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "threads": args.threads, "datasets": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
