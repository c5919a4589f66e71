"""Loading a local checkpoint (embedded default or real) and choosing what trains."""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from medift.model.families import GROUPS, family_of, group_of_parameter, group_patterns
from medift.model.processors import load_processor
from medift.proxy import PROXY_TOKEN

log = logging.getLogger(__name__)

# LoRA groups: adapters on the attention projections of one part of the model.
LORA_GROUPS = {"lora": "language_model", "lora_vision": "vision"}
# Where a LoRA adapter saved as such (train.lora_save: adapter) lives in a tuned model's directory.
ADAPTER_DIR = "lora_adapter"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base_model(
    path: str, trust_remote_code: bool = False, dtype: str = "float32", device: str | torch.device = "cpu"
):
    """Model and processor from a local directory, offline, weights via safetensors.

    The weights are read in `dtype` straight onto `device` (device_map): a rank's host memory
    never holds a second, full-precision copy of an 11B model. Under ZeRO-3 (inside
    `partitioned_loading`) they load partitioned over the ranks instead (deepspeed.zero.Init;
    transformers reads the checkpoint on rank 0 and scatters it layer by layer), each rank's
    partition on its own device, so no rank ever holds the whole model.

    A directory with a LoRA adapter beside the model (`lora_adapter/`, written by
    `train.lora_save: adapter`) is loaded through peft and merged, so evaluation runs the
    tuned weights either way.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    processor = load_processor(path, local_files_only=True, trust_remote_code=trust_remote_code)
    # ZeRO-3 places every partition itself; transformers refuses a device_map with it.
    placement = {} if is_partitioned_loading() else {"device_map": {"": str(device)}}
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=DTYPES[dtype],
        **placement,
    )
    if (directory / ADAPTER_DIR / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(directory / ADAPTER_DIR), is_trainable=False).merge_and_unload()
    ensure_proxy_token(model, processor)
    return model, processor


@contextmanager
def partitioned_loading(ds_config: dict):
    """While open, `load_base_model` loads ZeRO-3 partitioned (a no-op below stage 3).

    transformers decides how to load from a global weak reference to an HfDeepSpeedConfig,
    so the object is held here for the whole block (resizing embeddings and saving consult it
    too), and unset afterwards: a later load in the same process is a plain one again.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    held = HfDeepSpeedConfig(ds_config)
    try:
        yield held
    finally:
        unset_hf_deepspeed_config()


def is_partitioned_loading() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def full_numel(parameter: torch.Tensor) -> int:
    """Elements of a parameter, whole even when ZeRO-3 holds only this rank's partition of it."""
    return getattr(parameter, "ds_numel", parameter.numel())


def gathered(parameters: list, modifier_rank: int | None = None):
    """The whole of ZeRO-3 partitioned parameters inside the block (what rank `modifier_rank`
    writes is scattered back); plain parameters are whole already."""
    if not any(hasattr(p, "ds_id") for p in parameters):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)


def ensure_proxy_token(model, processor) -> None:
    """Give the tokenizer a proxy placeholder token if the checkpoint has none.

    The embedding row it gets is never used (the proxy overwrites it), but the id
    must exist in the embedding table.
    """
    tokenizer = processor.tokenizer
    if (
        getattr(tokenizer, "proxy_token", None)
        and tokenizer.convert_tokens_to_ids(tokenizer.proxy_token) != tokenizer.unk_token_id
    ):
        return
    tokenizer.add_special_tokens({"additional_special_tokens": [PROXY_TOKEN]})
    tokenizer.proxy_token = PROXY_TOKEN
    tokenizer.proxy_token_id = tokenizer.convert_tokens_to_ids(PROXY_TOKEN)
    old_rows = model.get_input_embeddings().num_embeddings  # a partitioned weight's shape is empty
    if tokenizer.proxy_token_id >= old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # The new rows are the mean of the old ones, not random: loading twice gives the same
        # model, and the output row scores the token at an average logit, never the top one.
        matrices = {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
        weights = [m.weight for m in matrices.values()]
        # Under ZeRO-3 only these (vocabulary x hidden) matrices are gathered, one rank writes them.
        with gathered(weights, modifier_rank=0), torch.no_grad():
            for weight in weights:
                weight[old_rows:] = weight[:old_rows].mean(dim=0)


def known_groups() -> list[str]:
    return list(GROUPS) + list(LORA_GROUPS)


def parse_groups(spec: str | list[str]) -> list[str]:
    groups = [g.strip() for g in (spec.split(",") if isinstance(spec, str) else spec) if g.strip()]
    unknown = sorted(set(groups) - set(known_groups()))
    if unknown:
        raise ValueError(f"unknown train_modules {unknown}; known: {', '.join(known_groups())}")
    return groups


def parameter_groups(model) -> dict[str, str | None]:
    """Each parameter's group (projector, fusion, vision, language_model, or None: never trained)."""
    patterns = group_patterns(model.config)
    return {name: group_of_parameter(name, patterns) for name, _ in model.named_parameters()}


def top_level_modules(model) -> str:
    names = sorted(
        {".".join(n.split(".")[:2]) if n.startswith("model.") else n.split(".")[0] for n, _ in model.named_parameters()}
    )
    return ", ".join(names)


def select_trainable(model, groups: str | list[str], lora_rank: int = 8) -> dict:
    """Freeze everything but the named groups; `lora` / `lora_vision` add peft adapters.

    Adapters are injected first (peft freezes the rest of the model when it does), then
    the plain groups are unfrozen, so LoRA adds to what the other groups train. A group
    that matches no parameter of this model is an error naming the model's top-level
    modules. Returns trainable parameter counts per group for the training summary.
    """
    groups = parse_groups(groups)
    family = family_of(model.config)
    plain = [g for g in groups if g in GROUPS]
    plain += [implied for g in plain for implied in family.implies.get(g, ()) if implied not in plain]
    owners = parameter_groups(model)
    for group in plain:
        if group not in owners.values():
            raise ValueError(
                f"train_modules group {group!r} matches no parameter of {type(model).__name__} "
                f"({family.name}); its top-level modules: {top_level_modules(model)}"
            )
    lora = [LORA_GROUPS[g] for g in groups if g in LORA_GROUPS]
    for part in lora:
        if part in plain:
            raise ValueError(f"train_modules trains {part} fully and with LoRA adapters; choose one")
        if part not in family.lora_targets:
            raise ValueError(f"no LoRA target modules are known for the {part} of {family.name}")
    if lora:
        add_lora(model, [family.lora_targets[part] for part in lora], lora_rank)
        owners = parameter_groups(model)
    for name, p in model.named_parameters():
        is_adapter = "lora_" in name
        p.requires_grad_(is_adapter or owners[name] in plain)
    counts = {group: 0 for group in groups + [g for g in plain if g not in groups]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_" in name:
            part = next(part for part, pattern in family.lora_targets.items() if _adapter_matches(name, pattern))
            counts[next(g for g, target in LORA_GROUPS.items() if target == part)] += full_numel(p)
        else:
            counts[owners[name]] += full_numel(p)
    for group, n in counts.items():
        if n == 0:
            raise ValueError(f"train_modules group {group!r} trains no parameter of {type(model).__name__}")
    total = sum(full_numel(p) for p in model.parameters())
    trained = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    return {"groups": groups, "trainable": trained, "total": total, "per_group": counts}


def _adapter_matches(parameter_name: str, module_pattern: str) -> bool:
    # model.x.q_proj.lora_A.default.weight -> the adapted module model.x.q_proj
    module = parameter_name.split(".lora_")[0]
    return re.search(module_pattern, module) is not None


def lora_config(target_patterns: list[str], rank: int):
    from peft import LoraConfig

    target = "|".join(f"(?:.*(?:{p}))" for p in target_patterns)
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target, lora_dropout=0.0)


def add_lora(model, target_patterns: list[str], rank: int) -> None:
    """LoRA adapters on the modules matching `target_patterns`, injected in place."""
    from peft import inject_adapter_in_model

    config = lora_config(target_patterns, rank)
    inject_adapter_in_model(config, model)
    model._medift_lora_config = config  # kept for saving the adapter as peft's own layout


def unwrap_lora(model, merge: bool = True) -> int:
    """Put the base layers back in place of the LoRA layers, with the adapters folded into
    their weights (`merge`: a plain checkpoint again) or dropped (saved on their own)."""
    from peft.tuners.lora import LoraLayer

    unwrapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
            unwrapped += 1
    return unwrapped


def merge_lora(model) -> int:
    """Fold LoRA adapters into their base weights so the checkpoint is a plain model again."""
    return unwrap_lora(model, merge=True)


def save_lora_adapter(model, out_dir: Path) -> Path:
    """Save the adapters as a peft adapter (`PeftModel.from_pretrained(tuned_model, out_dir/lora_adapter)`).

    The base model saved beside it holds every fully trained group; the adapter's keys
    take peft's `base_model.model.` prefix, which PeftModel expects.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = model._medift_lora_config
    adapter_dir = Path(out_dir) / ADAPTER_DIR
    adapter_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name="default")
    save_file(
        {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()},
        str(adapter_dir / "adapter_model.safetensors"),
    )
    config.base_model_name_or_path = str(Path(out_dir).resolve())
    config.save_pretrained(str(adapter_dir))
    return adapter_dir
