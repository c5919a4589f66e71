"""Batched answering of (image, instruction) prompts: greedy generation and letter scoring.

Both paths build prompts with the one chat builder (`medift.chat`), pad on the left and
give the model explicit position ids, so a prompt's answer does not depend on which
prompts share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from medift import mcq
from medift.chat import IGNORE_INDEX, Encoded, collate, encode_conversation, encode_prompt


def pixel_values_for(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    return processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def left_padded_batch(model, processor, encoded: list[Encoded], images: Sequence[Image.Image | None]) -> dict:
    """Prompts padded on the left (no labels: nothing to predict) with their images' pixels."""
    batch = collate(encoded, processor.tokenizer.pad_token_id, pad_left=True)
    batch.pop("labels")
    present = [image for image in images if image is not None]
    if present:
        batch["pixel_values"] = pixel_values_for(processor, present).to(model.dtype)
    return {key: value.to(model.device) for key, value in batch.items()}


def prompt_only(processor, instruction: str, with_image: bool) -> Encoded:
    ids = encode_prompt(processor, instruction, with_image)
    return Encoded(ids, [IGNORE_INDEX] * len(ids), with_image)


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
) -> list[str]:
    """Greedy decoding after each prompt; returns the decoded new text per prompt.

    Left padding with its attention mask keeps every prompt flush against the
    generated tokens, so a prompt's answer does not depend on its batch neighbours.
    `min_new_tokens` > 0 suppresses the end of sequence until then (benchmarks use it to
    time the full budget, as a model that explains its answer would use it).
    """
    tokenizer = processor.tokenizer
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(instructions), batch_size):
        chunk = range(start, min(start + batch_size, len(instructions)))
        batch = left_padded_batch(model, processor, [prompt_only(processor, instructions[i], images[i] is not None) for i in chunk],
                                  [images[i] for i in chunk])
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(chunk))
    return [text.strip() for text in outputs]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as generate() derives them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def forced_answer_context(processor, n_letters: int = len(mcq.LETTERS)) -> tuple[list[int], dict[str, int]]:
    """Token ids of the answer prefix as the chat template writes it, and each letter's token.

    The responses `The correct answer is A.`, `... B.`, ... are encoded through the chat
    builder exactly as in training; their longest common beginning is the forced prefix
    (whatever spacing the template and tokenizer put there: " The" for BPE, "The" for a
    word-level tokenizer) and the first token where they differ is the letter's token.
    Two letters sharing that token is an error, not a silently wrong score.
    """
    letters = mcq.LETTERS[:n_letters]
    responses = []
    for letter in letters:
        encoded = encode_conversation(processor, ["?"], [mcq.format_answer(mcq.LETTERS.index(letter))], with_image=False)
        responses.append([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    common = 0
    while all(len(r) > common and r[common] == responses[0][common] for r in responses):
        common += 1
    letter_ids = {letter: response[common] for letter, response in zip(letters, responses)}
    if len(set(letter_ids.values())) != len(letter_ids):
        raise ValueError("the tokenizer gives two answer letters the same first token after the answer prefix")
    return responses[0][:common], letter_ids


@torch.no_grad()
def score_letters(
    model,
    processor,
    instructions: Sequence[str],
    images: Sequence[Image.Image | None],
    n_options: Sequence[int],
    batch_size: int = 32,
    progress=None,
) -> list[dict[str, float]]:
    """Next-token logits of the valid option letters after the forced answer prefix.

    One forward pass per question (batched): the prompt, then `The correct answer is`,
    and the logits of the last position restricted to the letters of that question's
    options. Returns {letter: logit} per question; the prediction is its argmax
    (`best_letter`), so a letter outside the options can never be predicted.
    """
    prefix_ids, letter_ids = forced_answer_context(processor, max(n_options))
    model.eval()
    scores: list[dict[str, float]] = []
    for start in range(0, len(instructions), batch_size):
        chunk = range(start, min(start + batch_size, len(instructions)))
        encoded = []
        for i in chunk:
            ids = encode_prompt(processor, instructions[i], images[i] is not None) + prefix_ids
            encoded.append(Encoded(ids, [IGNORE_INDEX] * len(ids), images[i] is not None))
        batch = left_padded_batch(model, processor, encoded, [images[i] for i in chunk])
        batch["position_ids"] = position_ids_for(batch["attention_mask"])
        # Only the last position is needed: logits_to_keep=1 skips the vocabulary projection elsewhere.
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :].float()
        for row, i in enumerate(chunk):
            letters = mcq.option_letters(n_options[i])
            scores.append({letter: float(logits[row, letter_ids[letter]]) for letter in letters})
        if progress is not None:
            progress.update(len(chunk))
    return scores


def best_letter(letter_scores: dict[str, float]) -> str:
    """The highest-scoring letter; a tie goes to the earliest letter (deterministic)."""
    return max(letter_scores, key=lambda letter: (letter_scores[letter], -ord(letter)))
