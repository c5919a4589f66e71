"""The one chat and model-input builder: (image, user turns, responses) -> every tensor the model takes.

Two layers, used by every step (pre-training, fine-tuning, letter scoring, generation):
- `encode_conversation` / `encode_prompt` render the processor's own chat template and
  tokenize the text with the plain tokenizer, marking the response tokens for the loss;
- `model_inputs` hands the rendered texts and their images to the family's own processor,
  so image-token expansion, tiles, grids and masks (`aspect_ratio_ids`,
  `cross_attention_mask`, `image_grid_thw`, `pixel_attention_mask`, `token_type_ids`, ...)
  are the processor's, and carries the labels over to the processor's ids.
Nothing here knows a model family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
# The fixed instruction of caption fine-tuning (method.md's no-proxy baseline).
CAPTION_INSTRUCTION = "Describe this medical scan."


@dataclass
class Encoded:
    input_ids: list[int]  # plain tokenizer ids of `text` (image placeholders not expanded)
    labels: list[int]  # IGNORE_INDEX outside assistant responses
    has_image: bool
    text: str | None = None  # the rendered chat text the processor is given


def user_message(text: str, with_image: bool | int) -> dict:
    """A user turn: `with_image` image placeholders (True: one), then the text."""
    content = [{"type": "image"}] * int(with_image) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_text(processor, text: str) -> list[int]:
    """Plain token ids of rendered chat text (the template writes every special token itself)."""
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(
    processor,
    user_turns: list[str],
    responses: list[str],
    with_image: bool,
    learn_questions: Sequence[bool] | None = None,
) -> Encoded:
    """Token ids and labels for a conversation whose loss is on the responses.

    Each response's tokens are found as the difference between the rendering that
    ends with the generation prompt and the rendering that ends with the response,
    so any chat template works; a template whose rendering or tokenization is not
    prefix-stable is an error rather than a silently shifted mask.

    `learn_questions` (one flag per turn; STLLaVA-Med's first stage, medift.objectives.keep_flags)
    also labels each flagged user turn i > 0: the tokens that rendering that user message adds
    after the previous assistant turn, up to (not including) the generation prompt, i.e. the
    template's role marker, the question and its end-of-turn marker where the template has one
    (Llama 3: `<|start_header_id|>user<|end_header_id|>\\n\\n` + question + `<|eot_id|>`;
    Vicuna/LLaVA-1.5: `USER: ` + question). Precisely: the longest run of the prompt's new tokens
    that the conversation rendered without the generation prompt tokenizes to as well, so a token
    merged across the boundary with the generation prompt is left out. The first turn (the one
    with the image) is never learned; with no flag set the result is the plain one.
    """
    if len(user_turns) != len(responses):
        raise ValueError("every user turn needs a response")
    learn = list(learn_questions) if learn_questions is not None else [False] * len(user_turns)
    if len(learn) != len(user_turns):
        raise ValueError("learn_questions needs one flag per user turn")
    if learn and learn[0]:
        raise ValueError("the first user turn (the one with the image) is never kept in the loss")
    messages: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    for i, (user, response) in enumerate(zip(user_turns, responses)):
        messages.append(user_message(user, with_image and i == 0))
        prompt_text = render(processor, messages, True)
        messages.append(assistant_message(response))
        full_text = render(processor, messages, False)
        if not (prompt_text.startswith(text) and full_text.startswith(prompt_text)):
            raise ValueError("the chat template's rendering is not prefix-stable; cannot mask the prompt")
        prompt_ids, full_ids = tokenize_text(processor, prompt_text), tokenize_text(processor, full_text)
        if prompt_ids[: len(ids)] != ids or full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("chat template tokenization is not prefix-stable; cannot mask the prompt")
        kept = _user_turn_length(processor, messages[:-1], text, ids, prompt_text, prompt_ids) if learn[i] else 0
        labels += prompt_ids[len(ids) : len(ids) + kept]
        labels += [IGNORE_INDEX] * (len(prompt_ids) - len(ids) - kept)
        labels += full_ids[len(prompt_ids) :]
        ids, text = full_ids, full_text
    return Encoded(ids, labels, with_image, text)


def _user_turn_length(
    processor,
    messages: list[dict],
    previous_text: str,
    previous_ids: list[int],
    prompt_text: str,
    prompt_ids: list[int],
) -> int:
    """How many of the prompt's new tokens (after `previous_ids`) belong to the last user message's own rendering."""
    user_text = render(processor, messages, False)
    if not (user_text.startswith(previous_text) and prompt_text.startswith(user_text)):
        raise ValueError("the chat template's rendering of a user turn is not prefix-stable; cannot label the question")
    user_ids = tokenize_text(processor, user_text)
    if user_ids[: len(previous_ids)] != previous_ids:
        raise ValueError("chat template tokenization of a user turn is not prefix-stable; cannot label the question")
    common = len(previous_ids)
    while common < min(len(user_ids), len(prompt_ids)) and user_ids[common] == prompt_ids[common]:
        common += 1
    if common == len(previous_ids):
        raise ValueError("no token of the user turn survives in the prompt's tokenization; cannot label the question")
    return common - len(previous_ids)


def encode_prompt(processor, user_text: str, with_image: bool | int, answer_start: str = "") -> Encoded:
    """A single user turn (`with_image` images: True is one), the generation prompt and
    `answer_start` (the forced start of the answer)."""
    text = render(processor, [user_message(user_text, with_image)], True) + answer_start
    ids = tokenize_text(processor, text)
    return Encoded(ids, [IGNORE_INDEX] * len(ids), bool(with_image), text)


def images_argument(images: Sequence) -> list | None:
    """Images as processors take them for a batch: one list per row (empty: a text-only row; a
    row given a list of images, a question on several, keeps them all)."""
    if all(image is None for image in images):
        return None

    def row(image) -> list:
        return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]

    return [row(image) for image in images]


def model_inputs(
    processor, rows: Sequence[Encoded], images: Sequence, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Every tensor the model takes for a batch of rows, made by the family's own processor.

    Right padding for training, left for generation and scoring (prompts flush against the
    answer). Labels: each row's response labels are carried over to the processor's ids;
    the processor only expands the image placeholder, which sits before every response, so
    a row's ids after it must equal the plain tokenization's, which is checked.
    """
    if len(rows) != len(images) or any(row.has_image != (image is not None) for row, image in zip(rows, images)):
        raise ValueError("every row needs its image (and only rows with an image have one)")
    if any(row.text is None for row in rows):
        raise ValueError("model_inputs needs the rendered text of every row")
    batch = processor(
        text=[row.text for row in rows],
        images=images_argument(images),
        padding=True,
        padding_side=padding_side,
        return_tensors="pt",
        add_special_tokens=False,
    )
    batch = dict(batch)
    batch["labels"] = carried_labels(batch["input_ids"], batch["attention_mask"], rows, padding_side)
    return batch


def carried_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[Encoded], padding_side: str
) -> torch.Tensor:
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    width = input_ids.shape[1]
    for r, row in enumerate(rows):
        n = int(attention_mask[r].sum())
        start = width - n if padding_side == "left" else 0
        made = input_ids[r, start : start + n].tolist()
        added = n - len(row.input_ids)  # image tokens the processor added
        # The part that must be the plain tokenization's: all of a text-only row; from the first
        # response on in a row with an image (nothing, for a prompt).
        if not row.has_image:
            tail = len(row.input_ids)
        else:
            first = next((i for i, label in enumerate(row.labels) if label != IGNORE_INDEX), len(row.input_ids))
            tail = len(row.input_ids) - first
        if added < 0 or (not row.has_image and added) or made[n - tail :] != row.input_ids[len(row.input_ids) - tail :]:
            raise ValueError(
                f"row {r}: the processor's token ids do not extend the chat's tokenization "
                f"({len(row.input_ids)} plain ids, {n} from the processor); cannot place the labels"
            )
        labels[r, start + added : start + n] = torch.tensor(row.labels, dtype=labels.dtype)
    return labels


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad plain token ids (text-only rows; raw-id sequences of pre-training) to the longest sequence."""
    if any(e.has_image for e in batch):
        raise ValueError("rows with an image go through model_inputs (the processor expands the image)")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
