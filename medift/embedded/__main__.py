"""The embedded base models' command lines: build them, and measure their general instruction following.

`python -m medift.embedded recipe --out_dir DIR` rebuilds the shipped tiny LLaVA
(`embedded_llava`, models/embedded-base; two pre-training stages);
`python -m medift.embedded pretrain --out_dir DIR` runs one stage;
`python -m medift.embedded distill --out_dir DIR` builds the default tiny Mllama
(`embedded`, models/embedded-mllama) from it;
`python -m medift.embedded evaluate --model DIR --out results/base_model.json`
reports its accuracy on held-out general-domain multiple-choice questions.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from medift import metrics
from medift.embedded.llava import EmbeddedModelConfig
from medift.embedded.mllama import DistillConfig, distill
from medift.embedded.pretrain import (
    PretrainConfig,
    RecipeConfig,
    held_out_answers,
    held_out_questions,
    held_out_summary,
    pretrain,
    recipe_stages,
    run_stages,
)
from medift.model.loading import load_base_model
from medift.runtime import set_torch_threads
from medift.settings import EMBEDDED_IMAGE_SIZE

log = logging.getLogger(__name__)


@dataclass
class BaseEvalConfig:
    model: str = field(metadata={"help": "Checkpoint directory of the base model."})
    out: str = field(metadata={"help": "JSON to write ({'general_mcq_accuracy': ...})."})
    n: int = field(default=300, metadata={"help": "Held-out general multiple-choice questions."})
    seed: int = field(default=1, metadata={"help": "Seed of the held-out stream (the pre-training seed)."})
    image_size: int = field(default=EMBEDDED_IMAGE_SIZE, metadata={"help": "Image size of the embedded model."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads."})


def evaluate_base(config: BaseEvalConfig) -> dict:
    set_torch_threads(config.threads)
    model, processor = load_base_model(config.model)
    answers = held_out_answers(model, processor, held_out_questions(config.n, config.seed, config.image_size))
    # Fractions (4 decimals) in this report, from medift.metrics like every other metric.
    result = held_out_summary(answers)
    result["format_retention"] = round(metrics.format_retention(answers), 4)
    result["model"] = config.model
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    Path(config.out).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("recipe", "pretrain", "distill", "evaluate"):
        print("usage: python -m medift.embedded {recipe,pretrain,distill,evaluate} --help", file=sys.stderr)
        return 2
    if argv[0] == "recipe":
        recipe, model_config = HfArgumentParser((RecipeConfig, EmbeddedModelConfig)).parse_args_into_dataclasses(
            argv[1:]
        )
        log.info("final: %s", run_stages(recipe_stages(recipe), model_config, reuse_first=recipe.reuse_first_stage))
    elif argv[0] == "distill":
        (distill_config,) = HfArgumentParser(DistillConfig).parse_args_into_dataclasses(argv[1:])
        log.info("final: %s", distill(distill_config))
    elif argv[0] == "pretrain":
        pretrain_config, model_config = HfArgumentParser(
            (PretrainConfig, EmbeddedModelConfig)
        ).parse_args_into_dataclasses(argv[1:])
        log.info("final: %s", pretrain(pretrain_config, model_config))
    else:
        (config,) = HfArgumentParser(BaseEvalConfig).parse_args_into_dataclasses(argv[1:])
        log.info("base model: %s", evaluate_base(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
