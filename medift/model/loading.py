"""Loading a local checkpoint (embedded default or real) and choosing what trains."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from medift.model.tokenizer import PROXY_TOKEN

log = logging.getLogger(__name__)

# Parameter-name fragments of each trainable group, for LLaVA- and Mllama-style models.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "vision": ("vision_tower.", "vision_model."),
    "projector": ("multi_modal_projector.",),
    "fusion": ("cross_attn", "multi_modal_projector."),
    "language_model": ("language_model.", "lm_head."),
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base_model(path: str, trust_remote_code: bool = False, dtype: str = "float32"):
    """Model and processor from a local directory, offline, weights via safetensors."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code, use_safetensors=True, dtype=DTYPES[dtype]
    )
    ensure_proxy_token(model, processor)
    return model, processor


def ensure_proxy_token(model, processor) -> None:
    """Give the tokenizer a proxy placeholder token if the checkpoint has none.

    The embedding row it gets is never used (the proxy overwrites it), but the id
    must exist in the embedding table.
    """
    tokenizer = processor.tokenizer
    if getattr(tokenizer, "proxy_token", None) and tokenizer.convert_tokens_to_ids(tokenizer.proxy_token) != tokenizer.unk_token_id:
        return
    tokenizer.add_special_tokens({"additional_special_tokens": [PROXY_TOKEN]})
    tokenizer.proxy_token = PROXY_TOKEN
    tokenizer.proxy_token_id = tokenizer.convert_tokens_to_ids(PROXY_TOKEN)
    if tokenizer.proxy_token_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def group_of(name: str, groups: list[str]) -> bool:
    return any(fragment in name for group in groups for fragment in MODULE_GROUPS[group])


def select_trainable(model, groups: list[str], lora_rank: int = 8) -> dict:
    """Freeze everything but the named groups; `lora` wraps the language model with peft adapters.

    Returns counts for the training summary. A group that matches no parameter is an
    error, not a silently frozen model.
    """
    groups = [g.strip() for g in groups if g.strip()]
    unknown = set(groups) - set(MODULE_GROUPS) - {"lora"}
    if unknown:
        raise ValueError(f"unknown train_modules {sorted(unknown)}; known: {sorted(MODULE_GROUPS) + ['lora']}")
    plain = [g for g in groups if g != "lora"]
    for group in plain:
        if not any(group_of(n, [group]) for n, _ in model.named_parameters()):
            raise ValueError(f"train_modules group {group!r} matches no parameter of {type(model).__name__}")
    for name, p in model.named_parameters():
        p.requires_grad_(group_of(name, plain))
    if "lora" in groups:
        add_lora(model, lora_rank)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"groups": groups, "trainable": trained, "total": total}


def add_lora(model, rank: int) -> None:
    """LoRA adapters on the language model's attention projections, injected in place."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=r".*language_model.*\.(q_proj|v_proj)", lora_dropout=0.0)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


def merge_lora(model) -> int:
    """Fold LoRA adapters into their base weights so the checkpoint is a plain model again."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
            merged += 1
    return merged
