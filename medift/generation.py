"""Batched answering of (image, instruction) prompts: greedy generation and letter scoring.

Both paths build their inputs with the one model-input builder (`medift.chat.model_inputs`,
left padding) and run through the model's own `generate`, which derives every family's
positions from the attention mask (1-D for Llama-style decoders, 3-D M-RoPE for Qwen),
so a prompt's answer does not depend on which prompts share its batch.

With `encode_once`, the prompts are batched image by image and each image is encoded once
for all the prompts about it (medift.image_encoding); the answers are returned in the
prompts' order and are the same as without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from medift import mcq
from medift.chat import IGNORE_INDEX, encode_conversation, encode_prompt, model_inputs, render, user_message
from medift.image_encoding import ImageEncodings, encoding_kind, generating, grouped_order


@dataclass(kw_only=True)
class JudgedSamplingConfig:
    """Settings shared by the data-making jobs that sample a model's answers and have a judge rate
    them (medift.vital's candidates, medift.self_training's preferences); keyword-only, so each
    job's own required fields stay first."""

    judge: str = field(
        default='{"kind": "offline"}', metadata={"help": "The judge's settings as JSON (medift.judge.make_judge)."}
    )
    judge_cache: str = field(default="", metadata={"help": "Directory of a hosted judge's cache of calls."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per forward."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda."})
    threads: int = field(default=1, metadata={"help": "Torch threads."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Only for checkpoints that need it."})


def prompt_batch(
    model, processor, instructions: Sequence[str], images: Sequence[Image.Image | None], answer_start: str = ""
) -> dict:
    """Left-padded prompts (no labels: nothing to predict) on the model's device, pixels in its dtype."""
    return _prompt_batch(model, processor, instructions, images, answer_start)[0]


def _prompt_batch(model, processor, instructions, images, answer_start: str) -> tuple[dict, list[str]]:
    rows = [
        encode_prompt(processor, text, image_count(image), answer_start) for text, image in zip(instructions, images)
    ]
    batch = model_inputs(processor, rows, list(images), padding_side="left")
    batch.pop("labels")
    return to_model(model, batch), [row.text for row in rows]


def prompt_batches(
    model,
    processor,
    instructions: Sequence[str],
    images: Sequence[Image.Image | None],
    batch_size: int,
    answer_start: str = "",
    encode_once: bool = False,
):
    """(prompt indices, generate inputs) per batch of `batch_size` prompts.

    Without `encode_once` (or for a family without a precomputed image encoding,
    medift/model/families.py): the prompts in order, each batch as `prompt_batch` makes it.
    With it: the prompts grouped by image (`grouped_order`), and each batch's pixels replaced
    by its images' encodings, computed the first time an image is met and kept until its last
    prompt has been batched (medift.image_encoding)."""
    kind = encoding_kind(model) if encode_once else None
    if kind is None:
        order, encodings = list(range(len(instructions))), None
    else:
        order, encodings = grouped_order(images), ImageEncodings(model, processor, kind)
        last_use = {id(images[i]): position for position, i in enumerate(order)}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch, texts = _prompt_batch(
            model, processor, [instructions[i] for i in chunk], [images[i] for i in chunk], answer_start
        )
        if encodings is not None:
            batch = encodings.inputs(batch, texts, [images[i] for i in chunk])
        yield chunk, batch
        if encodings is not None:
            encodings.forget(key for key in encodings.encoded if last_use[key] < start + len(chunk))


def image_count(image) -> int:
    """Images of a prompt: none, one, or a list of them (a question on several images)."""
    return 0 if image is None else len(image) if isinstance(image, (list, tuple)) else 1


def to_model(model, batch: dict) -> dict:
    """Tensors on the model's device; floating ones (pixels) in its dtype, ids and masks as they are."""
    return {
        key: value.to(model.device, dtype=model.dtype if value.is_floating_point() else None)
        for key, value in batch.items()
    }


@torch.no_grad()
def generate_answers(
    model,
    processor,
    instructions: Sequence[str],
    images: Sequence[Image.Image | None],
    max_new_tokens: int = 50,
    batch_size: int = 32,
    progress=None,
    min_new_tokens: int = 0,
    encode_once: bool = False,
) -> list[str]:
    """Greedy decoding after each prompt; returns the decoded new text per prompt.

    `min_new_tokens` > 0 suppresses the end of sequence until then (benchmarks use it to
    time the full budget, as a model that explains its answer would use it). `encode_once`:
    each image encoded once for all its prompts (`prompt_batches`); the same answers.
    """
    tokenizer = processor.tokenizer
    model.eval()
    outputs: list[str] = [""] * len(instructions)
    for chunk, batch in prompt_batches(model, processor, instructions, images, batch_size, encode_once=encode_once):
        with generating(model, batch):
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens or None,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text.strip()
        if progress is not None:
            progress.update(len(new_tokens))
    return outputs


@torch.no_grad()
def sample_texts(
    model,
    processor,
    rows: Sequence,
    images: Sequence[Image.Image | None],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int = 32,
    progress=None,
) -> list[str]:
    """Sampled continuations of encoded prompts (`medift.chat.Encoded`, any number of turns, ending
    where the model is to write), at `temperature` and nucleus `top_p`. Each batch's draws are
    seeded by (seed, its first row), so a rerun with the same rows and batch size samples the same."""
    tokenizer = processor.tokenizer
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, min(start + batch_size, len(rows)))
        batch = model_inputs(processor, rows[chunk], list(images[chunk]), padding_side="left")
        batch.pop("labels")
        batch = to_model(model, batch)
        torch.manual_seed(seed * 1_000_003 + start)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(new_tokens))
    return [text.strip() for text in outputs]


def forced_answer_context(processor, n_letters: int = len(mcq.LETTERS)) -> tuple[str, dict[str, int]]:
    """The answer prefix as the chat template writes it (text), and each letter's token after it.

    The responses `The correct answer is A.`, `... B.`, ... are encoded through the chat
    builder exactly as in training; their longest common token beginning is the forced
    prefix (whatever spacing the template and tokenizer put there: " The" for BPE, "The"
    for a word-level tokenizer), cut from the rendered text where the first differing
    token starts, and that token is the letter's. The prompt followed by the prefix must
    tokenize as the start of the training sequence, and no two letters may share a token:
    either failing is an error, not a silently wrong score.
    """
    letters = mcq.LETTERS[:n_letters]
    encoded = [
        encode_conversation(processor, ["?"], [mcq.format_answer(mcq.LETTERS.index(letter))], with_image=False)
        for letter in letters
    ]
    responses = [[t for t, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX] for e in encoded]
    common = 0
    while all(len(r) > common and r[common] == responses[0][common] for r in responses):
        common += 1
    letter_ids = {letter: response[common] for letter, response in zip(letters, responses)}
    if len(set(letter_ids.values())) != len(letter_ids):
        raise ValueError("the tokenizer gives two answer letters the same first token after the answer prefix")
    prompt_text = render(processor, [user_message("?", False)], True)
    n_prompt = len(encoded[0].input_ids) - len(responses[0])
    offsets = processor.tokenizer(encoded[0].text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    prefix_text = encoded[0].text[len(prompt_text) : offsets[n_prompt + common][0]]
    forced = encode_prompt(processor, "?", False, prefix_text).input_ids
    if forced != encoded[0].input_ids[: n_prompt + common]:
        raise ValueError(f"the answer prefix {prefix_text!r} does not tokenize after the prompt as in training")
    return prefix_text, letter_ids


@torch.no_grad()
def score_letters(
    model,
    processor,
    instructions: Sequence[str],
    images: Sequence[Image.Image | None],
    n_options: Sequence[int],
    batch_size: int = 32,
    progress=None,
    encode_once: bool = False,
) -> list[dict[str, float]]:
    """Next-token logits of the valid option letters after the forced answer prefix.

    One forward pass per question (batched, through `generate` with one new token, so
    positions and caches are the family's own): the prompt, then `The correct answer is`,
    and the logits of the last position restricted to the letters of that question's
    options. Returns {letter: logit} per question; the prediction is its argmax
    (`best_letter`), so a letter outside the options can never be predicted. `encode_once`:
    each image encoded once for all its prompts (`prompt_batches`); the same scores.
    """
    prefix_text, letter_ids = forced_answer_context(processor, max(n_options))
    model.eval()
    scores: list[dict[str, float]] = [{} for _ in instructions]
    for chunk, batch in prompt_batches(
        model, processor, instructions, images, batch_size, prefix_text, encode_once=encode_once
    ):
        with generating(model, batch):
            out = model.generate(
                **batch,
                max_new_tokens=1,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        logits = out.logits[0].float()
        for row, i in enumerate(chunk):
            scores[i] = {letter: float(logits[row, letter_ids[letter]]) for letter in mcq.option_letters(n_options[i])}
        if progress is not None:
            progress.update(len(chunk))
    return scores


def best_letter(letter_scores: dict[str, float]) -> str:
    """The highest-scoring letter; a tie goes to the earliest letter (deterministic)."""
    return max(letter_scores, key=lambda letter: (letter_scores[letter], -ord(letter)))


@torch.no_grad()
def pooled_hidden_states(
    model, processor, rows: Sequence, images: Sequence[Image.Image | None], batch_size: int = 32, progress=None
) -> torch.Tensor:
    """The mean of the last layer's hidden states over each encoded row's tokens (float32, one row
    per input): the model's own features of an image prompt or of a text, for models that score
    data (medift.vital's selection model)."""
    model.eval()
    pooled = []
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, min(start + batch_size, len(rows)))
        batch = model_inputs(processor, rows[chunk], list(images[chunk]), padding_side="right")
        batch.pop("labels")
        batch = to_model(model, batch)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
        if progress is not None:
            progress.update(len(hidden))
    return torch.cat(pooled).cpu() if pooled else torch.empty(0)
