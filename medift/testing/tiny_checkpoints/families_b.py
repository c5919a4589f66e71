"""Tiny random Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM and InternVL checkpoints.

Each builder returns `(model, processor)`: the family's own model class, built from its
config classes at toy sizes, and the family's processor with a PIL image processor, a
byte-level BPE tokenizer holding the family's special tokens and a chat template of the
real one's structure.

Without torchvision, the Qwen2-VL, Qwen2.5-VL, SmolVLM and InternVL processors are their
image-only twins from `medift.model.processors` (no video processor).
"""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from medift.model.processors import (
    InternVLImageOnlyProcessor,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    SmolVLMImageOnlyProcessor,
)
from medift.testing.tiny_checkpoints.tokenizer import build_bpe_tokenizer, default_corpus

# Toy sizes shared by all families.
TEXT_HIDDEN = 64
VISION_HIDDEN = 32
HEADS = 2
LAYERS = 2
MAX_POSITIONS = 2048


# --- Chat templates ---------------------------------------------------------------------
# Each accepts user turns [{"type": "image"}?, {"type": "text", ...}], assistant turns
# [{"type": "text", ...}], string contents and a leading system turn. The generation
# prompt is a string prefix of the same conversation with the assistant turn rendered.

# Qwen2-VL / Qwen2.5-VL: ChatML with a default system turn, images wrapped in vision tokens.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _idefics_style_template(bos: str) -> str:
    """Idefics3 / SmolVLM: `Role:` (no space before an image) then parts, `<end_of_utterance>`."""
    return (
        bos + "{% for message in messages %}"
        "{{ message['role'] | capitalize }}"
        "{% if message['content'] is string %}: {{ message['content'] }}"
        "{% else %}"
        "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "<end_of_utterance>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )


IDEFICS3_CHAT_TEMPLATE = _idefics_style_template("<|begin_of_text|>")
SMOLVLM_CHAT_TEMPLATE = _idefics_style_template("<|im_start|>")

# InternVL (transformers-native "-hf" checkpoints): ChatML, an image is `<IMG_CONTEXT>\n`.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    return [*default_corpus(), "You are a helpful assistant.", "User: Assistant:"]


def _set_generation_tokens(model, tokenizer, end_of_turn: str) -> None:
    """Make generation pad with the tokenizer's pad token and stop at the template's end of turn."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    model.generation_config.bos_token_id = tokenizer.bos_token_id


# --- Qwen2-VL and Qwen2.5-VL -------------------------------------------------------------

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_PATCH = 14
QWEN_MERGE = 2
# 56x56 .. 168x168 pixels: 2x2 .. 6x6 merged patches, 4 .. 36 image tokens per image.
QWEN_MIN_PIXELS = (2 * QWEN_PATCH * QWEN_MERGE) ** 2
QWEN_MAX_PIXELS = (6 * QWEN_PATCH * QWEN_MERGE) ** 2
# Temporal, height, width sections of the rotary half-dimension (head dim 32 -> 16).
QWEN_MROPE_SECTION = [4, 6, 6]


def _chatml_tokenizer(more_tokens: list[str], named_tokens: dict[str, str]):
    """A Qwen2-style tokenizer (ChatML special tokens, no BOS) with `more_tokens` after Qwen's."""
    return build_bpe_tokenizer(
        [*QWEN_SPECIAL_TOKENS, *more_tokens],
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        corpus=_corpus(),
        extra_special_tokens=named_tokens,
    )


def _qwen_tokenizer():
    return _chatml_tokenizer(
        [],
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def _qwen_processor(processor_class):
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        patch_size=QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=2,
    )
    return processor_class(
        image_processor=image_processor, tokenizer=_qwen_tokenizer(), chat_template=QWEN_VL_CHAT_TEMPLATE
    )


def _decoder_sizes(tokenizer) -> dict:
    """The toy decoder every family here shares: sizes and the tokenizer's vocabulary and ids."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _qwen_text_kwargs(tokenizer) -> dict:
    return dict(
        **_decoder_sizes(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": QWEN_MROPE_SECTION},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def _qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def build_qwen2_vl(seed: int = 0):
    """Mimics Qwen/Qwen2-VL-2B-Instruct: ViT (patch 14, 2x2 merger) + Qwen2 decoder with M-RoPE."""
    processor = _qwen_processor(Qwen2VLImageOnlyProcessor)
    tokenizer = processor.tokenizer
    config = Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(**_qwen_text_kwargs(tokenizer)),
        vision_config=Qwen2VLVisionConfig(
            depth=LAYERS,
            embed_dim=VISION_HIDDEN,
            hidden_size=TEXT_HIDDEN,
            mlp_ratio=2,
            num_heads=HEADS,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=True,  # as the 2B checkpoint
        **_qwen_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    _set_generation_tokens(model, tokenizer, "<|im_end|>")
    return model, processor


def build_qwen2_5_vl(seed: int = 0):
    """Mimics Qwen/Qwen2.5-VL-3B-Instruct: windowed-attention ViT (SwiGLU, RMSNorm) + Qwen2 decoder."""
    processor = _qwen_processor(Qwen2_5_VLImageOnlyProcessor)
    tokenizer = processor.tokenizer
    config = Qwen2_5_VLConfig(
        text_config=Qwen2_5_VLTextConfig(**_qwen_text_kwargs(tokenizer)),
        vision_config=Qwen2_5_VLVisionConfig(
            depth=LAYERS,
            hidden_size=VISION_HIDDEN,
            intermediate_size=2 * VISION_HIDDEN,
            out_hidden_size=TEXT_HIDDEN,
            num_heads=HEADS,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=2,
            window_size=2 * QWEN_PATCH * QWEN_MERGE,  # 2x2 merged patches per window
            fullatt_block_indexes=[LAYERS - 1],  # windowed, then full attention
        ),
        tie_word_embeddings=True,  # as the 3B checkpoint
        **_qwen_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _set_generation_tokens(model, tokenizer, "<|im_end|>")
    return model, processor


# --- Idefics3 and SmolVLM -----------------------------------------------------------------

IDEFICS_IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
# Tiles of 32 pixels, images resized to at most 64: up to 2x2 tiles + the global image.
IDEFICS_TILE = 32
IDEFICS_LONGEST_EDGE = 2 * IDEFICS_TILE


def _idefics_tokenizer(first_tokens: list[str], *, bos: str, pad: str):
    """Idefics3/SmolVLM tokens: image placeholders, tile positions <row_i_col_j> up to 6x6."""
    return build_bpe_tokenizer(
        [*first_tokens, *IDEFICS_IMAGE_TOKENS, *ROW_COL_TOKENS],
        bos_token=bos,
        eos_token="<end_of_utterance>",
        pad_token=pad,
        corpus=_corpus(),
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )


def _idefics_vision_kwargs(patch_size: int) -> dict:
    return dict(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=IDEFICS_TILE,
        patch_size=patch_size,
    )


def _llama_text_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(**_decoder_sizes(tokenizer), rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id)


def _image_seq_len(patch_size: int, scale_factor: int) -> int:
    return (IDEFICS_TILE // patch_size) ** 2 // scale_factor**2


IDEFICS3_PATCH = 8
IDEFICS3_SCALE = 2  # 4x4 patches per tile -> 2x2 = 4 image tokens per tile


def _build_idefics_layout(
    seed: int,
    *,
    first_tokens: list[str],
    bos: str,
    pad: str,
    patch: int,
    scale: int,
    image_processor_class,
    processor_class,
    config_class,
    vision_config_class,
    model_class,
    chat_template: str,
    tied: bool,
):
    """The Idefics3 layout (SigLIP tiles + global image, pixel-shuffle connector, Llama-style
    decoder), shared by Idefics3 and SmolVLM, which differ in the arguments."""
    tokenizer = _idefics_tokenizer(first_tokens, bos=bos, pad=pad)
    image_processor = image_processor_class(
        size={"longest_edge": IDEFICS_LONGEST_EDGE},
        max_image_size={"longest_edge": IDEFICS_TILE},
        do_image_splitting=True,
    )
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=_image_seq_len(patch, scale),
        chat_template=chat_template,
    )
    config = config_class(
        text_config=_llama_text_config(tokenizer),
        vision_config=vision_config_class(**_idefics_vision_kwargs(patch)),
        scale_factor=scale,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    _set_generation_tokens(model, tokenizer, "<end_of_utterance>")
    return model, processor


def build_idefics3(seed: int = 0):
    """Mimics HuggingFaceM4/Idefics3-8B-Llama3: SigLIP tiles + global image, pixel-shuffle connector, Llama."""
    return _build_idefics_layout(
        seed,
        first_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"],
        bos="<|begin_of_text|>",
        pad="<|reserved_special_token_0|>",
        patch=IDEFICS3_PATCH,
        scale=IDEFICS3_SCALE,
        image_processor_class=Idefics3ImageProcessorPil,
        processor_class=Idefics3Processor,
        config_class=Idefics3Config,
        vision_config_class=Idefics3VisionConfig,
        model_class=Idefics3ForConditionalGeneration,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
        tied=False,
    )


SMOLVLM_PATCH = 4
SMOLVLM_SCALE = 4  # as SmolVLM: 8x8 patches per tile -> 2x2 = 4 image tokens per tile


def build_smolvlm(seed: int = 0):
    """Mimics HuggingFaceTB/SmolVLM-256M-Instruct: Idefics3 layout, scale factor 4, tied SmolLM decoder."""
    return _build_idefics_layout(
        seed,
        first_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|im_start|>",
        pad="<|im_end|>",
        patch=SMOLVLM_PATCH,
        scale=SMOLVLM_SCALE,
        image_processor_class=SmolVLMImageProcessorPil,
        processor_class=SmolVLMImageOnlyProcessor,
        config_class=SmolVLMConfig,
        vision_config_class=SmolVLMVisionConfig,
        model_class=SmolVLMForConditionalGeneration,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        tied=True,
    )


# --- InternVL ----------------------------------------------------------------------------

INTERNVL_TILE = 32
INTERNVL_PATCH = 8
INTERNVL_DOWNSAMPLE = 0.5  # 4x4 patches per tile -> 2x2 = 4 image tokens per tile
INTERNVL_MAX_TILES = 4  # up to 4 tiles + a thumbnail


def build_internvl(seed: int = 0):
    """Mimics OpenGVLab/InternVL3-1B-hf: InternViT tiles + thumbnail, pixel-shuffle MLP, Qwen2 decoder."""
    tokenizer = _chatml_tokenizer(
        ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=INTERNVL_MAX_TILES,
    )
    image_seq_length = int((INTERNVL_TILE // INTERNVL_PATCH) ** 2 * INTERNVL_DOWNSAMPLE**2)
    processor = InternVLImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    text = Qwen2Config(
        **_decoder_sizes(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    vision = InternVLVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=[INTERNVL_TILE, INTERNVL_TILE],
        patch_size=[INTERNVL_PATCH, INTERNVL_PATCH],
    )
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=processor.image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=INTERNVL_DOWNSAMPLE,
        tie_word_embeddings=True,  # as the 1B checkpoint
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    _set_generation_tokens(model, tokenizer, "<|im_end|>")
    return model, processor


BUILDERS = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "internvl": build_internvl,
}
