"""Random-initialised checkpoints of the REAL Llama-3.2-11B-Vision configuration.

No hub is reachable, so the real checkpoint cannot be read; its configuration can: the
values below are those of meta-llama/Llama-3.2-11B-Vision(-Instruct)'s config.json, set on
transformers' own MllamaConfig. Two uses:

- `parameter_counts()` instantiates the full-size model on the meta device (no memory) and
  counts its parameters per part: 10.67 B in all, vision tower 0.86 B, the 8 cross-attention
  decoder layers 1.75 B, projector 0.03 B.
- `build_checkpoint(out_dir, ...)` writes a checkpoint with the real widths (hidden sizes,
  heads, intermediate sizes, 560 px tiles of 14 px patches, 4 tiles, the 7680-wide vision
  output and its projector), at full depth or at reduced depth, in bf16 safetensors through
  `save_pretrained`, with a real MllamaProcessor built from code (the real image processor
  settings; a small byte-level BPE tokenizer with Llama 3's special tokens and chat template,
  as medift.testing.tiny_checkpoints builds), so that medift loads it like a real local checkpoint.

Reduced depth keeps the configuration valid: the cross-attention layers are the real ones
below `text_layers` (3, 8, 13, ...; so `text_layers` >= 4), the vision tower's intermediate
layers the real indices clamped to its depth (so the vision output stays 7680 wide and the
projector keeps its real shape). `vocab_size` may be cut for machines where two fp32 copies
of the 0.5 B-parameter embedding and output matrices do not fit; the tokenizer's ids are
below it either way.

    python bench/real_models.py counts
    python bench/real_models.py build OUT_DIR --text_layers 4 --vision_layers 1 --global_layers 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# meta-llama/Llama-3.2-11B-Vision config.json (text_config / vision_config).
TEXT = dict(
    hidden_size=4096,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
VISION = dict(
    hidden_size=1280,
    num_hidden_layers=32,
    num_global_layers=8,
    attention_heads=16,
    intermediate_size=5120,
    image_size=560,
    patch_size=14,
    max_num_tiles=4,
    vision_output_dim=7680,
    intermediate_layers_indices=[3, 7, 15, 23, 30],
    norm_eps=1e-5,
)
REAL_IMAGE_TOKEN_INDEX = 128256


def mllama_config(
    text_layers: int = 40,
    vision_layers: int = 32,
    global_layers: int = 8,
    vocab_size: int = 128256,
    tokenizer=None,
    image_size: int = 560,
):
    """The real configuration, optionally at reduced depth (or vocabulary, or tile size: a CPU cannot
    train on 560 px tiles in minutes); ids from `tokenizer` if given."""
    from transformers import MllamaConfig
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    cross = [i for i in TEXT["cross_attention_layers"] if i < text_layers]
    if not cross:
        raise ValueError(f"text_layers {text_layers}: the first real cross-attention layer is 3, so at least 4 layers")
    if vision_layers < 1 or global_layers < 1:
        raise ValueError("vision_layers and global_layers must be at least 1")
    text = dict(TEXT, num_hidden_layers=text_layers, cross_attention_layers=cross, vocab_size=vocab_size)
    if tokenizer is not None:
        if len(tokenizer) > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        text.update(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    # Duplicate indices are valid (the tower stacks the listed layers' outputs), and keep the output 7680 wide.
    intermediate = [min(i, vision_layers - 1) for i in VISION["intermediate_layers_indices"]]
    if image_size % VISION["patch_size"]:
        raise ValueError(f"image_size {image_size} is not a multiple of the {VISION['patch_size']} px patch")
    vision = dict(
        VISION,
        num_hidden_layers=vision_layers,
        num_global_layers=global_layers,
        image_size=image_size,
        intermediate_layers_indices=intermediate,
        supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(VISION["max_num_tiles"])],
    )
    image_token = tokenizer.image_token_id if tokenizer is not None else REAL_IMAGE_TOKEN_INDEX
    return MllamaConfig(
        vision_config=MllamaVisionConfig(**vision), text_config=MllamaTextConfig(**text), image_token_index=image_token
    )


def parameter_counts(config=None) -> dict[str, int]:
    """Parameters of the model of `config` (default: the full-size real one), built on the meta device."""
    from transformers import MllamaForConditionalGeneration

    config = config or mllama_config()
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    cross = tuple(f"language_model.layers.{i}." for i in config.text_config.cross_attention_layers)
    counts = {"total": 0, "vision": 0, "cross_attention_layers": 0, "projector": 0, "language_model": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        if ".vision_model." in f".{name}":
            counts["vision"] += p.numel()
        elif "multi_modal_projector." in name:
            counts["projector"] += p.numel()
        elif any(c in name for c in cross):
            counts["cross_attention_layers"] += p.numel()
        else:
            counts["language_model"] += p.numel()
    return counts


def mllama_processor(image_size: int = VISION["image_size"]):
    """A real MllamaProcessor: Llama 3.2 Vision's image processor settings (560 px tiles, up to 4),
    a small byte-level BPE tokenizer with Llama 3's special tokens, the chat template's structure."""
    from transformers import MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from medift.testing.tiny_checkpoints.families_a import MLLAMA_TEMPLATE
    from medift.testing.tiny_checkpoints.tokenizer import build_bpe_tokenizer

    tokenizer = build_bpe_tokenizer(
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
            "<|image|>",
        ],
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        extra_special_tokens={"image_token": "<|image|>"},
    )
    side = image_size
    image_processor = MllamaImageProcessorPil(
        size={"height": side, "width": side}, max_image_tiles=VISION["max_num_tiles"]
    )
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=MLLAMA_TEMPLATE)


def build_checkpoint(
    out_dir: str | Path,
    text_layers: int = 40,
    vision_layers: int = 32,
    global_layers: int = 8,
    vocab_size: int = 128256,
    seed: int = 0,
    image_size: int = 560,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a random bf16 checkpoint of the real configuration (at the given depth) with its processor.
    `device`: where the random weights are drawn (a GPU draws the full 11B in seconds)."""
    from transformers import MllamaForConditionalGeneration

    processor = mllama_processor(image_size)
    tokenizer = processor.tokenizer
    config = mllama_config(text_layers, vision_layers, global_layers, vocab_size, tokenizer, image_size)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy of the weights
    try:
        with torch.device(device):
            model = MllamaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        # Open gates (a trained checkpoint's are; tanh(0) = 0 would cut the image off the text).
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(0.5)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = eos
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("counts", help="Parameter counts of the full-size model (meta device), as JSON.")
    build = sub.add_parser("build", help="Write a random bf16 checkpoint of the real configuration.")
    build.add_argument("out_dir")
    build.add_argument("--text_layers", type=int, default=40)
    build.add_argument("--vision_layers", type=int, default=32)
    build.add_argument("--global_layers", type=int, default=8)
    build.add_argument("--vocab_size", type=int, default=TEXT["vocab_size"])
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--image_size", type=int, default=VISION["image_size"])
    build.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "counts":
        print(json.dumps(parameter_counts(), indent=1))
    else:
        out = build_checkpoint(
            args.out_dir,
            args.text_layers,
            args.vision_layers,
            args.global_layers,
            args.vocab_size,
            args.seed,
            args.image_size,
            args.device,
        )
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
