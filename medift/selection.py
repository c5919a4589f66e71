"""BioMed-VITAL's data-selection model, on feature tensors the caller extracts from the base model.

A sample (image, instruction-response text) is scored in (0, 1) by an MLP over its image and
text features, each first mapped to 512 dims by a fixed random projection (so any hidden size
works; the reference's BiomedCLIP gives 512 + 512). The model is trained with a pairwise
hinge loss on preference pairs of two kinds: pairs of samples with different ratings
(`rating_pairs`, weight 1) and clinician pairs, a ground-truth answer preferred to a
corrupted one (weight `clinician_weight`). `keep_top` then keeps the best-scored fraction.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)

PROJECTION_DIM = 512
HIDDEN_DIM = 512


class SelectionModel(nn.Module):
    """Score(image features [N, Di], text features [N, Dt]) -> [N] in (0, 1).

    Each input goes through a fixed Gaussian projection (entries N(0, 1) / sqrt(D), drawn from
    `seed`; registered buffers, so they are saved in the state_dict and never trained) to
    `projection_dim`, the two are concatenated, and an MLP of 4 linear layers
    (2 * projection_dim -> hidden -> hidden -> hidden -> 1, ReLU between) ends in a sigmoid.
    The MLP's initial weights are drawn from `seed` as well: one seed, one model.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        seed: int = 0,
        projection_dim: int = PROJECTION_DIM,
        hidden_dim: int = HIDDEN_DIM,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        image_projection = torch.randn(image_dim, projection_dim, generator=generator) / math.sqrt(image_dim)
        text_projection = torch.randn(text_dim, projection_dim, generator=generator) / math.sqrt(text_dim)
        self.register_buffer("image_projection", image_projection)
        self.register_buffer("text_projection", text_projection)
        self.mlp = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 1),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):  # nn.Linear's own initialisation, from the seeded generator
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        if image_feats.shape[0] != text_feats.shape[0]:
            raise ValueError("image and text features need one row per sample each")
        projected = torch.cat(
            [image_feats.float() @ self.image_projection, text_feats.float() @ self.text_projection], dim=-1
        )
        return torch.sigmoid(self.mlp(projected).squeeze(-1))


def pairwise_hinge_loss(s1: torch.Tensor, s2: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over the pairs of w * max(0, 1 - y * (s1 - s2)): margin 1, y = +1 when item 1 is preferred, -1 otherwise."""
    return (w * torch.clamp(1 - y * (s1 - s2), min=0)).mean()


def _rated(rating) -> bool:
    return rating is not None and not (isinstance(rating, float) and math.isnan(rating))


def rating_pairs(ratings: Sequence[float | None], n_pairs: int, seed: int) -> list[tuple[int, int, int]]:
    """`n_pairs` (i, j, y) pairs of samples with two different ratings, y = +1 if ratings[i] > ratings[j] else -1.

    Drawn with replacement from `random.Random(seed)`: i uniformly among the rated samples, j
    uniformly among those rated differently from i. Unrated samples (None, NaN) are never
    used; with fewer than two distinct ratings there is no pair.
    """
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    by_level: dict[float, list[int]] = {}
    for index, rating in enumerate(ratings):
        if _rated(rating):
            by_level.setdefault(rating, []).append(index)
    if len(by_level) < 2:
        return []
    rng = random.Random(seed)
    rated = sorted(index for members in by_level.values() for index in members)
    levels = sorted(by_level)
    pairs = []
    for _ in range(n_pairs):
        i = rng.choice(rated)
        # j: the k-th sample of the other levels taken in rating order (O(levels), not O(samples)).
        k = rng.randrange(len(rated) - len(by_level[ratings[i]]))
        for level in levels:
            if level == ratings[i]:
                continue
            if k < len(by_level[level]):
                j = by_level[level][k]
                break
            k -= len(by_level[level])
        pairs.append((i, j, 1 if ratings[i] > ratings[j] else -1))
    return pairs


def _pair_tensors(
    rating_pairs: Sequence[tuple[int, int, int]], clinician_pairs: Sequence[tuple[int, int]], clinician_weight: float
):
    first = [i for i, _, _ in rating_pairs] + [i for i, _ in clinician_pairs]
    second = [j for _, j, _ in rating_pairs] + [j for _, j in clinician_pairs]
    y = [float(label) for _, _, label in rating_pairs] + [1.0] * len(clinician_pairs)
    w = [1.0] * len(rating_pairs) + [float(clinician_weight)] * len(clinician_pairs)
    if any(label not in (1.0, -1.0) for label in y):
        raise ValueError("a rating pair's y must be +1 or -1")
    return torch.tensor(first), torch.tensor(second), torch.tensor(y), torch.tensor(w)


def train_selection_model(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    rating_pairs: Sequence[tuple[int, int, int]],
    clinician_pairs: Sequence[tuple[int, int]],
    clinician_weight: float,
    lr: float = 1e-5,
    epochs: int = 6,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[SelectionModel, dict]:
    """Train a `SelectionModel` (initialised from `seed`) with Adam on the pairwise hinge loss.

    `rating_pairs` are (i, j, y) rows into the feature tensors, weight 1; `clinician_pairs` are
    (i, j) with i a ground-truth answer and j a corrupted one (y = +1), weight
    `clinician_weight`. Both kinds are pooled and shuffled each epoch by a torch.Generator
    seeded with `seed`. Same inputs and seed -> identical weights. Returns the model (in eval
    mode) and {"epoch_loss": [mean loss over each epoch's pairs], "pairs": n, "steps": n}.
    """
    if image_feats.shape[0] != text_feats.shape[0]:
        raise ValueError("image and text features need one row per sample each")
    if not rating_pairs and not clinician_pairs:
        raise ValueError("no pair to train on")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be positive")
    image_feats, text_feats = image_feats.detach().float(), text_feats.detach().float()
    first, second, y, w = _pair_tensors(rating_pairs, clinician_pairs, clinician_weight)
    n = first.shape[0]
    if int(torch.cat([first, second]).min()) < 0 or int(torch.cat([first, second]).max()) >= image_feats.shape[0]:
        raise ValueError("a pair indexes outside the feature tensors")
    model = SelectionModel(image_feats.shape[1], text_feats.shape[1], seed=seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    epoch_loss, steps = [], 0
    progress = tqdm(total=epochs * math.ceil(n / batch_size), desc="selection model", unit="step", mininterval=5)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            chosen = order[start : start + batch_size]
            i, j = first[chosen], second[chosen]
            s1 = model(image_feats[i], text_feats[i])
            s2 = model(image_feats[j], text_feats[j])
            loss = pairwise_hinge_loss(s1, s2, y[chosen], w[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * chosen.shape[0]
            steps += 1
            progress.update(1)
        epoch_loss.append(total / n)
        log.info("selection model epoch %d: mean pair loss %.6f", len(epoch_loss), epoch_loss[-1])
    progress.close()
    model.eval()
    return model, {"epoch_loss": epoch_loss, "pairs": n, "steps": steps}


@torch.no_grad()
def selection_scores(model: SelectionModel, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """The model's scores of every sample ([N]), in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        return model(image_feats, text_feats)
    finally:
        model.train(was_training)


def pairwise_agreement(
    model: SelectionModel, image_feats: torch.Tensor, text_feats: torch.Tensor, pairs: Sequence[tuple[int, int, int]]
) -> float:
    """Fraction of (i, j, y) pairs whose score order matches y (a tie counts as disagreement)."""
    if not pairs:
        raise ValueError("no pair to evaluate")
    scores = selection_scores(model, image_feats, text_feats)
    first = torch.tensor([i for i, _, _ in pairs])
    second = torch.tensor([j for _, j, _ in pairs])
    y = torch.tensor([float(label) for _, _, label in pairs])
    return float((y * (scores[first] - scores[second]) > 0).float().mean())


def split_pairs(pairs: Sequence, held_out_fraction: float, seed: int) -> tuple[list, list]:
    """(training pairs, held-out pairs): a `random.Random(seed)` shuffle, round(fraction * n) held out.

    The split is over pairs, not samples: a sample may appear on both sides.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    n_held_out = round(held_out_fraction * len(shuffled))
    return shuffled[n_held_out:], shuffled[:n_held_out]


def keep_top(scores: Sequence[float], fraction: float) -> list[int]:
    """Indices of the top ceil(fraction * n) scores, ties broken by the lower index, in ascending index order.

    0 < fraction <= 1. The product is rounded to 9 decimals before the ceiling, so that e.g.
    0.3 of 10 keeps 3 (0.3 * 10 is 3.0000000000000004 in floating point).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    values = [float(score) for score in scores]
    if any(math.isnan(value) for value in values):
        raise ValueError("a score is NaN")
    k = math.ceil(round(fraction * len(values), 9))
    ranked = sorted(range(len(values)), key=lambda index: (-values[index], index))
    return sorted(ranked[:k])
