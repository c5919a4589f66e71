"""Where a saved embedded base model fails: reading the image, binding a letter, or the bridge.

Prints one JSON object with three probes, each on held-out data from its own seed:
- `open_questions`: `What is the <attribute>?` with no options about 200 general images,
  the generated value against the drawn one, per attribute (reading the image; only
  meaningful for models trained with `--value_turn_fraction` > 0, the answer format);
- `mcq`: the 300 held-out multiple-choice questions of `results/base_model.json`, per
  attribute and option format (fixed order, shuffled);
- `text_binding`: teacher-forced letter accuracy on 200 text binding conversations with up
  to 5 shuffled options, the value stated before each question (one hop) or the whole
  description once (two hops), general and medical vocabularies.
A model that reads a value in open questions and binds letters in text, yet fails the
multiple-choice question on the same attribute, fails at the bridge between the two.

    HF_HUB_OFFLINE=1 python bench/base_model_probe.py MODEL_DIR
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

from medift.generation import forced_answer_context, generate_answers
from medift.model import general
from medift.model.loading import load_base_model
from medift.model.pretrain import (
    ConversationSampler,
    PretrainConfig,
    answer_held_out,
    held_out_questions,
    letter_accuracy,
)


def rate(hits: list[bool]) -> dict:
    return {"n": len(hits), "accuracy": round(sum(hits) / len(hits), 3)}


def open_questions(model, processor, size: int, n: int) -> dict:
    rng = random.Random("value-probe")
    items = []
    for _ in range(n):
        attributes = general.sample_attributes(rng)
        image = general.render(attributes, rng, size)
        key = rng.choice(list(general.ATTRIBUTES))
        items.append((key, attributes[key], image))
    outputs = generate_answers(
        model, processor, [general.QUESTION_TEXT[k] for k, _, _ in items], [i for _, _, i in items], max_new_tokens=6
    )
    hits: dict[str, list[bool]] = defaultdict(list)
    for (key, value, _), output in zip(items, outputs):
        hits[key].append(output.strip().rstrip(".").strip() == value)
    return {key: rate(h) for key, h in sorted(hits.items())}


def mcq_by_attribute(model, processor, size: int, seed: int) -> dict:
    items = held_out_questions(300, seed, size)
    _, correct = answer_held_out(model, processor, items, max_new_tokens=8)
    hits: dict[str, list[bool]] = defaultdict(list)
    for right, (instruction, _, _, _, fixed) in zip(correct, items):
        key = next(k for k, question in general.QUESTION_TEXT.items() if instruction.startswith(question))
        hits[f"{key}, {'fixed' if fixed else 'shuffled'}"].append(right)
    return {key: rate(h) for key, h in sorted(hits.items())}


def text_binding(model, processor, size: int) -> dict:
    letters = set(forced_answer_context(processor)[1].values())
    result = {}
    for hops in (1, 2):
        for name, medical in (("general", 0.0), ("medical", 1.0)):
            config = PretrainConfig(binding_hops=hops, binding_batch_size=200, medical_text_fraction=medical)
            sampler = ConversationSampler(processor, config, random.Random(f"binding-probe-{hops}"), size)
            result[f"{hops} hop{'s' if hops > 1 else ''}, {name}"] = letter_accuracy(model, sampler.binding_batch(5), letters)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--n", type=int, default=200, help="open questions")
    parser.add_argument("--seed", type=int, default=1, help="seed of the held-out multiple-choice questions")
    args = parser.parse_args()
    model, processor = load_base_model(args.model_dir)
    size = model.config.vision_config.image_size
    print(json.dumps({
        "open_questions": open_questions(model, processor, size, args.n),
        "mcq": mcq_by_attribute(model, processor, size, args.seed),
        "text_binding": text_binding(model, processor, size),
    }, indent=1))


if __name__ == "__main__":
    main()
