"""Facts about each VLM family that its processor cannot tell us, in one table.

Keyed by the checkpoint's `model_type` (config.json). Everything else the pipeline needs
(image-token expansion, tiling, grids, masks, positions) comes from the family's own
processor and model code, so a family is added here with a few lines, not with branches
elsewhere. This module reads JSON only: the workflow imports it when it builds the DAG.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# Trainable groups, in the order a parameter is assigned (first match wins, so groups are
# disjoint): a parameter name is matched with re.search against each group's pattern.
GROUPS = ("projector", "fusion", "vision", "language_model")


@dataclass(frozen=True)
class Family:
    name: str
    groups: dict[str, str]  # group -> regex over parameter names
    lora_targets: dict[str, str] = field(default_factory=dict)  # "language_model" / "vision" -> regex over module names
    implies: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group -> groups it trains too
    # Layer classes (names) that hold a tower's activations but have no activation checkpointing of
    # their own (not transformers' GradientCheckpointingLayer): medift.train wraps them itself.
    plain_layers: tuple[str, ...] = ()
    # The processor's key whose last dimension marks each image's real tiles (1) and padding tiles (0);
    # None: the family does not pad images to a fixed tile count.
    tile_mask: str | None = None
    # The FLOP formula of medift/flops.py for this family's layout; None: no formula (no MFU reported).
    flops: str | None = None
    # Whether a question on several images is asked (its processor and model take several images
    # per row; tested on a tiny checkpoint): otherwise such questions are refused and counted.
    several_images: bool = False
    # How an image's encoding, computed once, is handed to `generate` for every prompt about that image
    # (medift.image_encoding): CROSS_ATTENTION_STATES (the vision model's projected output that the
    # decoder's cross-attention layers read, Mllama), PLACEHOLDER_FEATURES (the projected features that
    # fill the image's placeholder tokens, transformers' `mm_encoder_outputs`), or None: every prompt
    # encodes its image itself (the evaluation's `encode_once` falls back to that).
    image_encoding: str | None = None


CROSS_ATTENTION_STATES = "cross_attention_states"
PLACEHOLDER_FEATURES = "mm_encoder_outputs"


def _lm(prefix: str) -> str:
    return rf"(^|\.){prefix}\.|^lm_head\."


SELF_ATTN_QV = r"self_attn\.(q_proj|v_proj)$"

FAMILIES: dict[str, Family] = {}


def _add(model_types: tuple[str, ...], family: Family) -> None:
    for model_type in model_types:
        FAMILIES[model_type] = family


_add(
    ("llava",),
    Family(
        "LLaVA-1.5",
        {
            "projector": r"(^|\.)multi_modal_projector\.",
            "vision": r"(^|\.)vision_tower\.",
            "language_model": _lm("language_model"),
        },
        {
            "language_model": rf"(^|\.)language_model\..*{SELF_ATTN_QV}",
            "vision": rf"(^|\.)vision_tower\..*{SELF_ATTN_QV}",
        },
        several_images=True,
        image_encoding=PLACEHOLDER_FEATURES,
    ),
)
_add(
    ("llava_next",),
    Family(
        "LLaVA-NeXT",
        # image_newline (the learned row separator of the anyres grid) is part of the projection.
        {
            "projector": r"(^|\.)(multi_modal_projector\.|image_newline$)",
            "vision": r"(^|\.)vision_tower\.",
            "language_model": _lm("language_model"),
        },
        {
            "language_model": rf"(^|\.)language_model\..*{SELF_ATTN_QV}",
            "vision": rf"(^|\.)vision_tower\..*{SELF_ATTN_QV}",
        },
        image_encoding=PLACEHOLDER_FEATURES,
    ),
)
_add(
    ("mllama",),
    Family(
        "Mllama (Llama-3.2-Vision)",
        # fusion: the whole cross-attention decoder layers (attention, gates, their MLP and norms:
        # the layers Llama 3.2 Vision's adapter training adds); which decoder layers they are is
        # in each model's config. Training fusion trains the projector too, as the reference
        # (torchtune's fusion parameters) counts the projection head among them.
        {
            "projector": r"(^|\.)multi_modal_projector\.",
            "fusion": r"(^|\.)language_model\.layers\.({cross_attention_layers})\.",
            "vision": r"(^|\.)vision_model\.",
            "language_model": _lm("language_model"),
        },
        {
            "language_model": rf"(^|\.)language_model\..*{SELF_ATTN_QV}",
            "vision": rf"(^|\.)vision_model\..*{SELF_ATTN_QV}",
        },
        implies={"fusion": ("projector",)},
        # The vision encoder's layers (local and gated global) are plain nn.Modules in transformers;
        # only the decoder's layers checkpoint themselves.
        plain_layers=("MllamaVisionEncoderLayer",),
        # The processor pads every image to max_image_tiles; aspect_ratio_mask marks the real ones.
        tile_mask="aspect_ratio_mask",
        flops="mllama",
        several_images=True,
        image_encoding=CROSS_ATTENTION_STATES,
    ),
)
_add(
    ("qwen2_vl", "qwen2_5_vl"),
    Family(
        "Qwen2-VL / Qwen2.5-VL",
        {"projector": r"(^|\.)visual\.merger\.", "vision": r"(^|\.)visual\.", "language_model": _lm("language_model")},
        # (3-D M-RoPE positions: the model derives them in generate; none are passed.)
        {
            "language_model": rf"(^|\.)language_model\..*{SELF_ATTN_QV}",
            "vision": r"(^|\.)visual\.blocks\.\d+\.attn\.qkv$",
        },
        image_encoding=PLACEHOLDER_FEATURES,
    ),
)
_add(
    ("idefics3", "smolvlm"),
    Family(
        "Idefics3 / SmolVLM",
        {"projector": r"(^|\.)connector\.", "vision": r"(^|\.)vision_model\.", "language_model": _lm("text_model")},
        {"language_model": rf"(^|\.)text_model\..*{SELF_ATTN_QV}", "vision": rf"(^|\.)vision_model\..*{SELF_ATTN_QV}"},
        image_encoding=PLACEHOLDER_FEATURES,
    ),
)
_add(
    ("gemma3",),
    Family(
        "Gemma 3",
        {
            "projector": r"(^|\.)multi_modal_projector\.",
            "vision": r"(^|\.)vision_tower\.",
            "language_model": _lm("language_model"),
        },
        {
            "language_model": rf"(^|\.)language_model\..*{SELF_ATTN_QV}",
            "vision": rf"(^|\.)vision_tower\..*{SELF_ATTN_QV}",
        },
        image_encoding=PLACEHOLDER_FEATURES,
    ),
)
_add(
    ("internvl",),
    Family(
        "InternVL (transformers-native)",
        {
            "projector": r"(^|\.)multi_modal_projector\.",
            "vision": r"(^|\.)vision_tower\.",
            "language_model": _lm("language_model"),
        },
        {
            "language_model": rf"(^|\.)language_model\..*{SELF_ATTN_QV}",
            "vision": r"(^|\.)vision_tower\..*attention\.(q_proj|v_proj)$",
        },
        image_encoding=PLACEHOLDER_FEATURES,
    ),
)


def family_of(config) -> Family:
    """The family entry of a model's config; an unknown model_type is an error naming the known ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not a known VLM family; known: {', '.join(sorted(FAMILIES))} "
            "(add its module names to medift/model/families.py)"
        )
    return FAMILIES[model_type]


def group_patterns(config) -> dict[str, re.Pattern]:
    """Compiled group patterns of a model, with per-model facts (Mllama's cross-attention layers) filled in."""
    family = family_of(config)
    text = getattr(config, "text_config", config)
    layers = "|".join(str(i) for i in getattr(text, "cross_attention_layers", None) or []) or "NONE"
    return {
        group: re.compile(pattern.replace("{cross_attention_layers}", layers))
        for group, pattern in family.groups.items()
    }


def group_of_parameter(name: str, patterns: dict[str, re.Pattern]) -> str | None:
    for group in GROUPS:
        if group in patterns and patterns[group].search(name):
            return group
    return None


# ------------------------------------------------------------------ image size


def native_image_size(checkpoint: str | Path) -> int:
    """The square image side a checkpoint's processor works at, from its preprocessor_config.json.

    Shards store images at this size (letterboxed once), and the processor then does the
    model's own resizing, tiling or patching: Mllama's tile (560), LLaVA's crop (336),
    Idefics3's tile (`max_image_size`), Gemma 3's 896, and for Qwen2-VL's dynamic resolution
    the side whose patch grid holds `max_pixels` (capped at 448 px so a description-sized
    image stays a few hundred tokens).
    """
    # transformers 5 writes the image processor's settings into processor_config.json; older
    # checkpoints (and the hub's) have preprocessor_config.json.
    candidates = [Path(checkpoint) / name for name in ("preprocessor_config.json", "processor_config.json")]
    path = next((c for c in candidates if c.is_file() and _image_settings(c)), None)
    if path is None:
        raise FileNotFoundError(
            f"{checkpoint}: no image processor settings (preprocessor_config.json); set image_size in the config"
        )
    settings = _image_settings(path)
    size, patch, merge = settings.get("size") or {}, settings.get("patch_size"), settings.get("merge_size")
    if patch and merge and isinstance(size, dict) and {"shortest_edge", "longest_edge"} <= set(size):
        # Qwen2-VL's dynamic resolution: size holds min/max pixels (areas), the grid unit is patch x merge.
        unit = patch * merge
        return max(unit, min(QWEN_MAX_SIDE, math.isqrt(int(size["longest_edge"]))) // unit * unit)
    for key in ("max_image_size", "crop_size", "size"):
        side = _side(settings.get(key))
        if side:
            return side
    raise ValueError(
        f"{path}: cannot tell the image size (no crop_size/size/max_image_size); set image_size in the config"
    )


QWEN_MAX_SIDE = 448


def _image_settings(path: Path) -> dict:
    settings = json.loads(path.read_text())
    return settings.get("image_processor", settings if "size" in settings or "crop_size" in settings else {})


def _side(value) -> int | None:
    if isinstance(value, int):
        return value
    if not isinstance(value, dict):
        return None
    if "height" in value and "width" in value:
        return max(int(value["height"]), int(value["width"]))
    if "longest_edge" in value and "shortest_edge" not in value:
        return int(value["longest_edge"])
    if "shortest_edge" in value and "longest_edge" not in value:
        return int(value["shortest_edge"])
    return None
