"""Open-question probe of a saved embedded model: can it read each general attribute?

Asks `What is the <attribute>?` with no options about 200 held-out general images and
compares the generated value with the drawn one, per attribute. Multiple-choice accuracy
mixes reading the image with binding a letter to its option; this separates the first.
Only meaningful for models trained with `--value_turn_fraction` > 0 (the answer format).

    HF_HUB_OFFLINE=1 python bench/value_probe.py MODEL_DIR [--n 200]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

from medift.generation import generate_answers
from medift.model import general
from medift.model.loading import load_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    model, processor = load_base_model(args.model_dir)
    size = model.config.vision_config.image_size
    rng = random.Random("value-probe")
    items = []
    for _ in range(args.n):
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
    result = {key: {"n": len(h), "accuracy": round(sum(h) / len(h), 3)} for key, h in sorted(hits.items())}
    result["all"] = round(sum(sum(h) for h in hits.values()) / args.n, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
