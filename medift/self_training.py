"""STLLaVA-Med-style self-training (the `st_dpo` baseline): the preference pairs of its second stage.

The first stage is instruction tuning on generated conversations with `question_loss` 0.5
(medift.train: a non-first question is kept in the loss with probability 0.5, so the model
learns to ask about an image). Here the stage-1 model, on every training image:
1. describes it (greedy, under the caption instruction);
2. asks `questions_per_image` questions about it: the conversation so far is rendered up to the
   start of a new user turn and the model writes that turn (sampled at `temperature`, nucleus
   `top_p`), cut after its first "?";
3. answers each question twice (sampled alike);
4. the judge (medift.judge; offline by default) scores both answers against the image's
   attributes: the higher is chosen, the other rejected; a tie or an unparsable judgement is
   counted and dropped, as is an empty question;
5. the stage-1 model's summed log-probabilities of the chosen and the rejected answer are
   stored with the pair: DPO's frozen reference (medift.train trains against them, holding one
   model instead of two).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medift.chat import (
    CAPTION_INSTRUCTION,
    IGNORE_INDEX,
    Encoded,
    assistant_message,
    encode_conversation,
    encode_prompt,
    model_inputs,
    render,
    tokenize_text,
    user_message,
)
from medift.generation import JudgedSamplingConfig, generate_answers, sample_texts, to_model
from medift.images import decode_image
from medift.instructions import adapter_of, judge_vocabulary, question_options, require_attributes
from medift.judge import JudgeItem, make_judge
from medift.objectives import sequence_log_probs
from medift.runtime import set_torch_threads
from medift.settings import check_fields
from medift.shards import DESCRIPTIONS, PREFERENCES, ShardRows, write_generated_shards
from medift.vital import INFERENCE_LIMITS, load_model

log = logging.getLogger(__name__)

# Each setting's limits (the command's check and the workflow schema's, generated: medift/settings.py).
PREFERENCE_LIMITS = {
    **INFERENCE_LIMITS,
    "questions_per_image": {"minimum": 1},
    "temperature": {"exclusive_minimum": 0},
    "top_p": {"exclusive_minimum": 0, "maximum": 1},
    "describe_max_new_tokens": {"minimum": 1},
    "question_max_new_tokens": {"minimum": 1},
    "answer_max_new_tokens": {"minimum": 1},
}
_SENTINEL = "\u2063MEDIFT-QUESTION\u2063"


@dataclass
class PreferenceConfig(JudgedSamplingConfig):
    shards: str = field(metadata={"help": "The dataset's shard directory (train images and attributes)."})
    model: str = field(metadata={"help": "The stage-1 model: it asks, answers, and is DPO's reference."})
    out_dir: str = field(metadata={"help": "Directory of the preference shards written."})
    seed: int = field(default=1, metadata={"help": "Seeds the sampled questions and answers."})
    questions_per_image: int = field(default=1, metadata={"help": "Questions the model asks about each image."})
    temperature: float = field(default=1.2, metadata={"help": "Sampling temperature (reference 1.2)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus of the samples (reference 0.95)."})
    describe_max_new_tokens: int = field(default=32, metadata={"help": "Longest description, in tokens."})
    question_max_new_tokens: int = field(default=24, metadata={"help": "Longest question, in tokens."})
    answer_max_new_tokens: int = field(default=24, metadata={"help": "Longest answer, in tokens."})

    def __post_init__(self):
        check_fields(self, PREFERENCE_LIMITS)


def next_question_prompt(processor, description: str) -> Encoded:
    """The conversation "describe this scan" / the model's description, rendered up to where the
    next user turn's text begins (any chat template: the text before a sentinel user message)."""
    messages = [user_message(CAPTION_INSTRUCTION, True), assistant_message(description), user_message(_SENTINEL, False)]
    text = render(processor, messages, False)
    text = text[: text.index(_SENTINEL)]
    ids = tokenize_text(processor, text)
    return Encoded(ids, [IGNORE_INDEX] * len(ids), True, text)


def clean_question(text: str) -> str:
    """The model's question: its text up to the first "?" (a user turn may run on into a reply)."""
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    return text[: text.index("?") + 1] if "?" in text else text


@torch.no_grad()
def reference_log_probs(
    model, processor, pairs: list[dict], images: dict, batch_size: int
) -> list[tuple[float, float]]:
    """The model's summed log-probabilities of each pair's chosen and rejected answer, through the
    same builder and function as training's DPO objective (medift.train.PreferenceSamples)."""
    values: list[tuple[float, float]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [encode_conversation(processor, [p["question"]], [p["chosen"]], True) for p in chunk]
        rows += [encode_conversation(processor, [p["question"]], [p["rejected"]], True) for p in chunk]
        pictures = [images[p["image_id"]] for p in chunk] * 2
        batch = to_model(model, model_inputs(processor, rows, pictures, padding_side="right"))
        log_probs = sequence_log_probs(model, batch).double().tolist()
        n = len(chunk)
        values += list(zip(log_probs[:n], log_probs[n:]))
    return values


def preference_rows(config: PreferenceConfig, adapter, model, processor, judge, counts: Counter):
    rows = ShardRows(Path(config.shards), DESCRIPTIONS, "train", ("image_id", "image", "attributes"))
    progress = tqdm(total=len(rows), desc="preferences", unit="img", file=sys.stderr)
    for group, frame in enumerate(rows.row_groups()):
        ids = list(frame["image_id"])
        images = {image_id: decode_image(image) for image_id, image in zip(ids, frame["image"])}
        raw = dict(zip(ids, frame["image"]))
        attributes = {image_id: json.loads(a) for image_id, a in zip(ids, frame["attributes"])}
        counts["images"] += len(ids)
        seed = config.seed * 1000 + group
        described = generate_answers(
            model,
            processor,
            [CAPTION_INSTRUCTION] * len(ids),
            [images[i] for i in ids],
            config.describe_max_new_tokens,
            config.batch_size,
        )
        asking = [i for i in ids for _ in range(config.questions_per_image)]
        prompts = [next_question_prompt(processor, d) for d in described for _ in range(config.questions_per_image)]
        questions = sample_texts(
            model,
            processor,
            prompts,
            [images[i] for i in asking],
            config.question_max_new_tokens,
            config.temperature,
            config.top_p,
            seed,
            config.batch_size,
        )
        asked = [(i, clean_question(q)) for i, q in zip(asking, questions)]
        counts["questions"] += len(asked)
        counts["empty_questions"] += sum(not q for _, q in asked)
        asked = [(i, q) for i, q in asked if q]
        answer_prompts = [encode_prompt(processor, q, with_image=True) for _, q in asked for _ in range(2)]
        answers = sample_texts(
            model,
            processor,
            answer_prompts,
            [images[i] for i, _ in asked for _ in range(2)],
            config.answer_max_new_tokens,
            config.temperature,
            config.top_p,
            seed + 500,
            config.batch_size,
        )
        pairs = []
        for k, (image_id, question) in enumerate(asked):
            first, second = answers[2 * k], answers[2 * k + 1]
            verdict = judge.compare(JudgeItem(attributes[image_id], question, ""), first, second)
            if verdict.winner is None:
                counts["unparsable_judgements"] += 1
                continue
            if verdict.winner == "tie":
                counts["ties"] += 1
                continue
            chosen, rejected = (first, second) if verdict.winner == "a" else (second, first)
            scores = verdict.scores if verdict.winner == "a" else verdict.scores[::-1]
            pairs.append(
                {
                    "image_id": image_id,
                    "question": question,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_score": float(scores[0]),
                    "rejected_score": float(scores[1]),
                }
            )
        for pair, (ref_c, ref_r) in zip(pairs, reference_log_probs(model, processor, pairs, images, config.batch_size)):
            counts["pairs"] += 1
            yield {
                **pair,
                "split": "train",
                "image": raw[pair["image_id"]],
                "reference_chosen": ref_c,
                "reference_rejected": ref_r,
            }
        progress.update(len(ids))
    progress.close()


def make_preferences(config: PreferenceConfig) -> dict:
    set_torch_threads(config.threads)
    adapter = adapter_of(config.shards)
    require_attributes(adapter, "st_dpo preference pairs")
    judge = make_judge(
        json.loads(config.judge),
        judge_vocabulary(adapter, question_options(adapter, config.shards)),
        Path(config.judge_cache or config.out_dir),
        adapter.QUESTION_TEXT,
    )
    model, processor = load_model(config.model, config.dtype, config.device, config.trust_remote_code)
    counts: Counter = Counter()

    def summary() -> dict:
        return {
            "method": "st_dpo preferences",
            "dataset": adapter.NAME,
            "config": {
                k: v for k, v in asdict(config).items() if k not in ("shards", "out_dir", "judge_cache", "model")
            },
            "judge": judge.describe(),
            "images": counts["images"],
            "questions": counts["questions"],
            "dropped": {
                "empty_question": counts["empty_questions"],
                "tie": counts["ties"],
                "unparsable_judgement": counts["unparsable_judgements"],
            },
            "generated_rows": counts["questions"],
            "kept_rows": counts["pairs"],
            "judge_calls": judge.calls,
        }

    manifest = write_generated_shards(
        Path(config.out_dir), PREFERENCES, preference_rows(config, adapter, model, processor, judge, counts), summary
    )
    s = manifest["summary"]
    log.info(
        "%d questions on %d images -> %d pairs (dropped: %s)", s["questions"], s["images"], s["kept_rows"], s["dropped"]
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(PreferenceConfig).parse_args_into_dataclasses(argv)
    make_preferences(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
