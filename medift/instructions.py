"""Instructions generated from the training images' structured attributes (the `inst_ft` baseline's
data, and the first stage of `st_dpo`): what curated instructions give, as a reference for IFT.

Every training image's askable attributes (those whose value is one of the key's options: the
adapter's `QUESTION_OPTIONS`, or the training split's values where the options come from the
data) become question/answer turns in three phrasings, answered from the ground
truth:
- `mcq`: the evaluation's multiple-choice prompt (medift.mcq) with the answer and up to
  `max_options - 1` distractors of the attribute's vocabulary in a random order, answered
  "The correct answer is X.";
- `open`: the adapter's question text, answered with the value ("big.");
- `verify`: "Is the <attribute> <value>?" for the true value or a distractor (even odds),
  answered "Yes." / "No." (not for attributes whose values are yes/no themselves).
An image's turns are grouped into conversations of at most `turns_per_conversation` turns; the
image goes with the first. Every draw is seeded by (seed, image id), so the rows do not depend
on the order images are read in. A dataset whose adapter has no structured attributes (free-
text reports only) cannot make them: that is an error, raised before any row is written.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medift import mcq
from medift.datasets import adapter_of_shards
from medift.settings import check_fields
from medift.shards import CONVERSATIONS, DESCRIPTIONS, ShardRows, write_generated_shards

log = logging.getLogger(__name__)

FORMS = ("mcq", "open", "verify")
FORMS_PATTERN = r"^(mcq|open|verify)(,(mcq|open|verify))*$"
# Each setting's limits (the command's check and the workflow schema's, generated: medift/settings.py).
INSTRUCTION_LIMITS = {
    "forms": {"pattern": FORMS_PATTERN},
    "rounds": {"minimum": 1},
    "turns_per_conversation": {"minimum": 1},
    "max_options": {"minimum": 2, "maximum": 26},
}
YES_NO = {"yes", "no", "uncertain"}


@dataclass
class InstructionConfig:
    shards: str = field(metadata={"help": "The dataset's shard directory (its train split's descriptions are read)."})
    out_dir: str = field(metadata={"help": "Directory of the conversation shards written."})
    seed: int = field(default=1, metadata={"help": "Seeds every draw (with the image id)."})
    forms: str = field(
        default="mcq,open,verify", metadata={"help": "Phrasings to use, comma-separated: mcq,open,verify."}
    )
    rounds: int = field(default=1, metadata={"help": "Passes over each image's attributes (each pass draws anew)."})
    turns_per_conversation: int = field(default=4, metadata={"help": "Most question/answer turns in one row."})
    max_options: int = field(default=4, metadata={"help": "Most options of a generated multiple-choice question."})

    def __post_init__(self):
        check_fields(self, INSTRUCTION_LIMITS)

    @property
    def form_list(self) -> list[str]:
        return [f.strip() for f in self.forms.split(",") if f.strip()]


def adapter_of(shards: str | Path):
    """The dataset adapter of a shard directory (its manifest names the dataset and its options)."""
    return adapter_of_shards(shards)


def require_attributes(adapter, what: str) -> None:
    """Generated instructions need structured attributes to ask about and answer from."""
    if not getattr(adapter, "ATTRIBUTES", None):
        raise ValueError(
            f"{what}: dataset {adapter.NAME!r} has no structured attributes to make instructions from "
            "(free-text reports only); give its release labels the adapter reads, or use ift/caption_ft"
        )


def question_options(adapter, shards: str | Path) -> dict[str, tuple[str, ...]]:
    """Attribute key -> the values a question on it may offer: the adapter's fixed options, or
    for datasets whose options are drawn from the data (SKINCON's combinations) the values its
    training split holds (read from the attributes column only)."""
    rows = ShardRows(Path(shards), DESCRIPTIONS, "train", ("attributes",))
    observed: dict[str, set[str]] = {}
    for frame in rows.row_groups():
        for attributes in frame["attributes"]:
            for key, value in json.loads(attributes).items():
                observed.setdefault(key, set()).add(value)
    options = {}
    for key in adapter.ATTRIBUTES:
        fixed = adapter.QUESTION_OPTIONS.get(key)
        found = tuple(sorted(v for v in observed.get(key, ()) if v.strip()))
        options[key] = tuple(fixed) if fixed else found
    return {key: values for key, values in options.items() if len(values) >= 2}


def judge_vocabulary(adapter, options: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Each attribute's values as the offline judge should know them: the adapter's vocabulary, or
    where it has none of its own (options drawn from the data) the question options."""
    return {key: tuple(values) or options.get(key, ()) for key, values in adapter.ATTRIBUTES.items()}


def askable(options: dict[str, tuple[str, ...]], attributes: dict[str, str]) -> list[str]:
    """Attribute keys of an image that a question can ask (value among the key's options), in vocabulary order."""
    return [k for k, values in options.items() if attributes.get(k) in values]


def spoken(key: str) -> str:
    return key.replace("_", " ")


def question_text(adapter, key: str) -> str:
    return adapter.QUESTION_TEXT.get(key) or f"What is the {spoken(key)}?"


def mcq_options(options: dict, key: str, value: str, rng: random.Random, max_options: int) -> tuple[list[str], int]:
    """The true value and up to max_options - 1 distractors of the key's options, in a random order."""
    distractors = [o for o in options[key] if o != value]
    options = [value] + rng.sample(distractors, min(len(distractors), max_options - 1))
    rng.shuffle(options)
    return options, options.index(value)


@dataclass(frozen=True)
class Turn:
    """One generated question about one attribute of an image, and its ground-truth answer."""

    question: str
    answer: str
    form: str  # mcq, open or verify
    attribute: str
    options: tuple[str, ...] = ()  # a multiple-choice question's options, in the order shown


def make_turn(adapter, options: dict, key: str, value: str, form: str, rng: random.Random, max_options: int) -> Turn:
    """One question about `key` in phrasing `form`, answered from the true `value`."""
    if form == "mcq":
        shown, answer = mcq_options(options, key, value, rng, max_options)
        question = mcq.build_mcq_instruction(question_text(adapter, key), shown)
        return Turn(question, mcq.format_answer(answer), form, key, tuple(shown))
    if form == "open":
        return Turn(question_text(adapter, key), f"{value}.", form, key)
    if form == "verify":
        distractors = [o for o in options[key] if o != value]
        truth = not distractors or rng.random() < 0.5
        shown = value if truth else rng.choice(distractors)
        return Turn(f"Is the {spoken(key)} {shown}?", "Yes." if truth else "No.", form, key)
    raise ValueError(f"unknown form {form!r}")


def image_turns(adapter, options: dict, image_id: str, attributes: dict[str, str], config) -> list[Turn]:
    """Every turn made for one image, in conversation order (`options`: question_options'; `config`:
    seed, forms, rounds, max_options)."""
    rng = random.Random(f"{config.seed}:instructions:{image_id}")
    forms = [f.strip() for f in config.forms.split(",") if f.strip()]
    turns = []
    for _ in range(config.rounds):
        keys = askable(options, attributes)
        rng.shuffle(keys)
        for key in keys:
            usable = [f for f in forms if not (f == "verify" and set(options[key]) <= YES_NO)]
            form = rng.choice(usable or ["open"])
            turns.append(make_turn(adapter, options, key, attributes[key], form, rng, config.max_options))
    return turns


def conversation_rows(adapter, config: InstructionConfig, counts: Counter):
    """Conversation rows of every training image, in shard order."""
    options = question_options(adapter, config.shards)
    rows = ShardRows(Path(config.shards), DESCRIPTIONS, "train", ("image_id", "image", "attributes"))
    for frame in tqdm(rows.row_groups(), total=len(rows.group_sizes()), desc="instructions", unit="group"):
        for image_id, image, attributes in zip(frame["image_id"], frame["image"], frame["attributes"]):
            counts["images"] += 1
            turns = image_turns(adapter, options, image_id, json.loads(attributes), config)
            if not turns:
                counts["images_without_askable_attributes"] += 1
                continue
            counts.update(f"turns_{turn.form}" for turn in turns)
            size = config.turns_per_conversation
            for start in range(0, len(turns), size):
                part = turns[start : start + size]
                counts["rows"] += 1
                yield {
                    "image_id": image_id,
                    "split": "train",
                    "image": image,
                    "turns": json.dumps([[turn.question, turn.answer] for turn in part], ensure_ascii=False),
                    "origin": "template:" + "+".join(sorted({turn.form for turn in part})),
                }


def make_instructions(config: InstructionConfig) -> dict:
    """Write the conversation shards of generated instructions; returns their manifest."""
    adapter = adapter_of(config.shards)
    require_attributes(adapter, "generated instructions")
    counts: Counter = Counter()

    def summary() -> dict:
        return {
            "method": "instructions",
            "dataset": adapter.NAME,
            "config": {k: v for k, v in vars(config).items() if k not in ("shards", "out_dir")},
            "images": counts["images"],
            "images_without_askable_attributes": counts["images_without_askable_attributes"],
            "generated_rows": counts["rows"],
            "kept_rows": counts["rows"],
            "turns": {form: counts[f"turns_{form}"] for form in FORMS},
            "judge_calls": 0,
        }

    manifest = write_generated_shards(
        Path(config.out_dir), CONVERSATIONS, conversation_rows(adapter, config, counts), summary
    )
    summary = manifest["summary"]
    log.info(
        "%d images -> %d conversation rows (%s turns)", summary["images"], summary["generated_rows"], summary["turns"]
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(InstructionConfig).parse_args_into_dataclasses(argv)
    make_instructions(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
