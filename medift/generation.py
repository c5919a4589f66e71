"""Batched greedy answering of (image, instruction) prompts: the one generation path."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from medift.chat import IGNORE_INDEX, Encoded, collate, encode_prompt


def pixel_values_for(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    return processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]


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
) -> list[str]:
    """Greedy decoding after each prompt; returns the decoded new text per prompt.

    Left padding with its attention mask keeps every prompt flush against the
    generated tokens, so a prompt's answer does not depend on its batch neighbours.
    """
    tokenizer = processor.tokenizer
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(instructions), batch_size):
        chunk = range(start, min(start + batch_size, len(instructions)))
        encoded = [prompt_only(processor, instructions[i], images[i] is not None) for i in chunk]
        batch = collate(encoded, tokenizer.pad_token_id, pad_left=True)
        batch.pop("labels")  # a prompt has nothing to predict; generate() takes no labels
        chunk_images = [images[i] for i in chunk if images[i] is not None]
        if chunk_images:
            batch["pixel_values"] = pixel_values_for(processor, chunk_images).to(model.dtype)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(chunk))
    return [text.strip() for text in outputs]
