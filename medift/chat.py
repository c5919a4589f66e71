"""The one chat/prompt builder: turns (image, user turns, responses) into model inputs.

Every step (pre-training, fine-tuning, evaluation) goes through `encode_conversation`
so the model sees exactly one prompt format: the processor's own chat template.
For a real checkpoint that is its shipped template (e.g. Llama-3.2-Vision's), for
the embedded default the template written in `medift.model.embedded`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
# The fixed instruction of caption fine-tuning (method.md's no-proxy baseline).
CAPTION_INSTRUCTION = "Describe this medical scan."


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant responses
    has_image: bool


def user_message(text: str, with_image: bool) -> dict:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def image_token_count(processor) -> int:
    """How many placeholder tokens one image takes in the text.

    LLaVA-style models scatter one feature per patch into the text, so the processor
    repeats its image token; cross-attention models (Mllama) keep a single token.
    """
    patch = getattr(processor, "patch_size", None)
    if not patch:
        return 1
    crop = processor.image_processor.crop_size
    n = (crop["height"] // patch) * (crop["width"] // patch)
    n += getattr(processor, "num_additional_image_tokens", 0)
    if getattr(processor, "vision_feature_select_strategy", "default") == "default":
        n -= 1  # the CLS feature is dropped
    return n


def tokenize_text(processor, text: str) -> list[int]:
    """Token ids of rendered chat text, image placeholders expanded as the processor does."""
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token in text:
        text = text.replace(image_token, image_token * image_token_count(processor))
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(
    processor, user_turns: list[str], responses: list[str], with_image: bool
) -> Encoded:
    """Token ids and labels for a conversation whose loss is on the responses only.

    Each response's tokens are found as the difference between the rendering that
    ends with the generation prompt and the rendering that ends with the response,
    so any chat template works; a template whose tokenization is not prefix-stable
    is an error rather than a silently shifted mask.
    """
    if len(user_turns) != len(responses):
        raise ValueError("every user turn needs a response")
    messages: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    for i, (user, response) in enumerate(zip(user_turns, responses)):
        messages.append(user_message(user, with_image and i == 0))
        prompt_ids = tokenize_text(processor, render(processor, messages, True))
        messages.append(assistant_message(response))
        full_ids = tokenize_text(processor, render(processor, messages, False))
        if prompt_ids[: len(ids)] != ids or full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("chat template tokenization is not prefix-stable; cannot mask the prompt")
        labels += [IGNORE_INDEX] * (len(prompt_ids) - len(ids))
        labels += full_ids[len(prompt_ids) :]
        ids = full_ids
    return Encoded(ids, labels, with_image)


def encode_prompt(processor, user_text: str, with_image: bool) -> list[int]:
    """Token ids of a single user turn followed by the generation prompt (evaluation)."""
    return tokenize_text(processor, render(processor, [user_message(user_text, with_image)], True))


def collate(batch: list[Encoded], pad_id: int, pad_left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence. Left padding for generation keeps prompts flush right."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        span = slice(width - n, width) if pad_left else slice(0, n)
        input_ids[row, span] = torch.tensor(e.input_ids)
        labels[row, span] = torch.tensor(e.labels)
        attention[row, span] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
