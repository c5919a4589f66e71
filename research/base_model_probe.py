"""Where a saved embedded base model fails: reading the image, binding a letter, or the bridge.

Prints one JSON object with three probes, each on held-out data from its own seed:
- `open_questions`: `What is the <attribute>?` with no options about 200 general images,
  the generated value against the drawn one, per attribute (reading the image; only
  meaningful for models trained with `--value_turn_fraction` > 0, the answer format);
- `mcq`: the 300 held-out multiple-choice questions of `results/base_model.json`, per
  attribute and option format (fixed order, shuffled);
- `two_options`: every attribute asked with two options, the drawn value and one other, in
  random order, about 200 general images: binding in its easiest image form, with the
  accuracy when the answer is A and when it is B (a model that always says A gets 1 / 0);
- `size_by_layer`: how well the drawn size can be read, by a linear probe fitted on 768 and
  tested on 256 images, from the decoder's hidden state at the last prompt token after each
  layer (0: the embeddings), for the open question and for the two-option multiple-choice
  question: where in the depth the image's value reaches the token that must answer;
- `text_binding`: teacher-forced letter accuracy on 200 text binding conversations with up
  to 5 shuffled options, the value stated before each question (one hop) or the whole
  description once (two hops), general and medical vocabularies.
A model that reads a value in open questions and binds letters in text, yet fails the
multiple-choice question on the same attribute, fails at the bridge between the two.

    HF_HUB_OFFLINE=1 python research/base_model_probe.py MODEL_DIR
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch
import torch.nn.functional as F

from medift import mcq
from medift.chat import encode_prompt, model_inputs
from medift.embedded import general
from medift.embedded.pretrain import (
    ConversationSampler,
    PretrainConfig,
    answer_held_out,
    held_out_questions,
    letter_accuracy,
    random_options,
)
from medift.generation import forced_answer_context, generate_answers
from medift.model.loading import load_base_model


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


def two_options(model, processor, size: int, n: int) -> dict:
    rng = random.Random("two-option-probe")
    items, keys = [], []
    for _ in range(n):
        attributes = general.sample_attributes(rng)
        image = general.render(attributes, rng, size)
        key = rng.choice(list(general.ATTRIBUTES))
        options, answer = random_options(general.ATTRIBUTES[key], attributes[key], rng, 0.0, most_options=2)
        items.append((mcq.build_mcq_instruction(general.QUESTION_TEXT[key], options), image, 2, answer, False))
        keys.append(key)
    _, correct = answer_held_out(model, processor, items, max_new_tokens=8)
    hits: dict[str, list[bool]] = defaultdict(list)
    for key, right, item in zip(keys, correct, items):
        hits[key].append(right)
        hits[f"answer {mcq.LETTERS[item[3]]}"].append(right)
    return {key: rate(h) for key, h in sorted(hits.items())} | {"all": rate(correct)}


def linear_probe_accuracy(features: torch.Tensor, targets: torch.Tensor, train: int) -> float:
    """Held-out accuracy of a logistic regression fitted on the first `train` rows."""
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-5
    features = (features - mean) / std
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():  # callers may hold the model's no_grad
        for _ in range(300):
            optimizer.zero_grad()
            logits = features[:train] @ weight + bias
            loss = F.binary_cross_entropy_with_logits(logits, targets[:train]) + 1e-3 * weight.square().sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = (features[train:] @ weight + bias) > 0
    return round((predicted.float() == targets[train:]).float().mean().item(), 3)


@torch.no_grad()
def size_by_layer(model, processor, size: int, n: int = 1024, train: int = 768) -> dict:
    rng = random.Random("size-by-layer-probe")
    drawn = [general.sample_attributes(rng) for _ in range(n)]
    images = [general.render(a, rng, size) for a in drawn]
    orders = [rng.sample(["big", "small"], 2) for _ in range(n)]
    targets = torch.tensor([float(a["size"] == "big") for a in drawn])
    forms = {
        "open question": lambda options: general.QUESTION_TEXT["size"],
        "two options": lambda options: mcq.build_mcq_instruction(general.QUESTION_TEXT["size"], options),
    }
    result = {}
    for name, form in forms.items():
        layers: list[list[torch.Tensor]] = []
        for start in range(0, n, 64):
            chunk = range(start, min(n, start + 64))
            encoded = [encode_prompt(processor, form(orders[i]), with_image=True) for i in chunk]
            batch = model_inputs(processor, encoded, [images[i] for i in chunk], padding_side="left")
            batch.pop("labels")
            hidden = model(**batch, output_hidden_states=True).hidden_states
            layers = layers or [[] for _ in hidden]
            for layer, states in zip(layers, hidden):
                layer.append(states[:, -1].float())
        result[name] = [linear_probe_accuracy(torch.cat(layer), targets, train) for layer in layers]
    return result


def text_binding(model, processor, size: int) -> dict:
    letters = set(forced_answer_context(processor)[1].values())
    result = {}
    for hops in (1, 2):
        for name, medical in (("general", 0.0), ("medical", 1.0)):
            config = PretrainConfig(binding_hops=hops, binding_batch_size=200, medical_text_fraction=medical)
            sampler = ConversationSampler(processor, config, random.Random(f"binding-probe-{hops}"), size)
            result[f"{hops} hop{'s' if hops > 1 else ''}, {name}"] = letter_accuracy(
                model, sampler.binding_batch(5), letters
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--n", type=int, default=200, help="open questions")
    parser.add_argument("--seed", type=int, default=1, help="seed of the held-out multiple-choice questions")
    args = parser.parse_args()
    model, processor = load_base_model(args.model_dir)
    model.eval()
    size = model.config.vision_config.image_size
    print(
        json.dumps(
            {
                "open_questions": open_questions(model, processor, size, args.n),
                "mcq": mcq_by_attribute(model, processor, size, args.seed),
                "two_options": two_options(model, processor, size, args.n),
                "size_by_layer": size_by_layer(model, processor, size),
                "text_binding": text_binding(model, processor, size),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
