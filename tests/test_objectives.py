"""Training objectives (medift.objectives) on hand-computed numbers and on tiny real-family checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from medift.chat import IGNORE_INDEX, encode_conversation, model_inputs
from medift.model.loading import load_base_model
from medift.objectives import (
    dpo_loss,
    keep_flags,
    response_log_probs,
    sequence_log_probs,
)
from medift.testing.tiny_checkpoints import build_tiny_checkpoint

USER_TURNS = ["Describe this medical scan.", "Is the nucleus round?", "What colour is the cytoplasm?"]
RESPONSES = ["A large white blood cell.", "Yes, it is round.", "Light blue."]


def image(seed: int = 0, size=(64, 64)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    return {family: build_tiny_checkpoint(family, root / family, seed=0) for family in ("llava", "mllama")}


@pytest.fixture(scope="module")
def llava(checkpoints):
    return load_base_model(str(checkpoints["llava"]))


# ------------------------------------------------------------------ log-probabilities


def log_softmax_by_hand(row: list[float], index: int) -> float:
    return row[index] - math.log(sum(math.exp(x) for x in row))


def test_response_log_probs_is_the_shifted_sum_over_the_labels():
    logits = torch.tensor(
        [
            [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]],
            [[0.3, 0.1, -0.2], [1.5, 0.0, 0.0], [9.0, 9.0, 9.0]],
        ]
    )
    # Row 0: labels at positions 1 and 2, predicted by the logits at 0 and 1.
    # Row 1: a label at position 0 (nothing predicts it: not counted), one at 1; position 2 is ignored.
    labels = torch.tensor([[IGNORE_INDEX, 2, 0], [1, 0, IGNORE_INDEX]])
    expected = [
        log_softmax_by_hand([1.0, 2.0, 0.5], 2) + log_softmax_by_hand([0.0, -1.0, 3.0], 0),
        log_softmax_by_hand([0.3, 0.1, -0.2], 0),
    ]
    got = response_log_probs(logits, labels)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    # Half-precision logits are computed in float32; a row without labels sums to 0.
    half = response_log_probs(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32
    assert half.tolist() == pytest.approx(expected, abs=0.05)
    none = response_log_probs(logits, torch.full_like(labels, IGNORE_INDEX))
    assert none.tolist() == [0.0, 0.0]


def test_response_log_probs_checks_shapes():
    with pytest.raises(ValueError, match="logits must be"):
        response_log_probs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_sequence_log_probs_batched_equals_each_row_alone(llava):
    model, processor = llava
    rows = [
        encode_conversation(processor, ["Describe this medical scan."], ["A cell."], with_image=True),
        encode_conversation(processor, USER_TURNS[:2], RESPONSES[:2], with_image=True),
        encode_conversation(processor, ["Is this normal?"], ["No, the nucleus is segmented and large."], False),
    ]
    images = [image(0), image(1, (80, 60)), None]
    batch = model_inputs(processor, rows, images)
    assert (batch["attention_mask"] == 0).any()  # the rows are padded
    with torch.no_grad():
        batched = sequence_log_probs(model, batch)
    manual = []
    for row, picture in zip(rows, images):
        alone = model_inputs(processor, [row], [picture])
        labels = alone.pop("labels")[0]
        with torch.no_grad():
            logits = model(**alone).logits[0].float()
        total = 0.0
        for t in range(1, labels.shape[0]):
            if labels[t] != IGNORE_INDEX:
                total += float(torch.log_softmax(logits[t - 1], dim=-1)[labels[t]])
        manual.append(total)
    assert all(value < 0 for value in manual)
    torch.testing.assert_close(batched, torch.tensor(manual), atol=1e-5, rtol=0)


def test_sequence_log_probs_refuses_a_left_padded_batch(llava):
    model, processor = llava
    rows = [
        encode_conversation(processor, ["Is this normal?"], ["No."], False),
        encode_conversation(processor, ["Is this normal?"], ["No, the nucleus is segmented."], False),
    ]
    with pytest.raises(ValueError, match="right-padded"):
        sequence_log_probs(model, model_inputs(processor, rows, [None, None], padding_side="left"))


# ------------------------------------------------------------------ DPO


def test_dpo_loss_and_metrics_by_hand():
    beta = 0.1
    policy_chosen = torch.tensor([-3.0, -6.0])
    policy_rejected = torch.tensor([-5.0, -4.0])
    reference_chosen = torch.tensor([-4.0, -5.0])
    reference_rejected = torch.tensor([-4.0, -5.0])
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)

    # Row 0: chosen reward 0.1 * 1 = 0.1, rejected 0.1 * -1 = -0.1, margin 0.2.
    # Row 1: chosen reward 0.1 * -1 = -0.1, rejected 0.1 * 1 = 0.1, margin -0.2.
    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    expected = (-math.log(sigmoid(0.2)) - math.log(sigmoid(-0.2))) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert metrics == pytest.approx(
        {"reward_accuracy": 0.5, "reward_margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}, abs=1e-6
    )
    assert all(isinstance(value, float) for value in metrics.values())
    loss, metrics = dpo_loss(policy_chosen[:1], policy_rejected[:1], reference_chosen[:1], reference_rejected[:1], beta)
    assert float(loss) == pytest.approx(-math.log(sigmoid(0.2)), abs=1e-6)
    assert metrics == pytest.approx(
        {"reward_accuracy": 1.0, "reward_margin": 0.2, "chosen_reward": 0.1, "rejected_reward": -0.1}, abs=1e-6
    )


def test_dpo_loss_gradient_raises_the_chosen_over_the_rejected():
    policy_chosen = torch.tensor([-3.0], requires_grad=True)
    policy_rejected = torch.tensor([-5.0], requires_grad=True)
    loss, _ = dpo_loss(policy_chosen, policy_rejected, torch.tensor([-4.0]), torch.tensor([-4.0]), 0.1)
    loss.backward()
    # d loss / d pi_c = -beta * sigmoid(-margin)
    assert float(policy_chosen.grad) == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert float(policy_rejected.grad) == pytest.approx(-float(policy_chosen.grad), abs=1e-7)


# ------------------------------------------------------------------ STLLaVA-Med stage 1


def test_keep_flags_are_seeded_by_the_key_and_never_keep_the_first_turn():
    flags = keep_flags(200, "conversation-7")
    assert flags == keep_flags(200, "conversation-7")
    assert flags[0] is False
    assert 60 < sum(flags) < 140  # about half of the 199 others
    assert keep_flags(200, "conversation-8") != flags
    assert keep_flags(5, "x", p=0.0) == [False] * 5
    assert keep_flags(5, "x", p=1.0) == [False, True, True, True, True]
    assert keep_flags(1, "x") == [False] and keep_flags(0, "x") == []
    with pytest.raises(ValueError):
        keep_flags(3, "x", p=1.5)


@pytest.mark.parametrize("family", ["mllama", "llava"])
def test_no_kept_turn_is_encode_conversation_exactly(family, checkpoints):
    _, processor = load_base_model(str(checkpoints[family]))
    for with_image in (True, False):
        plain = encode_conversation(processor, USER_TURNS, RESPONSES, with_image)
        assert encode_conversation(processor, USER_TURNS, RESPONSES, with_image, learn_questions=[False] * 3) == plain


@pytest.mark.parametrize("family", ["mllama", "llava"])
def test_kept_user_turns_are_labelled_with_their_question(family, checkpoints):
    _, processor = load_base_model(str(checkpoints[family]))
    tokenizer = processor.tokenizer
    plain = encode_conversation(processor, USER_TURNS, RESPONSES, with_image=True)
    kept = encode_conversation(processor, USER_TURNS, RESPONSES, True, learn_questions=[False, True, False])
    assert kept.input_ids == plain.input_ids and kept.text == plain.text
    # Every response label is still there; the only new labels are one run: the second question's turn.
    assert all(b == a for a, b in zip(plain.labels, kept.labels) if a != IGNORE_INDEX)
    new = [i for i, (a, b) in enumerate(zip(plain.labels, kept.labels)) if a != b]
    assert new == list(range(new[0], new[-1] + 1))
    assert all(kept.labels[i] == kept.input_ids[i] for i in new)
    question = tokenizer.decode([kept.input_ids[i] for i in new])
    assert USER_TURNS[1] in question
    assert USER_TURNS[0] not in question and USER_TURNS[2] not in question
    assert "ASSISTANT" not in question and "assistant" not in question  # not the generation prompt
    # It sits after the first response and before the second.
    first_response_end = max(i for i, label in enumerate(plain.labels[: new[0]]) if label != IGNORE_INDEX)
    assert first_response_end < new[0] and plain.labels[new[-1] + 1] == IGNORE_INDEX
    # The labels survive the processor's image expansion (model_inputs carries them over).
    batch = model_inputs(processor, [kept], [image(2)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    supervised = tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert USER_TURNS[1] in supervised and all(response in supervised for response in RESPONSES)
    assert USER_TURNS[0] not in supervised and USER_TURNS[2] not in supervised
    # Both later turns kept: both questions labelled.
    both = encode_conversation(processor, USER_TURNS, RESPONSES, True, learn_questions=[False, True, True])
    labelled = tokenizer.decode([t for t in both.labels if t != IGNORE_INDEX])
    assert USER_TURNS[1] in labelled and USER_TURNS[2] in labelled and USER_TURNS[0] not in labelled


def test_the_first_turn_is_never_kept(checkpoints):
    _, processor = load_base_model(str(checkpoints["llava"]))
    with pytest.raises(ValueError, match="first user turn"):
        encode_conversation(processor, USER_TURNS, RESPONSES, True, learn_questions=[True, False, False])
    with pytest.raises(ValueError, match="one flag per user turn"):
        encode_conversation(processor, USER_TURNS, RESPONSES, True, learn_questions=[False, True])
