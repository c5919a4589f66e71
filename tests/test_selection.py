"""BioMed-VITAL's data-selection model (medift.selection): loss by hand, pair sampling, training, keep_top."""

from __future__ import annotations

import pytest
import torch

from medift.selection import (
    SelectionModel,
    keep_top,
    pairwise_agreement,
    pairwise_hinge_loss,
    rating_pairs,
    selection_scores,
    split_pairs,
    train_selection_model,
)

IMAGE_DIM, TEXT_DIM = 24, 40


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these small matrices gain nothing from two, and a second thread that
    spins against other processes on a busy machine makes training ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(n: int, seed: int):
    """Samples whose text features carry a quality signal (first coordinate) under noise, rated 1 (poor) or 5
    (good) from it; every tenth sample unrated.

    Two levels: with a sigmoid output the margin of 1 is never met, so the hinge loss is linear in the
    scores and drives each sample's score to 0 or 1 by its net count of wins; a separable two-level
    problem is what that learns cleanly (with many levels the middle ones end up tied).
    """
    g = torch.Generator().manual_seed(seed)
    quality = torch.rand(n, generator=g)
    text = 0.3 * torch.randn(n, TEXT_DIM, generator=g)
    text[:, 0] += 3 * quality
    image = torch.randn(n, IMAGE_DIM, generator=g)
    ratings = [None if i % 10 == 9 else (5.0 if q > 0.5 else 1.0) for i, q in enumerate(quality.tolist())]
    return image, text, ratings


# ------------------------------------------------------------------ the loss


def test_hinge_loss_by_hand():
    s1 = torch.tensor([0.9, 0.2, 0.6, 0.5])
    s2 = torch.tensor([0.1, 0.7, 0.6, 0.5])
    y = torch.tensor([1.0, 1.0, -1.0, 1.0])
    w = torch.tensor([1.0, 1.0, 1.0, 2.0])
    # 1 - y (s1 - s2): 1 - 0.8 = 0.2; 1 + 0.5 = 1.5; 1 - 0 = 1; 1 - 0 = 1 (weight 2)
    expected = (0.2 + 1.5 + 1.0 + 2.0) / 4
    assert float(pairwise_hinge_loss(s1, s2, y, w)) == pytest.approx(expected, abs=1e-6)
    one = torch.ones(1)

    def single(a: float, b: float, label: float, weight: torch.Tensor = one) -> float:
        return float(pairwise_hinge_loss(torch.tensor([a]), torch.tensor([b]), torch.tensor([label]), weight))

    # The margin met (item 2 preferred by 1.5; item 1 by exactly 1): 0.
    assert single(-1.0, 0.5, -1.0) == 0.0
    assert single(2.0, 1.0, 1.0) == 0.0
    # The wrong order (item 2 preferred, item 1 higher by 0.5): 1.5, times the weight.
    assert single(0.8, 0.3, -1.0, torch.tensor([0.5])) == pytest.approx(0.5 * 1.5)
    # Zero weight removes a pair (but it still counts in the mean).
    assert float(pairwise_hinge_loss(s1, s2, y, torch.tensor([0.0, 0.0, 0.0, 1.0]))) == pytest.approx(1.0 / 4)


# ------------------------------------------------------------------ pairs


def test_rating_pairs_use_two_levels_and_are_deterministic():
    ratings = [3.0, 1.0, None, 3.0, 5.0, float("nan"), 1.0, 5.0, 3.0]
    pairs = rating_pairs(ratings, 500, seed=4)
    assert len(pairs) == 500 and pairs == rating_pairs(ratings, 500, seed=4)
    assert pairs != rating_pairs(ratings, 500, seed=5)
    for i, j, y in pairs:
        assert ratings[i] is not None and ratings[j] is not None and 2 not in (i, j) and 5 not in (i, j)
        assert ratings[i] != ratings[j]
        assert y == (1 if ratings[i] > ratings[j] else -1)
    # Every rated sample and every pair of levels, both orders, turns up.
    assert {i for i, _, _ in pairs} | {j for _, j, _ in pairs} == {0, 1, 3, 4, 6, 7, 8}
    assert {(ratings[i], ratings[j]) for i, j, _ in pairs} == {
        (a, b) for a in (1.0, 3.0, 5.0) for b in (1.0, 3.0, 5.0) if a != b
    }
    assert {y for _, _, y in pairs} == {1, -1}


def test_rating_pairs_need_two_levels():
    assert rating_pairs([2.0, 2.0, None, 2.0], 10, seed=0) == []
    assert rating_pairs([None, None], 10, seed=0) == []
    assert rating_pairs([], 10, seed=0) == []
    assert rating_pairs([1.0, 2.0], 0, seed=0) == []
    assert sorted(set(rating_pairs([1.0, 2.0], 20, seed=0))) == [(0, 1, -1), (1, 0, 1)]


def test_split_pairs_holds_out_a_seeded_fraction():
    pairs = [(i, i + 1, 1) for i in range(100)]
    train, held_out = split_pairs(pairs, 0.2, seed=1)
    assert len(held_out) == 20 and len(train) == 80
    assert sorted(train + held_out) == pairs
    assert split_pairs(pairs, 0.2, seed=1) == (train, held_out)
    assert split_pairs(pairs, 0.2, seed=2) != (train, held_out)
    with pytest.raises(ValueError):
        split_pairs(pairs, 1.0, seed=1)


# ------------------------------------------------------------------ keep_top


def test_keep_top_rounds_up_breaks_ties_by_index_and_returns_ascending_indices():
    scores = [0.1, 0.9, 0.5, 0.9, 0.3, 0.5, 0.7, 0.2, 0.8, 0.4]
    assert keep_top(scores, 0.3) == [1, 3, 8]  # exactly 3 of 10 (0.3 * 10 is 3.0000000000000004)
    assert keep_top(scores, 0.25) == [1, 3, 8]  # ceil(2.5)
    assert keep_top(scores, 0.35) == [1, 3, 6, 8]  # ceil(3.5)
    assert keep_top(scores, 0.01) == [1]  # ceil(0.1): at least one
    assert keep_top(scores, 1.0) == list(range(10))
    # A tie at the cut: the lower index wins.
    assert keep_top(scores, 0.5) == [1, 2, 3, 6, 8]
    assert keep_top([0.5, 0.5, 0.5], 0.34) == [0, 1]
    assert keep_top([0.5, 0.5, 0.5], 0.33) == [0]
    assert keep_top([], 0.5) == []
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="fraction"):
            keep_top(scores, bad)
    with pytest.raises(ValueError, match="NaN"):
        keep_top([0.1, float("nan")], 0.5)


# ------------------------------------------------------------------ the model


def test_scores_are_in_the_open_unit_interval_for_any_feature_size():
    g = torch.Generator().manual_seed(0)
    for image_dim, text_dim in ((8, 4096), (512, 512)):
        model = SelectionModel(image_dim, text_dim, seed=1)
        image = 100 * torch.randn(16, image_dim, generator=g)
        text = torch.randn(16, text_dim, generator=g).to(torch.bfloat16)
        scores = selection_scores(model, image, text)
        assert scores.shape == (16,) and scores.dtype == torch.float32
        assert bool(((scores > 0) & (scores < 1)).all())
    linears = [m for m in model.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 512), (512, 512), (512, 512), (512, 1)]


def test_projections_are_fixed_buffers_saved_in_the_state_dict(tmp_path):
    model = SelectionModel(IMAGE_DIM, TEXT_DIM, seed=3)
    names = {name for name, _ in model.named_parameters()}
    assert not {"image_projection", "text_projection"} & names
    state = model.state_dict()
    assert state["image_projection"].shape == (IMAGE_DIM, 512) and state["text_projection"].shape == (TEXT_DIM, 512)
    # Scaled by 1 / sqrt(D): each projected coordinate of a unit-variance input has about unit variance.
    assert float(state["text_projection"].std() * TEXT_DIM**0.5) == pytest.approx(1.0, abs=0.05)
    torch.save(state, tmp_path / "selection.pt")
    other = SelectionModel(IMAGE_DIM, TEXT_DIM, seed=99)  # other projections and weights until loaded
    image, text, _ = synthetic(10, seed=0)
    assert not torch.equal(selection_scores(other, image, text), selection_scores(model, image, text))
    other.load_state_dict(torch.load(tmp_path / "selection.pt"))
    assert torch.equal(selection_scores(other, image, text), selection_scores(model, image, text))


def test_training_learns_a_separable_preference_and_is_deterministic():
    image, text, ratings = synthetic(300, seed=0)
    pairs = rating_pairs(ratings, 1500, seed=0)
    train_pairs, held_out = split_pairs(pairs, 0.2, seed=0)
    # Clinician pairs: a high-quality sample over a low-quality one (as a ground-truth vs corrupted answer).
    good = [i for i, rating in enumerate(ratings) if rating == 5.0]
    poor = [i for i, rating in enumerate(ratings) if rating == 1.0]
    clinician = list(zip(good[:20], poor[:20]))
    untrained = SelectionModel(IMAGE_DIM, TEXT_DIM, seed=0)
    before = pairwise_agreement(untrained, image, text, held_out)
    model, log = train_selection_model(
        image, text, train_pairs, clinician, clinician_weight=2.0, lr=3e-4, epochs=5, batch_size=64, seed=0
    )
    assert log["pairs"] == len(train_pairs) + len(clinician) and len(log["epoch_loss"]) == 5
    assert log["epoch_loss"][-1] < log["epoch_loss"][0]
    after = pairwise_agreement(model, image, text, held_out)
    assert after > 0.9 and after > before
    # New samples, never seen in training: the model ranks them too.
    fresh_image, fresh_text, fresh_ratings = synthetic(200, seed=1)
    assert pairwise_agreement(model, fresh_image, fresh_text, rating_pairs(fresh_ratings, 500, seed=1)) > 0.9
    # Same inputs and seed: identical weights; another seed: different ones.
    again, again_log = train_selection_model(
        image, text, train_pairs, clinician, clinician_weight=2.0, lr=3e-4, epochs=5, batch_size=64, seed=0
    )
    assert again_log == log
    state, again_state = model.state_dict(), again.state_dict()
    assert all(torch.equal(state[name], again_state[name]) for name in state)
    other, _ = train_selection_model(
        image, text, train_pairs, clinician, clinician_weight=2.0, lr=1e-3, epochs=1, batch_size=64, seed=1
    )
    assert not torch.equal(other.state_dict()["mlp.0.weight"], state["mlp.0.weight"])


def test_clinician_weight_scales_the_clinician_pairs_loss():
    image, text, ratings = synthetic(40, seed=2)
    clinician = [(0, 1), (2, 3)]
    _, zero = train_selection_model(image, text, [], clinician, clinician_weight=0.0, lr=1e-3, epochs=1, seed=0)
    _, one = train_selection_model(image, text, [], clinician, clinician_weight=1.0, lr=1e-3, epochs=1, seed=0)
    _, three = train_selection_model(image, text, [], clinician, clinician_weight=3.0, lr=1e-3, epochs=1, seed=0)
    assert zero["epoch_loss"] == [0.0]
    assert three["epoch_loss"][0] == pytest.approx(3 * one["epoch_loss"][0], rel=1e-5)  # same first step's scores
    with pytest.raises(ValueError, match="no pair"):
        train_selection_model(image, text, [], [], clinician_weight=1.0)
    with pytest.raises(ValueError, match="outside"):
        train_selection_model(image, text, [(0, 40, 1)], [], clinician_weight=1.0)
