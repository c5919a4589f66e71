"""Pre-training of the embedded default base model on the general-domain instruction set.

The table only measures something if the base model already follows instructions:
it must answer multiple-choice questions in the evaluation template with a letter.
A 2M-parameter model learns that on CPU only with help, so the schedule is a
curriculum, each piece answering a failure seen in trials:
1. text-only phase: the attributes are given as text ("Context: ..."), general and
   medical vocabulary alike. Cheap (no image tokens); it teaches option binding
   (find the option, say its letter) and the medical words, as a real LLM knows words
   it has never seen grounded in these images;
2. mixed phase: general images with multiple-choice, describe and yes/no turns (several
   turns per image, so one forward pass carries several answers), plus text-only turns;
3. auxiliary attribute-classification heads on the vision tower during phase 2 stand in
   for a pretrained vision encoder (without them the decoder learns to ignore the image).
   The heads are discarded; only the standard LLaVA model is saved.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from medift.runtime import set_torch_threads
from medift import mcq
from medift.chat import Encoded, collate, encode_conversation
from medift.datasets import DATASETS
from medift.generation import generate_answers, pixel_values_for
from medift.model import general
from medift.model.embedded import CONTEXT_PREFIX, EMBEDDED_DATASETS, EmbeddedModelConfig, build_model, build_processor
from medift.records import Record

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    out_dir: str = field(default="resources/base_model", metadata={"help": "Where the model is saved (HF layout)."})
    seed: int = field(default=1, metadata={"help": "Seeds initialisation and every sampled example."})
    text_steps: int = field(default=300, metadata={"help": "Steps of the text-only phase."})
    mixed_steps: int = field(default=1700, metadata={"help": "Steps of the mixed image+text phase."})
    batch_size: int = field(default=32, metadata={"help": "Conversations per step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate (cosine decay to a tenth)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps."})
    aux_weight: float = field(default=1.0, metadata={"help": "Weight of the vision tower's attribute heads."})
    text_fraction: float = field(default=0.3, metadata={"help": "Share of text-only conversations in phase 2."})
    medical_text_fraction: float = field(default=0.5, metadata={"help": "Share of text-only conversations using medical vocabularies."})
    fixed_order_fraction: float = field(default=0.5, metadata={"help": "Share of general multiple-choice turns whose options are the full vocabulary in fixed order (the rest: shuffled subsets)."})
    max_turns: int = field(default=3, metadata={"help": "Most question turns per image conversation."})
    eval_questions: int = field(default=300, metadata={"help": "Held-out general multiple-choice questions."})
    eval_every: int = field(default=300, metadata={"help": "Steps between held-out checks (0: only at the end)."})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads."})


# ---------------------------------------------------------------- conversations


def random_options(
    values: tuple[str, ...], answer: str, rng: random.Random, fixed_fraction: float = 0.5
) -> tuple[list[str], int]:
    """The full vocabulary in fixed order (as WBCAtt asks) with probability `fixed_fraction`,
    else a shuffled subset of 2-5 options (as CBIS-DDSM asks).

    Fixed order can be answered by memorising each value's letter; only shuffled options
    force the model to bind a letter to the option it stands before.
    """
    if rng.random() < fixed_fraction or len(values) == 2:
        options = list(values)
    else:
        k = rng.randint(2, min(5, len(values)))
        options = [answer] + rng.sample([v for v in values if v != answer], k - 1)
        rng.shuffle(options)
    return options, options.index(answer)


def general_turn(attributes: dict[str, str], rng: random.Random, fixed_fraction: float = 0.5) -> tuple[str, str]:
    """One (instruction, response) about a general-domain object."""
    kind = rng.random()
    if kind < 0.6:
        key = rng.choice(list(general.ATTRIBUTES))
        options, answer = random_options(general.ATTRIBUTES[key], attributes[key], rng, fixed_fraction)
        return mcq.build_mcq_instruction(general.QUESTION_TEXT[key], options), mcq.format_answer(answer)
    if kind < 0.8:
        return rng.choice(general.DESCRIBE_REQUESTS), general.describe(attributes)
    key = rng.choice([k for k in general.ATTRIBUTES if k != "shadow"])
    asked = attributes[key] if rng.random() < 0.5 else rng.choice(general.ATTRIBUTES[key])
    return f"Is the {key} {asked}?", "Yes." if asked == attributes[key] else "No."


def medical_text_turn(rng: random.Random) -> tuple[str, str]:
    """A text-only multiple-choice turn on a random medical attribute combination."""
    name = rng.choice(sorted(EMBEDDED_DATASETS))
    module = DATASETS[name]
    attributes = importlib.import_module(f"medift.datasets.synthetic_{name}").sample_attributes(rng)
    record = Record(module.NAME, "text", "", "text", "test", attributes)
    questions = module.make_questions(record, rng)
    q = rng.choice(questions)
    context = f"{CONTEXT_PREFIX} {module.describe(attributes)}\n"
    return context + mcq.build_mcq_instruction(q.question, q.options), mcq.format_answer(q.answer_index)


def general_text_turn(rng: random.Random, fixed_fraction: float) -> tuple[str, str]:
    attributes = general.sample_attributes(rng)
    instruction, response = general_turn(attributes, rng, fixed_fraction)
    return f"{CONTEXT_PREFIX} {general.describe(attributes)}\n{instruction}", response


class ConversationSampler:
    def __init__(self, processor, config: PretrainConfig, rng: random.Random, image_size: int):
        self.processor, self.config, self.rng, self.image_size = processor, config, rng, image_size

    def text_conversation(self) -> Encoded:
        if self.rng.random() < self.config.medical_text_fraction:
            instruction, response = medical_text_turn(self.rng)
        else:
            instruction, response = general_text_turn(self.rng, self.config.fixed_order_fraction)
        return encode_conversation(self.processor, [instruction], [response], with_image=False)

    def image_conversation(self) -> tuple[Encoded, object, dict[str, str]]:
        attributes = general.sample_attributes(self.rng)
        image = general.render(attributes, self.rng, self.image_size)
        fixed = self.config.fixed_order_fraction
        turns = [general_turn(attributes, self.rng, fixed) for _ in range(self.rng.randint(1, self.config.max_turns))]
        encoded = encode_conversation(
            self.processor, [t[0] for t in turns], [t[1] for t in turns], with_image=True
        )
        return encoded, image, attributes

    def batch(self, text_only: bool) -> dict:
        encoded, images, attrs = [], [], []
        for _ in range(self.config.batch_size):
            if text_only or self.rng.random() < self.config.text_fraction:
                encoded.append(self.text_conversation())
            else:
                e, image, a = self.image_conversation()
                encoded.append(e)
                images.append(image)
                attrs.append(a)
        batch = collate(encoded, self.processor.tokenizer.pad_token_id)
        if images:
            batch["pixel_values"] = pixel_values_for(self.processor, images)
            batch["aux_targets"] = torch.tensor(
                [[general.ATTRIBUTES[k].index(a[k]) for k in general.ATTRIBUTES] for a in attrs]
            )
        return batch


# ---------------------------------------------------------------- model pieces


class AttributeHeads(torch.nn.Module):
    """Linear probes on the vision tower's pooled features, one per general attribute."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, len(v)) for v in general.ATTRIBUTES.values())

    def loss(self, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(head(pooled), targets[:, i]) for i, head in enumerate(self.heads)) / len(self.heads)


def lr_at(step: int, total: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_questions(n: int, seed: int, image_size: int):
    """General multiple-choice questions in the evaluation template, from a separate seed stream."""
    rng = random.Random(f"held-out-{seed}")
    items = []
    for _ in range(n):
        attributes = general.sample_attributes(rng)
        image = general.render(attributes, rng, image_size)
        key = rng.choice(list(general.ATTRIBUTES))
        options, answer = random_options(general.ATTRIBUTES[key], attributes[key], rng)
        fixed = options == list(general.ATTRIBUTES[key])
        items.append((mcq.build_mcq_instruction(general.QUESTION_TEXT[key], options), image, len(options), answer, fixed))
    return items


def general_mcq_accuracy(model, processor, items, max_new_tokens: int = 50) -> dict:
    outputs = generate_answers(
        model, processor, [i[0] for i in items], [i[1] for i in items], max_new_tokens=max_new_tokens
    )
    parsed = [mcq.parse_answer_letter(o, i[2]) for o, i in zip(outputs, items)]
    hits = [p == mcq.LETTERS[i[3]] for p, i in zip(parsed, items)]
    by_format = {}
    for name, wanted in (("fixed_order", True), ("shuffled", False)):
        subset = [h for h, i in zip(hits, items) if i[4] == wanted]
        by_format[name] = {"n": len(subset), "accuracy": round(sum(subset) / len(subset), 4) if subset else None}
    return {
        "general_mcq_accuracy": round(sum(hits) / len(items), 4),
        "n": len(items),
        "parse_failures": sum(p is None for p in parsed),
        "by_option_format": by_format,
    }


# ---------------------------------------------------------------- the loop


def pretrain(config: PretrainConfig, model_config: EmbeddedModelConfig, stop_after: int | None = None) -> dict:
    """Pre-train and save; with `stop_after`, return the first steps' history unsaved (tests)."""
    set_torch_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    processor = build_processor(model_config)
    model = build_model(model_config, processor, config.seed)
    heads = AttributeHeads(model_config.vision_hidden)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sampler = ConversationSampler(processor, config, rng, model_config.image_size)
    held_out = held_out_questions(config.eval_questions, config.seed, model_config.image_size)
    total = config.text_steps + config.mixed_steps
    history = []
    started = time.time()
    model.train()
    bar = tqdm(range(total), desc="pretrain", mininterval=5)
    for step in bar:
        batch = sampler.batch(text_only=step < config.text_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, config)
        aux_targets = batch.pop("aux_targets", None)
        out = model(**batch, output_hidden_states=False)
        loss = out.loss
        aux = torch.zeros(())
        if aux_targets is not None:
            pooled = model.model.vision_tower(batch["pixel_values"]).pooler_output
            aux = heads.loss(pooled, aux_targets)
            loss = loss + config.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        record = {"step": step, "lm_loss": round(out.loss.item(), 5), "aux_loss": round(aux.item(), 5)}
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
            record.update(general_mcq_accuracy(model, processor, held_out[:100], max_new_tokens=8))
            model.train()
            log.info("step %d: %s", step + 1, record)
        history.append(record)
        if stop_after is not None and len(history) >= stop_after:
            return {"history": history}
        bar.set_postfix(lm=f"{record['lm_loss']:.3f}", aux=f"{record['aux_loss']:.3f}", refresh=False)
    final = general_mcq_accuracy(model, processor, held_out)
    final["train_seconds"] = round(time.time() - started, 1)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    (out_dir / "pretrain_history.json").write_text(json.dumps(
        {"config": asdict(config), "model_config": asdict(model_config), "final": final, "history": history}, indent=1
    ))
    log.info("final: %s", final)
    return final
