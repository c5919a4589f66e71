"""Each image encoded once for all its prompts (EvaluateConfig.encode_once, medift.image_encoding).

On the committed embedded Mllama and on tiny random Mllama, LLaVA and Qwen2-VL checkpoints (the
two ways of taking an image: cross-attention states, and features filling placeholder tokens,
Qwen2-VL's with 3-D M-RoPE positions), real shard questions asked in every rotation give the same
generated text, parsed letters and letter scores with encode_once on and off, at batch 1 and 8,
while the vision tower sees each image once instead of once per prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import pandas as pd
import pytest
import torch
from PIL import Image

from medift import mcq
from medift.evaluate import EvaluateConfig, asked_prompts, score_questions, scoring_settings
from medift.generation import generate_answers, score_letters
from medift.image_encoding import encoding_kind, generating, grouped_order
from medift.images import decode_image
from medift.model import families
from medift.model.loading import load_base_model
from medift.shards import load_questions
from medift.testing.tiny_checkpoints import build_tiny, build_tiny_checkpoint, family_names

EMBEDDED = "models/embedded-mllama"
MODELS = ("embedded-mllama", "mllama", "llava", "qwen2_vl")
# The letter scores of the two paths may differ only by float32 rounding: the same arithmetic on the
# same values, the vision tower run on other images beside them and the prompts in batches of other
# prompts (other padding widths, so other summation orders in the matrix products and the
# attention): a few units of float32's 1.2e-7 per layer, relative to the largest logit of the row.
# Measured: bitwise equal on the Mllamas and LLaVA, 2.5e-7 on Qwen2-VL (its M-RoPE positions).
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as an evaluation job runs by default (evaluate.threads): on a shared
    machine more threads than free cores make every small matmul wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def questions(tiny_wbcatt_shards):
    """The synthetic release's test and validation questions: one per image (as the pipeline asks
    WBCAtt), of 2-6 options, so every image has 2-6 prompts when asked in every rotation (at
    batch 8 some images' prompts span two batches)."""
    return pd.concat([load_questions(tiny_wbcatt_shards, split) for split in ("test", "val")], ignore_index=True)


@functools.cache
def loaded(name: str, root: str):
    path = EMBEDDED if name == "embedded-mllama" else str(build_tiny_checkpoint(name, f"{root}/{name}", seed=0))
    model, processor = load_base_model(path)
    return model.eval(), processor


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("encode-once"))


def vision_module(model):
    base = model.base_model
    return next(getattr(base, name) for name in ("vision_model", "vision_tower", "visual") if hasattr(base, name))


class ImagesEncoded:
    """Counts the images the vision tower encodes (a forward pre-hook)."""

    def __init__(self, model):
        self.count = 0
        self.handle = vision_module(model).register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        grid = kwargs.get("grid_thw")  # Qwen2-VL: flattened patches, one grid row per image
        pixels = args[0] if args else kwargs.get("pixel_values")
        self.count += len(grid) if grid is not None else len(pixels)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def config(scoring: str, batch_size: int, encode_once: bool) -> EvaluateConfig:
    return scoring_settings(
        scoring=scoring,
        circular=True,
        batch_size=batch_size,
        max_new_tokens=12,
        encode_once=encode_once,
    )


@pytest.mark.parametrize("name", MODELS)
def test_encode_once_gives_the_same_answers_and_encodes_each_image_once(name, root, questions):
    model, processor = loaded(name, root)
    assert encoding_kind(model) is not None
    n_prompts = len(asked_prompts(questions, circular=True))
    n_images = questions["image_id"].nunique()
    assert n_prompts > n_images
    for scoring in ("generate", "letter"):
        frames = {}
        for batch_size, encode_once in ((8, False), (8, True), (1, False), (1, True)):
            with ImagesEncoded(model) as encoded:
                frames[batch_size, encode_once] = score_questions(
                    model, processor, questions, config(scoring, batch_size, encode_once)
                )
            assert encoded.count == (n_images if encode_once else n_prompts), (scoring, batch_size, encode_once)
        reference = frames[8, False]
        for key, frame in frames.items():
            assert list(frame["question_id"]) == list(reference["question_id"]), key  # the prompts' own order
            assert list(frame["rotation"]) == list(reference["rotation"]), key
            assert list(frame["parsed_letter"]) == list(reference["parsed_letter"]), key
            assert list(frame["raw_output"]) == list(reference["raw_output"]), key
        if scoring == "letter":
            assert all(json.loads(scores) for scores in reference["letter_scores"])
        elif name == "embedded-mllama":  # it answers in the trained format: the texts compare letters
            assert (reference["parse_failed"] == 0).all(), list(reference["raw_output"])


@pytest.mark.parametrize("name", MODELS)
def test_letter_scores_agree_to_float_rounding_and_full_length_texts_are_equal(name, root, questions):
    """The letter scores themselves (evaluation saves them rounded), and on the random models
    generation forced to its whole budget (they often end at once: an empty answer compares nothing)."""
    model, processor = loaded(name, root)
    asked = asked_prompts(questions, circular=True)
    instructions = [mcq.build_mcq_instruction(q, o) for q, o in zip(asked["question"], asked["options"])]
    decoded = {image_id: decode_image(data) for image_id, data in zip(asked["image_id"], asked["image"])}
    images = [decoded[image_id] for image_id in asked["image_id"]]
    n_options = [len(o) for o in asked["options"]]
    off = score_letters(model, processor, instructions, images, n_options, batch_size=8, encode_once=False)
    on = score_letters(model, processor, instructions, images, n_options, batch_size=8, encode_once=True)
    for a, b in zip(on, off):
        assert list(a) == list(b)
        scale = max(abs(v) for v in b.values())
        for letter in a:
            assert abs(a[letter] - b[letter]) <= RELATIVE_TOLERANCE * scale, (a, b)
    if name == "embedded-mllama":
        return  # it answers in the trained format: the first test compares its texts
    texts = {
        encode_once: generate_answers(
            model, processor, instructions, images, 6, batch_size=8, min_new_tokens=6, encode_once=encode_once
        )
        for encode_once in (False, True)
    }
    assert texts[True] == texts[False]


def test_mixed_batches_text_only_prompts_and_distinct_images(root):
    """Images met again after other images, a text-only prompt (its batch runs as before, pixels
    or none) and an image whose prompts span batches: the same text, in the prompts' order."""
    model, processor = loaded("llava", root)
    g = torch.Generator().manual_seed(1)
    pictures = [
        Image.fromarray((torch.rand(40 + 8 * i, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for i in range(3)
    ]
    images = [pictures[0], pictures[1], None, pictures[0], pictures[2], pictures[1], pictures[0], None]
    instructions = [f"What is shown, part {i}?" for i in range(len(images))]
    off = generate_answers(model, processor, instructions, images, 6, batch_size=3, encode_once=False)
    with ImagesEncoded(model) as encoded:
        on = generate_answers(model, processor, instructions, images, 6, batch_size=3, encode_once=True)
    assert on == off
    assert encoded.count == 3


@pytest.mark.parametrize("family", [f for f in family_names() if f not in MODELS])
def test_every_other_family_scores_the_same_letters(family, questions):
    """The other families of the table (tiny random models, a few rotated questions at batch 4):
    each image's features reach the placeholders as its own prompts' would."""
    model, processor = build_tiny(family)
    model.eval()
    assert encoding_kind(model) == families.FAMILIES[model.config.model_type].image_encoding is not None
    asked = asked_prompts(questions.head(2), circular=True)
    instructions = [mcq.build_mcq_instruction(q, o) for q, o in zip(asked["question"], asked["options"])]
    decoded = {image_id: decode_image(data) for image_id, data in zip(asked["image_id"], asked["image"])}
    images = [decoded[image_id] for image_id in asked["image_id"]]
    n_options = [len(o) for o in asked["options"]]
    off, on = (
        score_letters(model, processor, instructions, images, n_options, batch_size=4, encode_once=encode_once)
        for encode_once in (False, True)
    )
    for a, b in zip(on, off):
        scale = max(abs(v) for v in b.values())
        assert all(abs(a[letter] - b[letter]) <= RELATIVE_TOLERANCE * scale for letter in b), (a, b)


def test_prompts_are_grouped_by_image_in_order_of_first_appearance():
    a, b, c = object(), object(), object()
    assert grouped_order([a, b, None, a, c, b]) == [0, 3, 1, 5, 4, 2]


def test_a_family_without_the_fact_runs_as_before(root, questions, monkeypatch):
    model, processor = loaded("llava", root)
    monkeypatch.setitem(
        families.FAMILIES, "llava", dataclasses.replace(families.FAMILIES["llava"], image_encoding=None)
    )
    assert encoding_kind(model) is None
    with ImagesEncoded(model) as encoded:
        score_questions(model, processor, questions, config("letter", 8, True))
    assert encoded.count == len(asked_prompts(questions, circular=True))


def test_cross_attention_states_reach_the_prefill_only_and_the_model_is_left_as_it_was(root):
    model, _ = loaded("mllama", root)
    prepare = model.prepare_inputs_for_generation
    seen = []
    input_ids = torch.tensor([[1, 2]])
    with generating(model, {"cross_attention_states": torch.zeros(1)}):
        for first in (True, False):
            inputs = model.prepare_inputs_for_generation(
                input_ids, cross_attention_states=torch.zeros(1), use_cache=True, is_first_iteration=first
            )
            seen.append("cross_attention_states" in inputs)
    assert seen == [True, False]
    assert "prepare_inputs_for_generation" not in model.__dict__
    assert model.prepare_inputs_for_generation == prepare
