"""FLOPs of a training step, counted from a model's config and a batch, and the device's peak.

Model FLOPs are the useful work of the step: each image's real tiles (the processor's padding
tiles and the vision encoder's pad-to-8 tokens left out), each row's real text tokens, no
recompute. Hardware FLOPs are what the device runs: padded tiles and tokens, padded text
rows, and the forward of every checkpointed layer again in the backward pass. MFU and HFU
divide them by seconds x the device's peak FLOP/s. The formula of each family layout is in
docs/training.md ("Throughput, FLOPs and MFU"); a family names its layout in the family table
(`Family.flops`).

Every matmul of d_in x d_out over n tokens costs 2 n d_in d_out forward; its backward costs the
same again for the input gradient, if anything upstream needs a gradient, and again for the
weight gradient, if the weight is trained. Attention's two products (QK^T, AV) cost
2 n_q n_k d each forward, counted over the whole n_q x n_k square (as SDPA computes it without
a causal shortcut, and as FlopCounterMode counts it); each operand's gradient costs as much
again when that operand needs one. Norms, activations, softmax and the loss are left out
(under 1 % of an 11B step).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from medift.model.families import family_of

# bf16 dense peak (no sparsity) of the accelerators users train on, by a substring of
# torch.cuda.get_device_name(); the first match wins (H200 before H100's "H1").
PEAK_FLOPS = (
    ("H200", 989.4e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
)
PEAK_ENV = "MEDIFT_PEAK_FLOPS"  # a user's peak FLOP/s, over the table (any device, CPU included)


def device_peak_flops(setting: float = 0.0) -> float | None:
    """The peak FLOP/s MFU is measured against: the setting, else $MEDIFT_PEAK_FLOPS, else the
    table's entry for this CUDA device. None where none applies (CPU, an unknown GPU): MFU is
    then not reported rather than measured against an invented peak."""
    if setting:
        return float(setting)
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


@dataclass
class Op:
    """One matmul (or attention product) of a step: forward FLOPs and what its backward computes."""

    flops: float
    input_grad: bool  # the backward computes the gradient of its input(s)
    weight_grad: bool = False  # ... and of its (trained) weight

    def total(self) -> float:
        return self.flops * (1 + self.input_grad + self.weight_grad)


def matmul(tokens: float, d_in: int, d_out: int, input_grad: bool, weight_grad: bool) -> Op:
    return Op(2.0 * tokens * d_in * d_out, input_grad, weight_grad)


def attention(
    query_tokens: float, key_tokens: float, width: int, query_grad: bool, key_grad: bool, value_grad: bool
) -> float:
    """Forward + backward FLOPs of QK^T and AV for one sequence (width = heads x head_dim)."""
    product = 2.0 * query_tokens * key_tokens * width
    scores_grad = query_grad or key_grad
    return product * (2 + query_grad + key_grad + scores_grad + value_grad)


TOWERS = frozenset({"vision", "text"})


def step_flops(model_config, batch: dict, trainable_groups, proxy: bool = False, recompute: bool | set = False) -> dict:
    """Model and hardware FLOPs of one forward + backward over `batch` (the processor's tensors).

    trainable_groups: the trained groups of medift/model/families.py (implied ones are added);
    proxy: a proxy instruction learns (gradients flow back to the text embeddings);
    recompute: activation checkpointing is on (hardware FLOPs repeat the recomputed forwards): True
    for every tower (medift's checkpointing), or the towers recomputed ({"text"}: transformers'
    own, which leaves Mllama's vision encoder layers out).
    Returns model_flops, hardware_flops, text_tokens (real), image_tokens (vision tokens of real
    tiles) and image_tokens_computed (those the vision encoder ran, padding included).
    """
    family = family_of(model_config)
    if family.flops not in FORMULAS:
        raise ValueError(
            f"no FLOP formula for {family.name} (model_type {model_config.model_type!r}); "
            "add one to medift/flops.py and name it in the family table"
        )
    groups = set(trainable_groups)
    groups |= {implied for g in list(groups) for implied in family.implies.get(g, ())}
    towers = TOWERS if recompute is True else frozenset(recompute or ())
    if towers - TOWERS:
        raise ValueError(f"recompute names unknown towers {sorted(towers - TOWERS)}; known: {sorted(TOWERS)}")
    return FORMULAS[family.flops](model_config, batch, groups, proxy, towers, family)


def _mllama(config, batch: dict, groups: set, proxy: bool, recompute: frozenset, family) -> dict:
    vision, text = config.vision_config, config.text_config
    mask = batch[family.tile_mask]  # (rows, images, max tiles): 1 = a real tile
    real_tiles = mask.reshape(-1, mask.shape[-1]).sum(dim=1).tolist()  # per image
    computed_tiles = batch["pixel_values"].shape[2]
    grid = (vision.image_size // vision.patch_size) ** 2
    per_tile = grid + 1  # patches + the class token
    per_tile_padded = math.ceil(per_tile / 8) * 8  # the encoder pads each tile to a multiple of 8 tokens
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # real text tokens per row
    width = batch["attention_mask"].shape[1]
    images_per_row = mask.shape[1]

    def count(
        tiles_of_image: list[int], tile_tokens: int, text_lengths: list[int], recomputed_towers: frozenset
    ) -> float:
        vision_tokens = [t * per_tile for t in tiles_of_image]  # what the projector and cross-attention see
        encoder_tokens = [t * tile_tokens for t in tiles_of_image]
        fwd_and_bwd, recomputed = _mllama_ops(
            vision, text, groups, proxy, tiles_of_image, encoder_tokens, vision_tokens, text_lengths, images_per_row
        )
        return fwd_and_bwd + sum(recomputed[tower] for tower in recomputed_towers)

    model = count([int(t) for t in real_tiles], per_tile, [int(n) for n in lengths], frozenset())
    hardware = count([computed_tiles] * len(real_tiles), per_tile_padded, [width] * len(lengths), recompute)
    return {
        "model_flops": model,
        "hardware_flops": hardware,
        "text_tokens": int(sum(lengths)),
        "image_tokens": int(sum(real_tiles)) * per_tile,
        "image_tokens_computed": computed_tiles * len(real_tiles) * per_tile_padded,
    }


def _mllama_ops(
    vision,
    text,
    groups: set,
    proxy: bool,
    tiles: list[int],
    encoder_tokens: list[int],
    vision_tokens: list[int],
    text_lengths: list[int],
    images_per_row: int,
) -> tuple[float, dict]:
    """(forward + backward FLOPs, per tower the forward FLOPs of its layers that run a backward:
    what checkpointing them recomputes)."""
    total, recomputed = 0.0, {"vision": 0.0, "text": 0.0}
    # Vision tower: patch convolution, local layers, gated global layers (all tiles of an image attend together).
    d, f = vision.hidden_size, vision.intermediate_size
    trains_vision = bool(groups & {"vision", "lora_vision"})
    w_vision = "vision" in groups
    patches = sum(tiles) * (vision.image_size // vision.patch_size) ** 2
    total += matmul(patches, vision.num_channels * vision.patch_size**2, d, False, w_vision).total()
    n = sum(encoder_tokens)
    layer = sum(
        op.total()
        for op in (
            matmul(n, d, 3 * d, trains_vision, w_vision),
            matmul(n, d, d, trains_vision, w_vision),
            matmul(n, d, f, trains_vision, w_vision),
            matmul(n, f, d, trains_vision, w_vision),
        )
    )
    layer += sum(attention(t, t, d, trains_vision, trains_vision, trains_vision) for t in encoder_tokens)
    layer_forward = 2.0 * n * (4 * d * d + 2 * d * f) + sum(4.0 * t * t * d for t in encoder_tokens)
    layers = vision.num_hidden_layers + vision.num_global_layers
    total += layers * layer
    if trains_vision:
        recomputed["vision"] += layers * layer_forward
    # Projector: every vision token (real patches + class) of every layer the decoder reads.
    v = sum(vision_tokens)
    kv_grad = trains_vision or "projector" in groups  # the cross-attention's keys/values need gradients
    total += matmul(v, vision.vision_output_dim, text.hidden_size, trains_vision, "projector" in groups).total()
    # Decoder: self-attention layers and gated cross-attention layers, in order; `flow`: whether the
    # text stream entering a layer depends on anything trained (its gradient is then computed).
    d, f, kv = (
        text.hidden_size,
        text.intermediate_size,
        text.num_key_value_heads * (text.hidden_size // text.num_attention_heads),
    )
    t = sum(text_lengths)
    flow = proxy or bool(groups & {"language_model", "lora"})
    cross = set(text.cross_attention_layers or [])
    for i in range(text.num_hidden_layers):
        is_cross = i in cross
        weight = ("fusion" if is_cross else "language_model") in groups
        g = flow or weight or (not is_cross and "lora" in groups)
        ops = [
            matmul(t, d, d, g, weight),
            matmul(t, d, d, g, weight),  # q, o
            matmul(t, d, 2 * f, g, weight),
            matmul(t, f, d, g, weight),
        ]  # gate+up, down
        if is_cross:
            ops += [matmul(v, d, 2 * kv, kv_grad, weight)]  # k, v over the vision tokens
            keys = [v_row * 1.0 for v_row in _per_row(vision_tokens, images_per_row)]
            att = sum(attention(q, k, d, g, kv_grad or weight, kv_grad or weight) for q, k in zip(text_lengths, keys))
            att_forward = sum(4.0 * q * k * d for q, k in zip(text_lengths, keys))
            forward = 2.0 * (t * (2 * d * d + 3 * d * f) + v * d * 2 * kv) + att_forward
        else:
            ops += [matmul(t, d, 2 * kv, g, weight)]  # k, v
            att = sum(attention(q, q, d, g, g, g) for q in text_lengths)
            forward = 2.0 * t * (2 * d * d + 3 * d * f + 2 * d * kv) + sum(4.0 * q * q * d for q in text_lengths)
        total += sum(op.total() for op in ops) + att
        if g or weight or (is_cross and kv_grad):
            recomputed["text"] += forward
        flow = flow or weight or (is_cross and kv_grad)
    total += matmul(t, d, text.vocab_size, flow, "language_model" in groups).total()  # lm_head
    return total, recomputed


def _per_row(per_image: list[int], images_per_row: int) -> list[int]:
    return [sum(per_image[r : r + images_per_row]) for r in range(0, len(per_image), images_per_row)]


FORMULAS = {"mllama": _mllama}


# ------------------------------------------------------------------ a training step's work

WORK_KEYS = ("samples", "text_tokens", "image_tokens", "model_flops", "hardware_flops")


class StepWork:
    """Counts a training stage's work micro-batch by micro-batch (on the CPU batch, before it moves).

    A family without a FLOP formula counts samples and text tokens only; its image tokens and
    FLOPs stay None, and MFU is not reported (said once in the log by the caller).
    """

    def __init__(self, model_config, trainable_groups, proxy: bool, recompute: bool | set):
        self.config, self.groups, self.proxy, self.recompute = model_config, tuple(trainable_groups), proxy, recompute
        self.has_formula = family_of(model_config).flops in FORMULAS

    def of(self, batch: dict) -> dict:
        work = {
            "samples": int(batch["input_ids"].shape[0]),
            "text_tokens": int(batch["attention_mask"].sum()),
            "image_tokens": None,
            "model_flops": None,
            "hardware_flops": None,
        }
        if self.has_formula:
            flops = step_flops(self.config, batch, self.groups, self.proxy, self.recompute)
            work.update({key: flops[key] for key in ("image_tokens", "model_flops", "hardware_flops")})
        return work


def add_work(total: dict | None, work: dict) -> dict:
    if total is None:
        return dict(work)
    return {key: None if total[key] is None or work[key] is None else total[key] + work[key] for key in WORK_KEYS}


def rates(work: dict, seconds: float, ranks: int, peak: float | None) -> dict:
    """Per-second figures of a step (work summed over the ranks, seconds on rank 0's clock).
    MFU/HFU: FLOPs / (seconds x peak x ranks); None without a peak or a FLOP formula."""
    seconds = max(seconds, 1e-9)

    def per_second(key):
        return None if work[key] is None else work[key] / seconds

    def utilisation(key):
        return None if work[key] is None or peak is None else work[key] / (seconds * peak * ranks)

    return {
        "samples_per_second": per_second("samples"),
        "tokens_per_second": per_second("text_tokens"),
        "image_tokens_per_second": per_second("image_tokens"),
        "model_tflops_per_second": None if work["model_flops"] is None else work["model_flops"] / seconds / 1e12,
        "mfu": utilisation("model_flops"),
        "hfu": utilisation("hardware_flops"),
    }
