"""Letter scoring, batch invariance of both scoring modes, and circular-evaluation bookkeeping."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from PIL import Image

from medift import mcq
from medift.embedded.llava import EmbeddedModelConfig, build_processor
from medift.embedded.pretrain import held_out_questions
from medift.evaluate import asked_prompts, score_questions, scoring_settings, summarize
from medift.generation import best_letter, forced_answer_context, score_letters
from medift.images import encode_image
from medift.model.loading import load_base_model

SHIPPED_MODEL = "models/embedded-base"


@pytest.fixture(scope="module", params=[True, False], ids=["letter-dot", "split-letter"])
def processor(request):
    return build_processor(EmbeddedModelConfig(letter_dot_tokens=request.param))


def test_forced_prefix_is_the_trained_response_prefix(processor):
    prefix, letter_ids = forced_answer_context(processor, 5)
    assert prefix.strip() == mcq.ANSWER_PREFIX
    merged = "A." in processor.tokenizer.get_vocab()
    assert [processor.tokenizer.convert_ids_to_tokens(letter_ids[letter]) for letter in "ABCDE"] == [
        letter + "." * merged for letter in "ABCDE"
    ]


def test_known_logits_give_the_known_letter_restricted_to_valid_letters():
    """The shipped model's logits shifted by known amounts (a hook on its output layer): the
    scores are exactly those shifts' order, and a 3-option question can never answer E."""
    model, processor = load_base_model(SHIPPED_MODEL)
    _, letter_ids = forced_answer_context(processor)
    shift = torch.zeros(len(processor.tokenizer))
    for letter, value in {"E": 9e4, "B": 5e4, "A": 1e4}.items():
        shift[letter_ids[letter]] = value
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: output + shift)
    instructions = [
        mcq.build_mcq_instruction("What is the size?", ["big", "small", "tiny"]),
        mcq.build_mcq_instruction("What is the color?", ["red", "green", "blue", "yellow", "purple"]),
    ]
    image = Image.new("RGB", (64, 64))
    try:
        scores = score_letters(model, processor, instructions, [image, None], [3, 5], batch_size=2)
    finally:
        handle.remove()
    assert list(scores[0]) == ["A", "B", "C"] and list(scores[1]) == list("ABCDE")
    assert [best_letter(s) for s in scores] == ["B", "E"]
    assert scores[0]["B"] - scores[0]["A"] == pytest.approx(4e4, rel=1e-3)


def test_best_letter_breaks_ties_towards_the_first_letter():
    assert best_letter({"A": 1.0, "B": 2.0, "C": 2.0}) == "B"


def test_rotations_put_every_option_behind_every_letter():
    options = ["big", "small", "tiny"]
    seen = [mcq.rotate_options(options, 1, shift) for shift in range(3)]
    assert seen == [(["big", "small", "tiny"], 1), (["small", "tiny", "big"], 0), (["tiny", "big", "small"], 2)]
    for rotated, answer in seen:
        assert rotated[answer] == "small"
    with pytest.raises(ValueError):
        mcq.rotate_options(options, 0, 3)


def _questions_frame(n: int = 20, seed: int = 7) -> pd.DataFrame:
    rows = []
    for i, (instruction, image, n_options, answer, _) in enumerate(held_out_questions(n, seed, 64)):
        lines = instruction.split("\n")
        rows.append(
            {
                "question_id": f"q{i}",
                "image_id": f"img{i}",
                "attribute": lines[0],
                "question": lines[0],
                "options": [line.split(". ", 1)[1] for line in lines[1 : 1 + n_options]],
                "answer_index": answer,
                "image": encode_image(image),
            }
        )
    return pd.DataFrame(rows)


def test_asked_prompts_bookkeeping():
    questions = _questions_frame(4)
    asked = asked_prompts(questions, circular=True)
    assert len(asked) == sum(len(o) for o in questions["options"])
    for _, row in asked.iterrows():
        original = questions.set_index("question_id").loc[row["question_id"]]
        assert row["options"][row["answer_index"]] == original["options"][original["answer_index"]]
        assert sorted(row["options"]) == sorted(original["options"])
    assert len(asked_prompts(questions, circular=False)) == 4


@pytest.fixture(scope="module")
def shipped():
    return load_base_model(SHIPPED_MODEL)


@pytest.mark.parametrize("scoring", ["generate", "letter"])
def test_predictions_do_not_depend_on_the_batch_size(shipped, scoring):
    model, processor = shipped
    questions = _questions_frame(20)
    letters = {}
    for batch_size in (1, 16):
        config = scoring_settings(
            scoring=scoring,
            batch_size=batch_size,
            max_new_tokens=12,
            circular=False,
        )
        frame = score_questions(model, processor, questions, config)
        letters[batch_size] = list(frame["parsed_letter"])
    assert letters[1] == letters[16]
    assert sum(parsed != "" for parsed in letters[1]) == 20  # the shipped model follows the format


def test_letter_scoring_agrees_with_generation_and_circular_summary(shipped):
    model, processor = shipped
    questions = _questions_frame(12)
    generated = score_questions(
        model,
        processor,
        questions,
        scoring_settings(scoring="generate", circular=True, max_new_tokens=12),
    )
    scored = score_questions(
        model,
        processor,
        questions,
        scoring_settings(scoring="letter", circular=True),
    )
    assert list(generated["parsed_letter"]) == list(scored["parsed_letter"])
    assert scored["raw_output"].eq("").all() and scored["parse_failed"].eq(0).all()
    assert all(
        set(json.loads(s)) == set(mcq.LETTERS[: len(json.loads(o))])
        for s, o in zip(scored["letter_scores"], scored["options"])
    )
    # The metrics' values are checked on hand-counted predictions (tests/test_metrics.py);
    # here what a real circular run's summary must satisfy.
    summary = summarize(scored)
    assert summary["n"] == 12 and summary["prompts_asked"] == sum(len(o) for o in questions["options"])
    assert summary["parse_failures"] == 0 and summary["format_retention"] == 100.0  # letter scoring always answers
    assert 0 <= summary["circular_accuracy"] <= summary["accuracy"] <= 100


def test_device_resolution():
    import torch

    from medift.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_unknown_dtype_is_an_error(tmp_path):
    from medift.model.loading import load_base_model

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_base_model(str(tmp_path), dtype="float8")
