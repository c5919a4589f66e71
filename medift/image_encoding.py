"""Each image encoded once, for every prompt about it (the evaluation's `encode_once`).

An evaluation asks many prompts about one image (every question of the image, each in every
option rotation). The image's encoding (vision tower and projector) does not depend on the
prompt's text, so it is computed once per image and handed to the model's own `generate` for
each batch of prompts, in the form the family's forward takes instead of pixels (the fact
`image_encoding` of medift/model/families.py):

- CROSS_ATTENTION_STATES (Mllama): `cross_attention_states`, the vision model's output through
  the projector, exactly as `MllamaModel.forward` computes it from `pixel_values` (which it then
  skips); the processor's `cross_attention_mask` is kept as it is. `generate` forwards a keyword
  it does not know at every step, and a cross-attention layer given states appends them to its
  cache again, so while generating they are dropped after the prefill, as `generate` drops
  pixels (`generating`);
- PLACEHOLDER_FEATURES (LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics3, Gemma 3, InternVL):
  transformers' `mm_encoder_outputs`, the projected features that fill the image's placeholder
  tokens: row i of the flattened features fills the i-th placeholder of the batch in (row,
  position) order. `get_image_features` runs on each new image (with its own prompt's text, so
  the processor tiles and expands it as in the batch), its features are kept per image, and a
  batch's features are its rows' images' in row order; every other processor output (grids,
  masks, token types, which position ids come from) stays as it was.

The prompts' own text then runs as before: the same input ids, masks and positions, the same
generate loop. A family without the fact, a model whose forward lacks the keyword, or a batch
with a text-only row is run as before (pixels, encoded per prompt).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from medift.model.families import CROSS_ATTENTION_STATES, FAMILIES, PLACEHOLDER_FEATURES

# Processor outputs that are pixels (what an encoding replaces); the rest of a batch is kept.
PIXEL_KEYS = ("pixel_values",)
# Mllama's pixel-side inputs, used by its vision model only.
MLLAMA_PIXEL_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


def encoding_kind(model) -> str | None:
    """How `model` takes a precomputed image encoding (medift/model/families.py), or None: not at all."""
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    kind = family.image_encoding if family is not None else None
    if kind is None or kind not in inspect.signature(model.forward).parameters:
        return None
    return kind


def grouped_order(images: Sequence) -> list[int]:
    """Prompt indices with each image's prompts together: images in order of first appearance (the
    same object is the same image), prompts in their own order within an image; text-only prompts last."""
    groups: dict[int, list[int]] = {}
    text_only = []
    for i, image in enumerate(images):
        if image is None:
            text_only.append(i)
        else:
            groups.setdefault(id(image), []).append(i)
    return [i for group in groups.values() for i in group] + text_only


class ImageEncodings:
    """The encodings of the images seen so far that later batches still need, keyed by image object."""

    def __init__(self, model, processor, kind: str):
        if kind not in (CROSS_ATTENTION_STATES, PLACEHOLDER_FEATURES):
            raise ValueError(f"unknown image encoding {kind!r}")
        self.model, self.processor, self.kind = model, processor, kind
        self.encoded: dict[int, torch.Tensor] = {}
        self.output_type = None  # PLACEHOLDER_FEATURES: the family's encoder output class
        self.as_tensor = False  # ... and whether its pooler_output is a tensor (else a list)

    def inputs(self, batch: dict, texts: Sequence[str], images: Sequence) -> dict:
        """The batch's generate inputs with its pixels replaced by its rows' images' encodings
        (computing those not yet kept); a batch with a text-only row, or a row on several images
        (a benchmark's), is returned as it is: those rows encode their images themselves."""
        if any(image is None or isinstance(image, (list, tuple)) for image in images):
            return batch
        first_row: dict[int, int] = {}
        for row, image in enumerate(images):
            if id(image) not in self.encoded:
                first_row.setdefault(id(image), row)
        if first_row:
            rows = list(first_row.values())
            encode = self._encode_cross_attention if self.kind == CROSS_ATTENTION_STATES else self._encode_features
            encoded = encode(batch, [texts[r] for r in rows], [images[r] for r in rows], rows)
            self.encoded.update(zip(first_row, encoded))
        per_row = [self.encoded[id(image)] for image in images]
        if self.kind == CROSS_ATTENTION_STATES:
            return self._cross_attention_inputs(batch, per_row)
        return self._feature_inputs(batch, per_row)

    def forget(self, keys) -> None:
        """Drop the encodings of these images (keys: `id(image)`; no later batch asks about them)."""
        for key in list(keys):
            self.encoded.pop(key, None)

    # ---- Mllama: cross-attention states

    def _encode_cross_attention(self, batch: dict, texts, images, rows: list[int]) -> list[torch.Tensor]:
        """The rows' vision model output through the projector, as MllamaModel.forward makes it, one
        (tokens, hidden) tensor per row (its images x tiles x patches, in the forward's order)."""
        base = self.model.base_model
        index = torch.tensor(rows, device=batch["pixel_values"].device)
        vision = base.vision_model(**{key: batch[key].index_select(0, index) for key in MLLAMA_PIXEL_KEYS})
        states = base.multi_modal_projector(vision.last_hidden_state)
        return list(states.reshape(len(rows), -1, states.shape[-1]))

    def _cross_attention_inputs(self, batch: dict, per_row: list[torch.Tensor]) -> dict:
        inputs = {key: value for key, value in batch.items() if key not in MLLAMA_PIXEL_KEYS}
        states = torch.stack(per_row)
        mask = batch.get("cross_attention_mask")
        if mask is not None:
            patches = self.model.base_model.vision_model.num_patches
            if states.shape[1] != mask.shape[2] * mask.shape[3] * patches:
                raise ValueError(
                    f"cross-attention states of {states.shape[1]} tokens do not match the batch's mask "
                    f"({mask.shape[2]} images x {mask.shape[3]} tiles x {patches} patches)"
                )
        inputs[CROSS_ATTENTION_STATES] = states
        return inputs

    # ---- image tokens in the sequence: placeholder features

    def _encode_features(self, batch: dict, texts, images, rows: list[int]) -> list[torch.Tensor]:
        """Each image's projected features, (placeholder tokens, hidden): `get_image_features` on the
        images with their own prompts (the processor tiles and expands each image as in the batch)."""
        from medift.chat import images_argument
        from medift.generation import to_model

        own = self.processor(
            text=list(texts),
            images=images_argument(images),
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,
        )
        own = to_model(self.model, dict(own))
        encoder = self.model.base_model.get_image_features
        arguments = {key: own[key] for key in inspect.signature(encoder).parameters if key in own}
        output = encoder(**arguments, return_dict=True)
        if getattr(output, "deepstack_features", None) is not None:
            raise ValueError("image features with deepstack features are not handled; set encode_once false")
        features = output.pooler_output
        self.output_type, self.as_tensor = type(output), isinstance(features, torch.Tensor)
        flat = torch.cat([feature.reshape(-1, feature.shape[-1]) for feature in features])
        counts = (own["input_ids"] == self.image_token_id()).sum(1).tolist()
        if sum(counts) != flat.shape[0]:
            raise ValueError(f"{flat.shape[0]} image feature rows for {sum(counts)} image placeholders")
        return list(flat.split(counts))

    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def _feature_inputs(self, batch: dict, per_row: list[torch.Tensor]) -> dict:
        counts = (batch["input_ids"] == self.image_token_id()).sum(1).tolist()
        if counts != [len(features) for features in per_row]:
            raise ValueError(
                f"the batch's image placeholders per row {counts} are not its images' feature rows "
                f"{[len(features) for features in per_row]}"
            )
        flat = torch.cat(per_row)
        pooled = flat.unsqueeze(0) if self.as_tensor else [flat]
        inputs = {key: value for key, value in batch.items() if key not in PIXEL_KEYS}
        inputs[PLACEHOLDER_FEATURES] = {"image": self.output_type(pooler_output=pooled)}
        return inputs


@contextmanager
def generating(model, inputs: dict):
    """While open, `model.generate` with `inputs` works as with pixels: cross-attention states given
    to it reach the model at the prefill only (the layers cache them), as `generate` does with
    pixels; other inputs need nothing."""
    if CROSS_ATTENTION_STATES not in inputs:
        yield
        return
    prepare = model.prepare_inputs_for_generation

    @functools.wraps(prepare)
    def prefill_only(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        # Mllama's own rule for its pixels: past the prefill, with a cache, the layers hold the states.
        if not kwargs.get("is_first_iteration") and kwargs.get("use_cache"):
            prepared.pop(CROSS_ATTENTION_STATES, None)
        return prepared

    own = model.__dict__.get("prepare_inputs_for_generation")
    model.prepare_inputs_for_generation = prefill_only
    try:
        yield
    finally:
        if own is None:
            del model.prepare_inputs_for_generation
        else:
            model.prepare_inputs_for_generation = own
