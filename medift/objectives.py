"""Training objectives over the one model-input builder's batches (medift.chat).

- `response_log_probs` / `sequence_log_probs`: a response's summed log-probability under a
  causal model, on the positions `model_inputs` labels (everything else is IGNORE_INDEX);
- `dpo_loss`: direct preference optimisation on those sums, with the usual reward metrics;
- `keep_flags`: STLLaVA-Med's stage 1, in which a non-first user turn is, with probability
  0.5, kept in the loss too (the model learns to ask the follow-up questions): the flags
  `medift.chat.encode_conversation` takes as `learn_questions`.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from medift.chat import IGNORE_INDEX


def response_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(label token) over the positions where labels != IGNORE_INDEX.

    Causal shift: the logits at position t predict the label at t + 1 (a label at position 0
    has nothing predicting it and is not counted). Computed in float32, and only at the
    labelled positions: the float32 log-softmax is taken over (labelled tokens, V), never over
    the whole (B, T, V) tensor. A row without labels sums to 0.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        shapes = f"{tuple(logits.shape)}, {tuple(labels.shape)}"
        raise ValueError(f"logits must be [B, T, V] and labels [B, T]; got {shapes}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows, positions = mask.nonzero(as_tuple=True)
    picked = logits[:, :-1][rows, positions].float()  # [N, V]: the logits that predict a label
    token_log_probs = torch.log_softmax(picked, dim=-1).gather(-1, targets[rows, positions].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    return out.index_add(0, rows, token_log_probs)


def sequence_log_probs(model, batch: dict) -> torch.Tensor:
    """`response_log_probs` of the model's logits on a `model_inputs` batch (its labels mark the response).

    The model is called on every input except the labels (so no loss is computed). The batch
    must be right-padded (`model_inputs`' default): left padding would shift the positions
    of the padded rows, and their log-probabilities with them.
    """
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2 and bool((mask[:, 0] == 0).any()):
        raise ValueError("sequence_log_probs needs a right-padded batch (model_inputs(..., padding_side='right'))")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits
    return response_log_probs(logits, batch["labels"].to(logits.device))


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict]:
    """DPO: mean over the batch of -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))).

    The arguments are sequence log-probabilities ([B]). Metrics (floats), with the implicit
    reward = beta * (policy - reference): `reward_accuracy` (fraction of rows whose chosen
    reward exceeds the rejected one), `reward_margin` (mean chosen - rejected reward),
    `chosen_reward` and `rejected_reward` (means).
    """
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        metrics = {
            "reward_accuracy": float((chosen_reward > rejected_reward).float().mean()),
            "reward_margin": float(margin.mean()),
            "chosen_reward": float(chosen_reward.mean()),
            "rejected_reward": float(rejected_reward.mean()),
        }
    return loss, metrics


# ------------------------------------------------------------------ STLLaVA-Med stage 1


def keep_flags(n_turns: int, seed_key: str, p: float = 0.5) -> list[bool]:
    """Which user turns stage 1 keeps in the loss: each non-first one with probability `p`, from
    `random.Random(seed_key)` (a string key, e.g. the conversation's id and the epoch), the first never."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    rng = random.Random(seed_key)
    return [False] + [rng.random() < p for _ in range(n_turns - 1)] if n_turns > 0 else []
