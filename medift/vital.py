"""BioMed-VITAL-style data selection (the `vital_select` baseline): generate candidate
instructions, have a judge rate them, learn a selection model from the ratings and a few
clinician-style pairs, keep the best fraction, and instruction-tune on it.

Two jobs, each writing shards with a manifest (medift.shards):

`candidates` (python -m medift.vital candidates): for every training image, `rounds` passes of
template questions over its attributes (medift.instructions: multiple-choice, open, yes/no),
each answered twice: from the ground truth, and by the base model itself (sampled at
`temperature`, so the quality varies). The judge (medift.judge; offline by default) rates
every candidate 0-10; an unparsable judgement is kept with a null rating and counted.

`select` (python -m medift.vital select): the selection model scores (image, text) pairs from
the base model's own features, where the reference uses BiomedCLIP's: the image feature is
the pooled last hidden state of the image under the caption instruction, the text feature
that of the text "description / question / answer"; each is projected to 512 dimensions and
an MLP 1024-512-512-512-1 with a sigmoid scores them (medift.selection). It is trained with the
weighted pairwise hinge loss on pairs drawn from two different rating levels (weight 1) and on
"clinician" pairs, a ground-truth answer against the same answer corrupted (a wrong letter,
value or yes/no), weighted `clinician_weight`. A held-out tenth of both kinds of pairs
measures its agreement. Every candidate is then scored and the top `keep_fraction` kept, as
single-turn conversations for instruction tuning.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medift import mcq
from medift.chat import CAPTION_INSTRUCTION, encode_prompt
from medift.generation import JudgedSamplingConfig, pooled_hidden_states, sample_texts
from medift.images import decode_image
from medift.instructions import (
    FORMS_PATTERN,
    adapter_of,
    image_turns,
    judge_vocabulary,
    question_options,
    require_attributes,
)
from medift.judge import JudgeItem, make_judge
from medift.model.loading import load_base_model
from medift.runtime import set_torch_threads
from medift.selection import (
    keep_top,
    pairwise_agreement,
    rating_pairs,
    selection_scores,
    split_pairs,
    train_selection_model,
)
from medift.settings import DTYPES, check_fields
from medift.shards import (
    CANDIDATES,
    CONVERSATIONS,
    DESCRIPTIONS,
    ShardRows,
    write_generated_shards,
)

log = logging.getLogger(__name__)

GROUND_TRUTH, MODEL = "ground_truth", "model"
# Each setting's limits (the commands' check and the workflow schema's, generated: medift/settings.py).
INFERENCE_LIMITS = {"batch_size": {"minimum": 1}, "threads": {"minimum": 1}, "dtype": {"choices": DTYPES}}
CANDIDATE_LIMITS = {
    **INFERENCE_LIMITS,
    "forms": {"pattern": FORMS_PATTERN},
    "rounds": {"minimum": 1},
    "max_options": {"minimum": 2, "maximum": 26},
    "temperature": {"exclusive_minimum": 0},
    "top_p": {"exclusive_minimum": 0, "maximum": 1},
    "max_new_tokens": {"minimum": 1},
}
SELECT_LIMITS = {
    **INFERENCE_LIMITS,
    "keep_fraction": {"exclusive_minimum": 0, "maximum": 1},
    "clinician_pairs": {"minimum": 0},
    "clinician_weight": {"minimum": 0},
    "pairs_per_candidate": {"exclusive_minimum": 0},
    "lr": {"exclusive_minimum": 0},
    "epochs": {"minimum": 1},
    "pair_batch_size": {"minimum": 1},
}


@dataclass
class CandidateConfig(JudgedSamplingConfig):
    shards: str = field(metadata={"help": "The dataset's shard directory (train descriptions and attributes)."})
    base_model: str = field(metadata={"help": "The model whose sampled answers are candidates beside the truth."})
    out_dir: str = field(metadata={"help": "Directory of the candidate shards written."})
    seed: int = field(default=1, metadata={"help": "Seeds the questions and the model's samples."})
    forms: str = field(default="mcq,open,verify", metadata={"help": "Question phrasings (medift.instructions)."})
    rounds: int = field(default=2, metadata={"help": "Passes over each image's attributes (questions per attribute)."})
    max_options: int = field(default=4, metadata={"help": "Most options of a generated multiple-choice question."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the model's answers."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus of the model's answers."})
    max_new_tokens: int = field(default=24, metadata={"help": "Longest sampled answer, in tokens."})

    def __post_init__(self):
        check_fields(self, CANDIDATE_LIMITS)


@dataclass
class SelectConfig:
    shards: str = field(metadata={"help": "The dataset's shard directory (train descriptions)."})
    candidates: str = field(metadata={"help": "The candidate shards (python -m medift.vital candidates)."})
    base_model: str = field(metadata={"help": "The model whose features the selection model scores."})
    out_dir: str = field(metadata={"help": "Directory of the kept conversations written."})
    keep_fraction: float = field(default=0.4, metadata={"help": "Fraction of candidates kept (reference 0.1-0.9)."})
    clinician_pairs: int = field(default=50, metadata={"help": "Ground-truth vs corrupted pairs (reference 50)."})
    clinician_weight: float = field(default=100.0, metadata={"help": "Their weight in the loss (reference 1-400)."})
    pairs_per_candidate: float = field(default=2.0, metadata={"help": "Rating pairs drawn, per rated candidate."})
    lr: float = field(default=1e-5, metadata={"help": "Adam's lr (reference 1e-5)."})
    epochs: int = field(default=6, metadata={"help": "Epochs over the pairs (reference 6)."})
    pair_batch_size: int = field(default=64, metadata={"help": "Pairs per step (reference 64)."})
    seed: int = field(default=1, metadata={"help": "Seeds the pairs, the corruptions and the model."})
    batch_size: int = field(default=32, metadata={"help": "Rows per feature forward."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda."})
    threads: int = field(default=1, metadata={"help": "Torch threads."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Only for checkpoints that need it."})

    def __post_init__(self):
        check_fields(self, SELECT_LIMITS)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(path: str, dtype: str, device: str, trust_remote_code: bool):
    return load_base_model(path, trust_remote_code=trust_remote_code, dtype=dtype, device=resolve_device(device))


##### candidates #####


def candidate_rows(config: CandidateConfig, adapter, options: dict, model, processor, judge, counts: Counter):
    """Every training image's candidates, rated, row group by row group (shard order)."""
    rows = ShardRows(Path(config.shards), DESCRIPTIONS, "train", ("image_id", "image", "attributes"))
    progress = tqdm(total=len(rows), desc="candidates", unit="img", file=sys.stderr)
    for frame in rows.row_groups():
        asked = []  # (image_id, image bytes, attributes, turn)
        for image_id, image, attributes in zip(frame["image_id"], frame["image"], frame["attributes"]):
            attributes = json.loads(attributes)
            turns = image_turns(adapter, options, image_id, attributes, config)
            counts["images"] += 1
            counts["images_without_askable_attributes"] += not turns
            asked += [(image_id, image, attributes, turn) for turn in turns]
        decoded = {image_id: decode_image(image) for image_id, image in zip(frame["image_id"], frame["image"])}
        prompts = [encode_prompt(processor, turn.question, with_image=True) for *_, turn in asked]
        sampled = sample_texts(
            model,
            processor,
            prompts,
            [decoded[image_id] for image_id, *_ in asked],
            config.max_new_tokens,
            config.temperature,
            config.top_p,
            seed=config.seed + counts["images"],
            batch_size=config.batch_size,
        )
        for number, ((image_id, image, attributes, turn), model_answer) in enumerate(zip(asked, sampled)):
            for origin, answer in ((GROUND_TRUTH, turn.answer), (MODEL, model_answer)):
                item = JudgeItem(attributes, turn.question, answer, turn.options, turn.attribute)
                rating = judge.rate(item)
                counts["candidates"] += 1
                counts[f"candidates_{origin}"] += 1
                counts["unparsable_ratings"] += rating.score is None
                yield {
                    "candidate_id": f"{image_id}:{counts['candidates'] - 1}",
                    "image_id": image_id,
                    "split": "train",
                    "question": turn.question,
                    "answer": answer,
                    "form": turn.form,
                    "attribute": turn.attribute,
                    "options": list(turn.options),
                    "origin": origin,
                    "rating": rating.score,
                }
        progress.update(len(frame))
    progress.close()


def make_candidates(config: CandidateConfig) -> dict:
    set_torch_threads(config.threads)
    adapter = adapter_of(config.shards)
    require_attributes(adapter, "vital_select candidates")
    options = question_options(adapter, config.shards)  # read once: the judge's vocabulary and the questions'
    judge = make_judge(
        json.loads(config.judge),
        judge_vocabulary(adapter, options),
        Path(config.judge_cache or config.out_dir),
        adapter.QUESTION_TEXT,
    )
    model, processor = load_model(config.base_model, config.dtype, config.device, config.trust_remote_code)
    counts: Counter = Counter()

    def summary() -> dict:
        return {
            "method": "vital_select candidates",
            "dataset": adapter.NAME,
            "config": {k: v for k, v in asdict(config).items() if k not in ("shards", "out_dir", "judge_cache")},
            "judge": judge.describe(),
            "images": counts["images"],
            "images_without_askable_attributes": counts["images_without_askable_attributes"],
            "generated_rows": counts["candidates"],
            "by_origin": {origin: counts[f"candidates_{origin}"] for origin in (GROUND_TRUTH, MODEL)},
            "unparsable_ratings": counts["unparsable_ratings"],
            "judge_calls": judge.calls,
        }

    manifest = write_generated_shards(
        Path(config.out_dir),
        CANDIDATES,
        candidate_rows(config, adapter, options, model, processor, judge, counts),
        summary,
    )
    log.info("%d images -> %d candidates (%d judge calls)", counts["images"], counts["candidates"], judge.calls)
    return manifest


##### selection #####


def corrupted_answer(candidate: dict, rng: random.Random, options: dict) -> str | None:
    """The ground-truth answer made wrong: another letter, another value, the other yes/no."""
    form, answer = candidate["form"], candidate["answer"]
    if form == "mcq":
        options = list(candidate["options"])
        right = mcq.parse_answer_letter(answer, len(options))
        wrong = [i for i, letter in enumerate(mcq.option_letters(len(options))) if letter != right]
        return mcq.format_answer(rng.choice(wrong)) if wrong else None
    if form == "verify":
        return "No." if answer == "Yes." else "Yes."
    values = [v for v in options.get(candidate["attribute"], ()) if f"{v}." != answer]
    return f"{rng.choice(values)}." if values else None


def feature_text(description: str, question: str, answer: str) -> str:
    """The text the selection model reads: caption + question + answer (the reference's)."""
    return f"{description}\n{question}\n{answer}"


def selection_features(
    config: SelectConfig, candidates, corrupted, descriptions, train_images: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of every item (the candidates, then the corrupted answers) from the base model."""
    model, processor = load_model(config.base_model, config.dtype, config.device, config.trust_remote_code)
    image_ids = sorted(set(candidates["image_id"]))
    image_prompt = encode_prompt(processor, CAPTION_INSTRUCTION, with_image=True)
    # Decoded a batch at a time: the split's images are never all decoded at once.
    per_image = torch.cat(
        [
            pooled_hidden_states(
                model,
                processor,
                [image_prompt] * len(chunk),
                [decode_image(train_images[i]) for i in chunk],
                config.batch_size,
            )
            for chunk in (image_ids[k : k + config.batch_size] for k in range(0, len(image_ids), config.batch_size))
        ]
    )
    image_index = {image_id: n for n, image_id in enumerate(image_ids)}
    items = [(row["image_id"], row["question"], row["answer"]) for row in candidates.to_dict("records")] + [
        (candidates.loc[i, "image_id"], candidates.loc[i, "question"], answer) for i, answer in corrupted
    ]
    texts = [
        encode_prompt(processor, feature_text(descriptions[image_id], question, answer), with_image=False)
        for image_id, question, answer in items
    ]
    progress = tqdm(total=len(texts), desc="selection features", unit="text", file=sys.stderr)
    text_features = pooled_hidden_states(model, processor, texts, [None] * len(texts), config.batch_size, progress)
    progress.close()
    image_features = per_image[[image_index[image_id] for image_id, _, _ in items]]
    return image_features, text_features


def select(config: SelectConfig) -> dict:
    set_torch_threads(config.threads)
    torch.manual_seed(config.seed)
    adapter = adapter_of(config.shards)
    candidates = ShardRows(
        Path(config.candidates),
        CANDIDATES,
        "train",
        ["candidate_id", "image_id", "question", "answer", "form", "attribute", "options", "origin", "rating"],
    ).frame()
    if candidates.empty:
        raise ValueError(f"{config.candidates}: no candidates")
    # Each training image once (its description and its stored image), read in one pass.
    train = ShardRows(Path(config.shards), DESCRIPTIONS, "train", ("image_id", "description", "image")).frame()
    descriptions = dict(zip(train["image_id"], train["description"]))
    train_images = dict(zip(train["image_id"], train["image"]))
    options = question_options(adapter, config.shards)
    rng = random.Random(f"{config.seed}:clinician")
    truth = [i for i in candidates.index[candidates["origin"] == GROUND_TRUTH]]
    corrupted = []
    for i in rng.sample(truth, min(config.clinician_pairs, len(truth))):
        answer = corrupted_answer(candidates.loc[i].to_dict(), rng, options)
        if answer is not None:
            corrupted.append((i, answer))
    image_features, text_features = selection_features(config, candidates, corrupted, descriptions, train_images)

    ratings = [None if r is None or np.isnan(r) else float(r) for r in candidates["rating"]]
    rated = sum(r is not None for r in ratings)
    pairs = rating_pairs(ratings, int(config.pairs_per_candidate * rated), config.seed)
    clinician = [(i, len(candidates) + k) for k, (i, _) in enumerate(corrupted)]  # truth over its corruption
    train_pairs, held_out = split_pairs(pairs, 0.1, config.seed)
    train_clinician, held_out_clinician = split_pairs(clinician, 0.1, config.seed)
    model, history = train_selection_model(
        image_features,
        text_features,
        train_pairs,
        train_clinician,
        config.clinician_weight,
        lr=config.lr,
        epochs=config.epochs,
        batch_size=config.pair_batch_size,
        seed=config.seed,
    )
    n = len(candidates)
    scores = selection_scores(model, image_features[:n], text_features[:n]).tolist()
    kept = keep_top(scores, config.keep_fraction)
    kept_frame = candidates.loc[kept]

    def agreement(on):
        triples = [(pair[0], pair[1], pair[2] if len(pair) == 3 else 1) for pair in on]
        return None if not triples else round(pairwise_agreement(model, image_features, text_features, triples), 4)

    def summary() -> dict:
        kept_ratings = [ratings[i] for i in kept if ratings[i] is not None]
        return {
            "method": "vital_select selection",
            "dataset": adapter.NAME,
            "config": {k: v for k, v in asdict(config).items() if k not in ("shards", "candidates", "out_dir")},
            # The candidates' own manifest counts them and their judge calls (tables add manifests up).
            "images": int(candidates["image_id"].nunique()),
            "candidates": n,
            "kept_rows": len(kept),
            "rating_pairs": {"train": len(train_pairs), "held_out": len(held_out)},
            "clinician_pairs": {"train": len(train_clinician), "held_out": len(held_out_clinician)},
            "agreement": {
                "held_out_rating_pairs": agreement(held_out),
                "train_rating_pairs": agreement(train_pairs),
                "held_out_clinician_pairs": agreement(held_out_clinician),
                "clinician_pairs": agreement(clinician),
            },
            "epoch_losses": [round(loss, 6) for loss in history["epoch_loss"]],
            "mean_rating": {
                "all": round(float(np.mean([r for r in ratings if r is not None])), 3) if rated else None,
                "kept": round(float(np.mean(kept_ratings)), 3) if kept_ratings else None,
            },
            "kept_by_origin": {k: int(v) for k, v in kept_frame["origin"].value_counts().sort_index().items()},
        }

    rows = (
        {
            "image_id": row["image_id"],
            "split": "train",
            "image": train_images[row["image_id"]],
            "turns": json.dumps([[row["question"], row["answer"]]], ensure_ascii=False),
            "origin": f"{row['origin']}:{row['form']}",
        }
        for row in kept_frame.to_dict("records")
    )
    manifest = write_generated_shards(Path(config.out_dir), CONVERSATIONS, rows, summary)
    log.info(
        "kept %d of %d candidates; agreement on held-out rating pairs %s, on clinician pairs %s",
        len(kept),
        n,
        manifest["summary"]["agreement"]["held_out_rating_pairs"],
        manifest["summary"]["agreement"]["clinician_pairs"],
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"candidates": (CandidateConfig, make_candidates), "select": (SelectConfig, select)}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m medift.vital {{{','.join(commands)}}} [options]")
    config_class, run = commands[argv[0]]
    (config,) = HfArgumentParser(config_class).parse_args_into_dataclasses(argv[1:])
    run(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
