"""Pre-training of the embedded LLaVA (`embedded_llava`, the default Mllama's teacher) on the
general-domain instruction set.

The table only measures something if the base model already follows instructions:
it must answer multiple-choice questions in the evaluation template with a letter.
A 2M-parameter model learns that on CPU only with help, so the schedule is a
curriculum, each piece answering a failure seen in trials (docs/base-model-trials.md).
The defaults are the shipped recipe's first stage (`RecipeConfig` adds a refining stage):
1. binding phase (`binding_steps`): text only, the asked value stated right before each
   question (`Context: red`, `binding_hops 1`), 2 growing to 5 shuffled options, general
   and medical vocabulary alike (the medical words a real LLM would know without having
   seen these images). In-context option binding (find the option, say the letter before
   it) is what a small decoder learns last; it comes first, alone, and stays in later
   batches (`binding_fraction`);
2. mixed phase: general images with multiple-choice, describe, yes/no and open value
   turns (several per image, so one forward pass carries several answers), plus text
   turns. Its first `two_option_steps` ask every multiple-choice question with two
   shuffled options, the easiest binding on an image; then the held-out mix of fixed-order
   and shuffled 2-5 options;
3. auxiliary losses, each answering a measured break: attribute heads on the mean of the
   image tokens the decoder sees stand in for a pretrained vision encoder (without them
   the decoder ignores the image); every text token after an image carries the image's
   values by decoder layer 1 (`text_reads_image_weight`; otherwise they reach the text
   only at the last layer, too late to be matched against the options); a probe marks the
   right option where each option is read (`option_flag_weight`; with it one-hop binding
   forms within 250 steps instead of 750-1,250 or more). Heads and probe are discarded; only the
   standard LLaVA model is saved.

A run can start from an earlier run's saved model (`init_from`: the recipe's refining
stage). `research/base_model_probe.py` shows where a saved model fails.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medift import mcq, metrics
from medift.chat import CAPTION_INSTRUCTION, IGNORE_INDEX, Encoded, collate, encode_conversation, model_inputs
from medift.datasets import DATASETS
from medift.embedded import general
from medift.embedded.llava import CONTEXT_PREFIX, EMBEDDED_DATASETS, EmbeddedModelConfig, build_model, build_processor
from medift.generation import forced_answer_context, generate_answers
from medift.model.loading import load_base_model
from medift.records import Record
from medift.runtime import resolve_device, set_torch_threads

log = logging.getLogger(__name__)


HISTORY_FILE = "pretrain_history.json"  # a saved run's settings, losses and held-out checks
# Settings since deleted, each with the value that left it off (what the code does now); a saved
# run's history may still record them (`read_history`).
RETIRED_SETTINGS = {
    "lookup_curriculum": "",
    "lookup_batch_size": 64,
    "lookup_fraction": 0.0,
    "text_steps": 0,
    "aux_features": "image_tokens",
    "image_hint_start": 0.0,
    "image_hint_steps": 0,
}


@dataclass
class PretrainConfig:
    out_dir: str = field(default="resources/base_model", metadata={"help": "Where the model is saved (HF layout)."})
    init_from: str = field(
        default="",
        metadata={
            "help": (
                "Start from this saved embedded model (an earlier run's out_dir) instead of a fresh one; its "
                "tokenizer must match letter_dot_tokens (empty: fresh)."
            )
        },
    )
    seed: int = field(default=1, metadata={"help": "Seeds initialisation and every sampled example."})
    binding_steps: int = field(
        default=2500, metadata={"help": "Steps of the option-binding phase (text only, before the mixed phase)."}
    )
    binding_options: str = field(
        default="2,3,4,5",
        metadata={"help": "Most options per question in each equal-length stage of the binding phase."},
    )
    binding_hops: int = field(
        default=1,
        metadata={
            "help": "Binding phase: 1 states the asked value right before each question, 2 the whole description once."
        },
    )
    binding_batch_size: int = field(default=64, metadata={"help": "Conversations per step in the binding phase."})
    binding_fraction: float = field(
        default=0.2,
        metadata={
            "help": (
                "Share of binding conversations (binding_hops, most options) in later phases' batches, so the binding "
                "circuit stays in use."
            )
        },
    )
    mixed_steps: int = field(default=4000, metadata={"help": "Steps of the mixed image+text phase."})
    batch_size: int = field(default=32, metadata={"help": "Conversations per step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate (cosine decay to a tenth)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps."})
    aux_weight: float = field(default=1.0, metadata={"help": "Weight of the vision tower's attribute heads."})
    option_flag_weight: float = field(
        default=1.0,
        metadata={
            "help": (
                "Weight of a probe on the decoder's hidden state at every option's value token that says whether it "
                "is the right option (letter-dot tokens only; 0: off); one linear probe per value (OptionProbe). It "
                "asks the decoder to mark, where each option is read, whether the image (or the stated context) shows "
                "it, so that the answer only has to find the marked option and say the letter before it."
            )
        },
    )
    option_flag_layer: int = field(
        default=3, metadata={"help": "Decoder layer whose output the option probe reads (0: the embeddings)."}
    )
    text_reads_image_weight: float = field(
        default=1.0,
        metadata={
            "help": (
                "Weight of a loss that asks every text token after an image to carry the image's attribute values by "
                "decoder layer `text_reads_image_layer`, read by the value words' own embeddings (0: off). Without it "
                "the value reaches the text only at the last layer, too late for an option to be matched against it."
            )
        },
    )
    text_reads_image_layer: int = field(
        default=1,
        metadata={
            "help": "Decoder layer whose output carries the image's values at every text token (0: the embeddings)."
        },
    )
    value_turn_fraction: float = field(
        default=0.2,
        metadata={
            "help": (
                "Share of image turns that ask an attribute with no options and are answered by its value alone "
                "('What is the color?' -> 'red'): the value the binding circuit must match, read from the image."
            )
        },
    )
    image_options_most: int = field(
        default=5,
        metadata={
            "help": (
                "Most options of a shuffled image multiple-choice turn, two-value attributes shuffled too (0: 2-5 "
                "options, two-value attributes always in fixed order)."
            )
        },
    )
    two_option_steps: int = field(
        default=2000,
        metadata={
            "help": (
                "Steps at the start of the mixed phase whose multiple-choice turns all have two shuffled options, "
                "two-value attributes too (as fixed_order_fraction 0, image_options_most 2), before the configured "
                "mix (0: none). Two options in either order are the easiest binding on an image; with the full mix "
                "from the start a small decoder answers fixed-order questions by memorised letters instead."
            )
        },
    )
    text_fraction: float = field(default=0.1, metadata={"help": "Share of text-only conversations in phase 2."})
    medical_text_fraction: float = field(
        default=0.5, metadata={"help": "Share of text-only conversations using medical vocabularies."}
    )
    fixed_order_fraction: float = field(
        default=0.3,
        metadata={
            "help": (
                "Share of general multiple-choice turns whose options are the full vocabulary in fixed order "
                "(the rest: "
                "shuffled subsets)."
            )
        },
    )
    max_turns: int = field(default=3, metadata={"help": "Most question turns per image conversation."})
    eval_questions: int = field(default=300, metadata={"help": "Held-out general multiple-choice questions."})
    eval_every: int = field(default=250, metadata={"help": "Steps between held-out checks (0: only at the end)."})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads."})
    device: str = field(
        default="cpu",
        metadata={
            "help": (
                "cpu, cuda, cuda:N or auto. CUDA runs use deterministic kernels but do not reproduce CPU runs bit for "
                "bit."
            )
        },
    )

    def __post_init__(self):
        # Checked here, not at the first image step, which can come an hour into a run.
        if self.image_options_most == 1 or self.image_options_most < 0:
            raise ValueError(f"image_options_most {self.image_options_most}: expected 0 (off) or at least 2")
        if self.two_option_steps > self.mixed_steps:
            raise ValueError(f"two_option_steps {self.two_option_steps} exceeds mixed_steps {self.mixed_steps}")


# ---------------------------------------------------------------- conversations


def random_options(
    values: tuple[str, ...], answer: str, rng: random.Random, fixed_fraction: float = 0.5, most_options: int = 0
) -> tuple[list[str], int]:
    """The full vocabulary in fixed order (as WBCAtt asks) with probability `fixed_fraction`,
    else a shuffled subset of 2-5 options (as CBIS-DDSM asks).

    Fixed order can be answered by memorising each value's letter; only shuffled options
    force the model to bind a letter to the option it stands before. With `most_options`,
    a shuffled subset has at most that many options and a two-value vocabulary is shuffled
    too (`A. small B. big`): the easiest binding, on the easiest attributes to see.
    """
    if rng.random() < fixed_fraction or (len(values) == 2 and not most_options):
        options = list(values)
    else:
        k = rng.randint(2, min(most_options or 5, len(values)))
        options = [answer] + rng.sample([v for v in values if v != answer], k - 1)
        rng.shuffle(options)
    return options, options.index(answer)


def state_value_first(value: str, question: str) -> str:
    """The one-hop form of option binding: the asked value is stated right before the question."""
    return f"{CONTEXT_PREFIX} {value}\n{question}"


def general_turn(
    attributes: dict[str, str],
    rng: random.Random,
    fixed_fraction: float = 0.5,
    value_probability: float = 0.0,
    most_options: int = 0,
) -> tuple[str, str]:
    """One (instruction, response) about a general-domain object.

    With `value_probability`, the turn is the question without options, answered by the value.
    """
    if value_probability and rng.random() < value_probability:
        key = rng.choice(list(general.ATTRIBUTES))
        return general.QUESTION_TEXT[key], attributes[key]
    kind = rng.random()
    if kind < 0.6:
        key = rng.choice(list(general.ATTRIBUTES))
        options, answer = random_options(general.ATTRIBUTES[key], attributes[key], rng, fixed_fraction, most_options)
        instruction = mcq.build_mcq_instruction(general.QUESTION_TEXT[key], options)
        return instruction, mcq.format_answer(answer)
    if kind < 0.8:
        return rng.choice(general.DESCRIBE_REQUESTS), general.describe(attributes)
    key = rng.choice([k for k in general.ATTRIBUTES if k != "shadow"])
    asked = attributes[key] if rng.random() < 0.5 else rng.choice(general.ATTRIBUTES[key])
    return f"Is the {key} {asked}?", "Yes." if asked == attributes[key] else "No."


def medical_text_turn(rng: random.Random) -> tuple[str, str]:
    """A text-only multiple-choice turn on a random medical attribute combination."""
    name = rng.choice(sorted(EMBEDDED_DATASETS))
    module = DATASETS[name]
    attributes = importlib.import_module(f"medift.datasets.synthetic.{name}").sample_attributes(rng)
    record = Record(module.NAME, "text", "", "text", "test", attributes)
    questions = module.make_questions(record, rng)
    q = rng.choice(questions)
    context = f"{CONTEXT_PREFIX} {module.describe(attributes)}\n"
    return context + mcq.build_mcq_instruction(q.question, q.options), mcq.format_answer(q.answer_index)


def medical_describe_turn(rng: random.Random, context_probability: float = 0.0) -> tuple[str, str]:
    """A text-only caption request answered by a random medical description: the language of
    reports, without any image. With `context_probability`, the description is stated first
    (`Context: ...`), so that the answer writes out what the text carries. The phrases come in
    a random order, as the fine-tuning's shuffled descriptions do: taught the datasets' fixed
    order instead, the decoder started caption fine-tuning on WBCAtt at 5.73 nats per token,
    against 1.09 when taught random orders (docs/recipe-search.md)."""
    name = rng.choice(sorted(EMBEDDED_DATASETS))
    module = DATASETS[name]
    attributes = importlib.import_module(f"medift.datasets.synthetic.{name}").sample_attributes(rng)
    phrases = list(module.phrases(attributes).values())
    rng.shuffle(phrases)
    description = ", ".join(phrases)
    if rng.random() < context_probability:
        return f"{CONTEXT_PREFIX} {description}\n{CAPTION_INSTRUCTION}", description
    return CAPTION_INSTRUCTION, description


def general_text_turn(rng: random.Random, fixed_fraction: float) -> tuple[str, str]:
    attributes = general.sample_attributes(rng)
    instruction, response = general_turn(attributes, rng, fixed_fraction)
    return f"{CONTEXT_PREFIX} {general.describe(attributes)}\n{instruction}", response


def option_values() -> list[str]:
    """Every attribute value the model will see as an option (each one token), in a fixed order."""
    vocabularies = [general.ATTRIBUTES] + [DATASETS[name].ATTRIBUTES for name in sorted(EMBEDDED_DATASETS)]
    return list(
        dict.fromkeys(value for vocabulary in vocabularies for values in vocabulary.values() for value in values)
    )


def lookup_sequence(
    rng: random.Random, vocab: dict[str, int], values: list[str], pairs: int
) -> tuple[list[int], list[int]]:
    """`A. v1 \n B. v2 ...` then every `v : <letter>` in random order; only the letters are predicted.

    The dense form of option binding (find the option, say the letter before it): every
    query is answered, and the sequence is short. The held-out checks measure binding on
    it (`held_out_text_batches`); `research/option_binding.py` trains on it. Letters are the
    tokens the option lines and answers use ("A." with letter_dot_tokens, else "A" then ".").
    """
    merged = "A." in vocab
    chosen = rng.sample(values, pairs)
    ids: list[int] = []
    labels: list[int] = []
    for k, value in enumerate(chosen):
        letter = [vocab[mcq.LETTERS[k] + "."]] if merged else [vocab[mcq.LETTERS[k]], vocab["."]]
        ids += letter + [vocab[value], vocab["\n"]]
        labels += [IGNORE_INDEX] * (len(letter) + 2)
    for k in rng.sample(range(pairs), pairs):
        answer = vocab[mcq.LETTERS[k] + "."] if merged else vocab[mcq.LETTERS[k]]
        ids += [vocab[chosen[k]], vocab[":"], answer, vocab["\n"]]
        labels += [IGNORE_INDEX, IGNORE_INDEX, answer, IGNORE_INDEX]
    return ids, labels


def binding_conversation(
    rng: random.Random, most_options: int, turns: int, medical_fraction: float, hops: int = 2
) -> tuple[list[str], list[str]]:
    """`turns` questions with 2..`most_options` shuffled options about a stated context.

    hops=2: the whole description once (`Context: ...`), before the first question (look the
    value up, then find its option); hops=1: the asked value alone right before each question.

    Why a separate phase: with the full vocabulary in fixed order a letter can be memorised
    per value, and with 5 shuffled options a small decoder stays at answering by
    elimination; starting from 2 options and growing is what lets it learn to find the
    option and say the letter before it (research/option_binding.py measures this).
    """
    if rng.random() < medical_fraction:
        name = rng.choice(sorted(EMBEDDED_DATASETS))
        module = DATASETS[name]
        vocabulary, question_text = module.ATTRIBUTES, module.QUESTION_TEXT
        attributes = importlib.import_module(f"medift.datasets.synthetic.{name}").sample_attributes(rng)
        context = module.describe(attributes)
    else:
        vocabulary, question_text = general.ATTRIBUTES, general.QUESTION_TEXT
        attributes = general.sample_attributes(rng)
        context = general.describe(attributes)
    keys = [key for key in attributes if len(vocabulary[key]) >= 2]
    instructions, responses = [], []
    for _ in range(turns):
        key = rng.choice(keys)
        values = vocabulary[key]
        k = min(rng.randint(2, most_options), len(values))
        options = [attributes[key]] + rng.sample([v for v in values if v != attributes[key]], k - 1)
        rng.shuffle(options)
        question = mcq.build_mcq_instruction(question_text[key], options)
        if hops == 1:
            question = state_value_first(attributes[key], question)
        instructions.append(question)
        responses.append(mcq.format_answer(options.index(attributes[key])))
    if hops == 2:
        instructions[0] = f"{CONTEXT_PREFIX} {context}\n{instructions[0]}"
    return instructions, responses


def binding_stage(step: int, config: PretrainConfig) -> int:
    """Most options per question at `step` of the binding phase."""
    stages = [int(n) for n in config.binding_options.split(",")]
    return stages[min(len(stages) - 1, step * len(stages) // max(1, config.binding_steps))]


class ConversationSampler:
    def __init__(self, processor, config: PretrainConfig, rng: random.Random, image_size: int):
        self.processor, self.config, self.rng, self.image_size = processor, config, rng, image_size
        self.values = option_values()

    def text_conversation(self, config: PretrainConfig) -> Encoded:
        if self.rng.random() < config.medical_text_fraction:
            instruction, response = medical_text_turn(self.rng)
        else:
            instruction, response = general_text_turn(self.rng, config.fixed_order_fraction)
        return encode_conversation(self.processor, [instruction], [response], with_image=False)

    def image_conversation(self, config: PretrainConfig) -> tuple[Encoded, object, dict[str, str]]:
        attributes = general.sample_attributes(self.rng)
        image = general.render(attributes, self.rng, self.image_size)
        turns = [
            general_turn(
                attributes,
                self.rng,
                config.fixed_order_fraction,
                config.value_turn_fraction,
                config.image_options_most,
            )
            for _ in range(self.rng.randint(1, config.max_turns))
        ]
        encoded = encode_conversation(self.processor, [t[0] for t in turns], [t[1] for t in turns], with_image=True)
        return encoded, image, attributes

    def lookup_batch(self, pairs: int, size: int) -> dict:
        vocab = self.processor.tokenizer.get_vocab()
        rows = [lookup_sequence(self.rng, vocab, self.values, pairs) for _ in range(size)]
        return {"input_ids": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows])}

    def binding_encoded(self, most_options: int) -> Encoded:
        conversation = binding_conversation(
            self.rng, most_options, self.config.max_turns, self.config.medical_text_fraction, self.config.binding_hops
        )
        return encode_conversation(self.processor, *conversation, with_image=False)

    def binding_batch(self, most_options: int) -> dict:
        encoded = [self.binding_encoded(most_options) for _ in range(self.config.binding_batch_size)]
        return collate(encoded, self.processor.tokenizer.pad_token_id)

    def batch(self, config: PretrainConfig | None = None) -> dict:
        """A mixed-phase batch; `config` is this step's settings (`mixed_phase_config`; default: the run's)."""
        encoded, images, attrs = self.rows(config)
        if not attrs:
            return collate(encoded, self.processor.tokenizer.pad_token_id)
        batch = model_inputs(self.processor, encoded, images, padding_side="right")
        batch["aux_targets"] = attribute_targets(attrs)
        return batch

    def rows(self, config: PretrainConfig | None = None) -> tuple[list[Encoded], list, list[dict[str, str]]]:
        """A mixed-phase batch's conversations (this processor's encoding), images (None: a
        text-only row) and the attributes of each image, in order."""
        config = config or self.config
        encoded, images, attrs = [], [], []
        for _ in range(config.batch_size):
            image = None
            if config.binding_fraction and self.rng.random() < config.binding_fraction:
                encoded.append(self.binding_encoded(int(config.binding_options.split(",")[-1])))
            elif self.rng.random() < config.text_fraction:
                encoded.append(self.text_conversation(config))
            else:
                e, image, a = self.image_conversation(config)
                encoded.append(e)
                attrs.append(a)
            images.append(image)
        return encoded, images, attrs


def attribute_targets(attrs: list[dict[str, str]]) -> torch.Tensor:
    """Each image's value index per general attribute (the attribute heads' targets)."""
    return torch.tensor([[general.ATTRIBUTES[k].index(a[k]) for k in general.ATTRIBUTES] for a in attrs])


# ---------------------------------------------------------------- model pieces


class AttributeHeads(torch.nn.Module):
    """Linear probes, one per general attribute, on one feature vector per image (`image_features`)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, len(v)) for v in general.ATTRIBUTES.values())

    def loss(self, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(head(pooled), targets[:, i]) for i, head in enumerate(self.heads)) / len(self.heads)


class OptionProbe(torch.nn.Module):
    """Whether an option is the right one, read from the hidden state at its value token,
    by a linear probe of that value's own (one per vocabulary token).

    One probe shared by all options would have to see the option's own value *and* the
    image's together (red is right on a red object, wrong on a blue one), an interaction
    no single direction of the hidden state gives, so its gradient on the image features
    averages out over options; a probe per value needs the image's value alone.
    """

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.weight = torch.nn.Embedding(vocab_size, hidden)
        self.bias = torch.nn.Embedding(vocab_size, 1)
        torch.nn.init.zeros_(self.weight.weight)
        torch.nn.init.zeros_(self.bias.weight)

    def forward(self, hidden: torch.Tensor, value_tokens: torch.Tensor) -> torch.Tensor:
        return (hidden * self.weight(value_tokens)).sum(-1) + self.bias(value_tokens).squeeze(-1)


def image_features(output, images: int) -> torch.Tensor:
    """The features the attribute heads classify: per image, the mean of the projected image
    tokens the decoder reads (not the CLS token, which LLaVA's default feature strategy
    drops), so the decoder can read every attribute with one evenly spread attention head.
    Taken from the forward pass's `output` (its `image_hidden_states`), not computed a second time.
    """
    tokens = output.image_hidden_states  # every image's tokens, concatenated
    return tokens.view(images, -1, tokens.shape[-1]).mean(dim=1)


def option_flags(
    input_ids: torch.Tensor, labels: torch.Tensor, letter_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, positions, targets) of every option's value token in the prompts, and whether it is the answer.

    An option line is a letter-dot token in a prompt (label ignored) followed by its value
    token; the answer is the next letter-dot token the response writes (`The correct answer
    is B.`). Read from the tokens alone, so every conversation kind with option lines is covered.
    """
    is_letter = torch.isin(input_ids, letter_ids)
    in_response = labels != IGNORE_INDEX
    length = input_ids.shape[1]
    # Position of the first answer letter at or after each position (`length`: none), by a
    # running minimum from the right: one pass over the batch instead of a loop per option.
    index = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    answer_at = torch.where(is_letter & in_response, index, torch.full_like(index, length))
    next_answer = answer_at.flip(1).cummin(1).values.flip(1)
    answer_after = torch.cat([next_answer[:, 1:], torch.full_like(next_answer[:, :1], length)], dim=1)
    rows, letters = (is_letter & ~in_response & (answer_after < length)).nonzero(as_tuple=True)
    answers = answer_after[rows, letters]
    targets = (input_ids[rows, letters] == input_ids[rows, answers]).float()
    return rows, letters + 1, targets


def value_token_ids(tokenizer) -> list[list[int]]:
    """Each general attribute's value tokens, in `general.ATTRIBUTES` order."""
    vocab = tokenizer.get_vocab()
    return [[vocab[value] for value in values] for values in general.ATTRIBUTES.values()]


def value_words_loss(
    model, features: torch.Tensor, targets: torch.Tensor, value_ids: list[list[int]], keep: torch.Tensor
) -> torch.Tensor:
    """Feature vectors classified, per attribute, by the input embeddings of that attribute's values.

    `features` is (images, positions, width), `targets` one row of value indices per image,
    `keep` which positions count. The decoder's binding circuit matches an
    option against a value it has read as a token; this puts the image's values in those
    same directions.
    """
    embeddings = model.get_input_embeddings().weight
    losses = []
    for k, ids in enumerate(value_ids):
        logits = features @ embeddings[ids].T  # (images, positions, values)
        target = targets[:, k].unsqueeze(1).expand(-1, features.shape[1])
        losses.append(F.cross_entropy(logits[keep], target[keep]))
    return sum(losses) / len(losses)


def text_reads_image_loss(
    model,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: torch.Tensor,
    value_ids: list[list[int]],
) -> torch.Tensor:
    """`value_words_loss` at every text token after the image, in the rows that have one.

    `hidden` is one decoder layer's output; `targets` has one row per image, in row order.
    """
    is_image = input_ids == model.config.image_token_id
    has_image = is_image.any(dim=1)
    after_image = is_image.long().cummax(dim=1).values.bool() & ~is_image
    keep = (after_image & attention_mask.bool())[has_image]
    return value_words_loss(model, hidden[has_image], targets, value_ids, keep)


def mixed_phase_config(mixed_step: int, config: PretrainConfig) -> PretrainConfig:
    """The settings the sampler draws with `mixed_step` steps into the mixed phase."""
    if mixed_step < config.two_option_steps:
        return replace(config, fixed_order_fraction=0.0, image_options_most=2)
    return config


def lr_at(step: int, total: int, config: PretrainConfig) -> float:
    """Linear warm-up to `config.lr`, then cosine decay to a tenth at `total` steps (any
    config with `lr` and `warmup_steps`: the distillation's too)."""
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
        items.append(
            (mcq.build_mcq_instruction(general.QUESTION_TEXT[key], options), image, len(options), answer, fixed)
        )
    return items


@torch.no_grad()
def letter_accuracy(model, batch: dict, letter_ids: set[int]) -> float:
    """Teacher-forced accuracy on the answer letters among a held-out batch's labels."""
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    model.train()
    targets = batch["labels"][:, 1:]
    is_letter = torch.isin(targets, torch.tensor(sorted(letter_ids), device=targets.device))
    return round((logits.argmax(-1)[is_letter] == targets[is_letter]).float().mean().item(), 4)


def held_out_text_batches(processor, config: PretrainConfig, image_size: int, device) -> dict[str, dict]:
    """200 lookup sequences (5 pairs) and 200 binding conversations (most options), from their own seeds.

    They measure option binding in its text forms while the image questions cannot yet:
    the first shipped run's shuffled-option accuracy stayed at chance, so this is where binding
    would show first.
    """
    held_out = replace(config, binding_batch_size=200)
    lookup = ConversationSampler(processor, held_out, random.Random(f"held-out-lookup-{config.seed}"), image_size)
    binding = ConversationSampler(processor, held_out, random.Random(f"held-out-binding-{config.seed}"), image_size)
    most_options = int(config.binding_options.split(",")[-1])
    batches = {"lookup": lookup.lookup_batch(5, 200), "binding": binding.binding_batch(most_options)}
    return {name: {key: value.to(device) for key, value in batch.items()} for name, batch in batches.items()}


def answer_held_out(model, processor, items, max_new_tokens: int = 50) -> tuple[list[str | None], list[bool]]:
    """Each held-out question's parsed letter (None: unparseable) and whether it is right."""
    outputs = generate_answers(
        model, processor, [i[0] for i in items], [i[1] for i in items], max_new_tokens=max_new_tokens
    )
    parsed = [mcq.parse_answer_letter(o, i[2]) for o, i in zip(outputs, items)]
    return parsed, [p == mcq.LETTERS[i[3]] for p, i in zip(parsed, items)]


def held_out_answers(model, processor, items, max_new_tokens: int = 50) -> pd.DataFrame:
    """The held-out questions' answers as a `medift.metrics` predictions frame (one plain
    answer per question), with `fixed_order`: whether its options were in the fixed order."""
    parsed, hits = answer_held_out(model, processor, items, max_new_tokens)
    answers = metrics.plain_answers(hits, [p is None for p in parsed])
    answers["fixed_order"] = [i[4] for i in items]
    return answers


def held_out_summary(answers: pd.DataFrame) -> dict:
    """General accuracy (`medift.metrics`, fractions to 4 decimals), overall and per option format."""
    by_format = {}
    for name, wanted in (("fixed_order", True), ("shuffled", False)):
        subset = answers[answers["fixed_order"] == wanted]
        by_format[name] = {"n": len(subset), "accuracy": round(metrics.accuracy(subset), 4) if len(subset) else None}
    return {
        "general_mcq_accuracy": round(metrics.accuracy(answers), 4),
        "n": len(answers),
        "parse_failures": metrics.parse_failures(answers),
        "by_option_format": by_format,
    }


def general_mcq_accuracy(model, processor, items, max_new_tokens: int = 50) -> dict:
    return held_out_summary(held_out_answers(model, processor, items, max_new_tokens))


# ---------------------------------------------------------------- the loop


def initial_model(config: PretrainConfig, model_config: EmbeddedModelConfig):
    """A fresh model built from code, or (`init_from`) an earlier run's saved one.

    Starting from a saved run lets an expensive phase (option binding takes thousands of
    steps) be run once and its result fed to later phases, each run deterministic on its own.
    """
    if not config.init_from:
        processor = build_processor(model_config)
        return build_model(model_config, processor, config.seed), processor
    model, processor = load_base_model(config.init_from)
    merged = "A." in processor.tokenizer.get_vocab()
    if merged != model_config.letter_dot_tokens:
        raise ValueError(
            f"init_from {config.init_from}: its tokenizer has letter_dot_tokens={merged}, "
            f"but this run asks for {model_config.letter_dot_tokens}"
        )
    size = model.config.vision_config.image_size
    if size != model_config.image_size:
        raise ValueError(
            f"init_from {config.init_from}: image size {size}, this run asks for {model_config.image_size}"
        )
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    if tied != model_config.tie_word_embeddings:
        raise ValueError(
            f"init_from {config.init_from}: its embeddings are {'tied' if tied else 'untied'}, "
            f"but this run asks for tie_word_embeddings={model_config.tie_word_embeddings}"
        )
    return model, processor


def pretrain(
    config: PretrainConfig,
    model_config: EmbeddedModelConfig,
    stop_after: int | None = None,
    earlier_stages: list[dict] | None = None,
) -> dict:
    """Pre-train and save; with `stop_after`, return the first steps' history unsaved (tests).

    `earlier_stages`, the recorded histories of the runs this one descends from, are saved
    with its own, so a model made in stages says how it was made.
    """
    set_torch_threads(config.threads)
    device = resolve_device(config.device)
    if device.type == "cuda":
        # cuBLAS needs this before its first call to pick deterministic kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # The fused attention kernels' backward passes are not deterministic; the math one is.
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.use_deterministic_algorithms(True, warn_only=True)  # warns, in the log, of any op without one
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model, processor = initial_model(config, model_config)
    model.to(device)
    params = list(model.parameters())
    heads = AttributeHeads(model_config.text_hidden)
    heads.to(device)
    params += list(heads.parameters())
    value_ids = value_token_ids(processor.tokenizer)
    letter_ids = set(forced_answer_context(processor)[1].values())
    letter_dot_ids = torch.tensor(sorted(letter_ids), device=device)
    for name in ("option_flag_layer", "text_reads_image_layer"):
        if not 0 <= getattr(config, name) <= model_config.text_layers:
            raise ValueError(f"{name} {getattr(config, name)}: the decoder has layers 0..{model_config.text_layers}")
    flag_probe = None
    if config.option_flag_weight:
        if not model_config.letter_dot_tokens:
            raise ValueError("option_flag_weight needs letter_dot_tokens: the probe reads the token after each 'A.'")
        # Built only when used: runs without it draw the same random numbers as before it existed.
        flag_probe = OptionProbe(len(processor.tokenizer), model_config.text_hidden).to(device)
        params += list(flag_probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sampler = ConversationSampler(processor, config, rng, model_config.image_size)
    held_out = held_out_questions(config.eval_questions, config.seed, model_config.image_size)
    held_out_text = held_out_text_batches(processor, config, model_config.image_size, device)
    total = config.binding_steps + config.mixed_steps
    history = []
    started = time.time()
    model.train()
    bar = tqdm(range(total), desc="pretrain", mininterval=5)
    for step in bar:
        if step < config.binding_steps:
            batch = sampler.binding_batch(binding_stage(step, config))
        else:
            batch = sampler.batch(mixed_phase_config(step - config.binding_steps, config))
        batch = {key: value.to(device) for key, value in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, config)
        aux_targets = batch.pop("aux_targets", None)
        out = model(**batch, output_hidden_states=bool(config.option_flag_weight or config.text_reads_image_weight))
        loss = out.loss
        aux = torch.zeros((), device=device)
        reads = torch.zeros((), device=device)
        if aux_targets is not None:
            aux = heads.loss(image_features(out, len(batch["pixel_values"])), aux_targets)
            if config.text_reads_image_weight:
                reads = text_reads_image_loss(
                    model,
                    out.hidden_states[config.text_reads_image_layer],
                    batch["input_ids"],
                    batch["attention_mask"],
                    aux_targets,
                    value_ids,
                )
                loss = loss + config.text_reads_image_weight * reads
            loss = loss + config.aux_weight * aux
        flag = torch.zeros((), device=device)
        if config.option_flag_weight:
            rows, positions, targets = option_flags(batch["input_ids"], batch["labels"], letter_dot_ids)
            if len(rows):
                hidden = out.hidden_states[config.option_flag_layer][rows, positions]
                flag = F.binary_cross_entropy_with_logits(
                    flag_probe(hidden, batch["input_ids"][rows, positions]), targets
                )
                loss = loss + config.option_flag_weight * flag
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        record = {"step": step, "lm_loss": round(out.loss.item(), 5), "aux_loss": round(aux.item(), 5)}
        if config.option_flag_weight:
            record["flag_loss"] = round(flag.item(), 5)
        if config.text_reads_image_weight:
            record["reads_loss"] = round(reads.item(), 5)
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
            record.update(general_mcq_accuracy(model, processor, held_out[:100], max_new_tokens=8))
            for name, text_batch in held_out_text.items():
                record[f"{name}_accuracy"] = letter_accuracy(model, text_batch, letter_ids)
            model.train()
            log.info("step %d: %s", step + 1, record)
        history.append(record)
        if stop_after is not None and len(history) >= stop_after:
            return {"history": history}
        bar.set_postfix(
            {
                name: f"{record[f'{name}_loss']:.3f}"
                for name in ("lm", "aux", "flag", "reads")
                if f"{name}_loss" in record
            },
            refresh=False,
        )
    final = general_mcq_accuracy(model, processor, held_out)
    final["train_seconds"] = round(time.time() - started, 1)
    final["device"] = str(device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    record = {"config": asdict(config), "model_config": asdict(model_config), "final": final, "history": history}
    if earlier_stages is not None:
        record["earlier_stages"] = earlier_stages
    (out_dir / HISTORY_FILE).write_text(json.dumps(record, indent=1))
    log.info("final: %s", final)
    return final


# ---------------------------------------------------------------- the shipped recipe: two stages


@dataclass
class RecipeConfig:
    """The shipped base model's recipe: a run of PretrainConfig's defaults, then a refining stage.

    The refining stage starts from the first stage's saved weights with a fresh optimizer,
    fresh auxiliary heads and probe, and a new warm-up to a lower peak, then more steps of
    the held-out mix of image questions. Measured (docs/base-model-trials.md, R2 -> R2c):
    the first stage ends at 0.847 on the held-out questions, shuffled options 0.617; 1,500
    refining steps reach 0.923, shuffled 0.716. By the first stage's end its cosine schedule
    has decayed the learning rate to a tenth; a single longer run is unmeasured.
    """

    out_dir: str = field(
        default="resources/base_model", metadata={"help": "Where the final model is saved (HF layout)."}
    )
    first_stage_dir: str = field(
        default="resources/base_model_first_stage",
        metadata={
            "help": (
                "Where the first stage's model is saved; the refining stage starts from it. Reused, not retrained, "
                "when its recorded settings match this recipe's (reuse_first_stage)."
            )
        },
    )
    reuse_first_stage: bool = field(
        default=True,
        metadata={
            "help": (
                "Skip the first stage when first_stage_dir holds a finished run with this recipe's first-stage "
                "settings (thread count aside)."
            )
        },
    )
    refine_steps: int = field(
        default=1500, metadata={"help": "Mixed-phase steps of the refining stage (0: no refining stage)."}
    )
    refine_lr: float = field(
        default=1e-3, metadata={"help": "Peak learning rate of the refining stage (cosine decay to a tenth)."}
    )
    refine_warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps of the refining stage."})
    seed: int = field(default=1, metadata={"help": "Seed of both stages."})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto."})


# Settings that do not change what a stage computes (bit for bit aside) or only name its output.
NOT_RECIPE_SETTINGS = ("out_dir", "init_from", "threads", "device")


def recipe_stages(recipe: RecipeConfig) -> list[PretrainConfig]:
    """The stages' PretrainConfigs, in order; the last one saves to `recipe.out_dir`."""
    shared = {"seed": recipe.seed, "threads": recipe.threads, "device": recipe.device}
    if not recipe.refine_steps:
        return [PretrainConfig(out_dir=recipe.out_dir, **shared)]
    first = PretrainConfig(out_dir=recipe.first_stage_dir, **shared)
    refine = PretrainConfig(
        out_dir=recipe.out_dir,
        init_from=recipe.first_stage_dir,
        binding_steps=0,
        mixed_steps=recipe.refine_steps,
        two_option_steps=0,
        lr=recipe.refine_lr,
        warmup_steps=recipe.refine_warmup_steps,
        **shared,
    )
    return [first, refine]


def stage_differences(recorded: dict, config: PretrainConfig, model_config: EmbeddedModelConfig) -> list[str]:
    """The settings in which a saved run differs from `config` (NOT_RECIPE_SETTINGS aside)."""
    wanted = {key: value for key, value in asdict(config).items() if key not in NOT_RECIPE_SETTINGS}
    wanted |= asdict(model_config)
    saved = {key: value for key, value in recorded["config"].items() if key not in NOT_RECIPE_SETTINGS}
    saved |= recorded["model_config"]
    return sorted(
        key for key in wanted.keys() | saved.keys() if wanted.get(key, "(absent)") != saved.get(key, "(absent)")
    )


def read_history(out_dir: str | Path, retired: dict = RETIRED_SETTINGS) -> dict:
    """A saved run's history (HISTORY_FILE; the distillation's too, with its own `retired`),
    its earlier stages' included. A retired setting is left out of each recorded config where it
    has its off value, since the code now does what it did; set otherwise, it stays, so the run
    differs from every current config in it."""
    history = json.loads((Path(out_dir) / HISTORY_FILE).read_text())
    for run in [history, *history.get("earlier_stages", []), *filter(None, [history.get("first_stage")])]:
        run["config"] = {
            key: value for key, value in run["config"].items() if key not in retired or retired[key] != value
        }
    return history


def finished_stage(config: PretrainConfig, model_config: EmbeddedModelConfig) -> dict | None:
    """The recorded history of a finished run of `config` in its out_dir, if there is one."""
    out_dir = Path(config.out_dir)
    if not ((out_dir / HISTORY_FILE).exists() and (out_dir / "model.safetensors").exists()):
        return None
    recorded = read_history(out_dir)
    differences = stage_differences(recorded, config, model_config)
    if differences:
        log.info("not reusing %s: its settings differ in %s", out_dir, ", ".join(differences))
        return None
    return recorded


def run_stages(stages: list[PretrainConfig], model_config: EmbeddedModelConfig, reuse_first: bool = False) -> dict:
    """Run the stages in order, each from the one before (its `init_from`); the last one saves
    the earlier ones' histories with its own. With `reuse_first`, a finished first stage with
    the same settings is not run again."""
    if not stages:
        raise ValueError("no stages to run")
    earlier = []
    for index, config in enumerate(stages[:-1]):
        recorded = finished_stage(config, model_config) if reuse_first and index == 0 else None
        if recorded is not None:
            log.info(
                "stage 1 of %d: reusing %s (its recorded settings are this recipe's): %s",
                len(stages),
                config.out_dir,
                recorded["final"],
            )
        else:
            log.info("stage %d of %d: %s", index + 1, len(stages), config.out_dir)
            pretrain(config, model_config)
            recorded = read_history(config.out_dir)
        earlier.append(recorded)
    log.info("stage %d of %d: %s", len(stages), len(stages), stages[-1].out_dir)
    return pretrain(stages[-1], model_config, earlier_stages=earlier)
