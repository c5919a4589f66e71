"""Tiny random checkpoints of Mllama, LLaVA-1.5, LLaVA-NeXT and Gemma 3.

Each builder mimics one real checkpoint's layout: the family's model and config classes
at toy sizes, the family's processor with its PIL image processor at a toy image size,
a byte-level BPE tokenizer with the real special tokens, and a chat template of the real
one's structure. The templates take the pipeline's message shape (user turns: an optional
leading {"type": "image"} part and a {"type": "text"} part; assistant turns: one text
part) and a prompt rendered with `add_generation_prompt=True` is a string prefix of the
conversation that continues it with an assistant turn.

PaliGemma is not built: see `PALIGEMMA_UNSUPPORTED`.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
from transformers.models.mllama.image_processing_pil_mllama import (
    MllamaImageProcessorPil,
    get_all_supported_aspect_ratios,
)

from medift.testing.tiny_checkpoints.tokenizer import build_bpe_tokenizer

HIDDEN = 32
HEADS = 2

PALIGEMMA_UNSUPPORTED = (
    "PaliGemmaProcessor does not take a chat-templated conversation: it inserts <bos> after the "
    "last <image> of each text (mid-text when a row has none) and appends '\\n' to every text, so a "
    "rendered prompt is no longer a prefix of its conversation; it raises when `images` is None; it "
    "returns its own `labels` (only for a `suffix=` target, else all -100) and token_type_ids that "
    "make the whole text one bidirectional prefix, so the answer would attend to itself in training."
)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


def _set_generation_ids(model, tokenizer, eos_tokens: list[str]) -> None:
    """Generation pads with the tokenizer's pad token and stops at the template's end of turn."""
    eos = _ids(tokenizer, *eos_tokens)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]


# --- Mllama (Llama 3.2 Vision) -------------------------------------------------------

MLLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def build_mllama(seed: int = 0):
    """Llama-3.2-11B-Vision-Instruct: a tiled ViT whose features enter a Llama decoder
    through gated cross-attention layers; one <|image|> token per image in the text.

    28 px tiles of 14 px patches, up to 2 tiles per image (aspect ratios 1x1, 1x2, 2x1).
    """
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
    tile, patch, max_tiles = 28, 14, 2
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=MLLAMA_TEMPLATE)
    vision = MllamaVisionConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        image_size=tile,
        patch_size=patch,
        max_num_tiles=max_tiles,
        intermediate_layers_indices=[0],
        vision_output_dim=2 * HIDDEN,
        supported_aspect_ratios=[list(ratio) for ratio in get_all_supported_aspect_ratios(max_tiles)],
    )
    text = MllamaTextConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        cross_attention_layers=[1],
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        # The cross-attention gates start at 0 (tanh(0) = 0: the image cannot reach the text and no
        # gradient reaches the vision tower); a pretrained checkpoint's gates are open.
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(0.5)
    _set_generation_ids(model, tokenizer, ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"])
    return model, processor


# --- LLaVA-1.5 and LLaVA-NeXT ------------------------------------------------------------

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

# Vicuna v1 conversation format of LLaVA-1.5: "USER: <image>\nQ ASSISTANT: A</s>USER: ...".
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] + ' ' "
    "}}{% endif %}"
    "{% endfor %}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Mistral instruct format of llava-v1.6-mistral-7b: "[INST] <image>\nQ [/INST] A</s>[INST] ...".
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% else %}{{ ' ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def _llava_tokenizer():
    return build_bpe_tokenizer(
        LLAVA_SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _clip_vision(image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=HIDDEN,
    )


def _decoder_kwargs(tokenizer) -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_llava(seed: int = 0):
    """llava-hf/llava-1.5-7b-hf: CLIP ViT (penultimate layer, CLS dropped), 2-layer GELU MLP
    projector, Llama (Vicuna) decoder; each <image> expands to one token per patch.

    28 px images (shortest-edge resize, center crop) of 7 px patches: 16 image tokens.
    """
    tokenizer = _llava_tokenizer()
    image_size, patch = 28, 7
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
        image_token="<image>",
    )
    config = LlavaConfig(
        vision_config=_clip_vision(image_size, patch),
        text_config=LlamaConfig(**_decoder_kwargs(tokenizer)),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer, ["</s>"])
    return model, processor


def build_llava_next(seed: int = 0):
    """llava-hf/llava-v1.6-mistral-7b-hf: LLaVA-NeXT "anyres" — the image is resized to the
    best of `image_grid_pinpoints`, cut into base-size tiles plus a downscaled overview,
    and the tile features are unpadded and laid out in rows ended by `image_newline`;
    Mistral decoder.

    28 px tiles of 7 px patches, grids 1x2 and 2x1: 16 overview tokens + up to 36 tile
    tokens (with newlines) per image, depending on its aspect ratio.
    """
    tokenizer = _llava_tokenizer()
    image_size, patch = 28, 7
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_TEMPLATE,
        image_token="<image>",
    )
    config = LlavaNextConfig(
        vision_config=_clip_vision(image_size, patch),
        text_config=MistralConfig(**_decoder_kwargs(tokenizer), sliding_window=None),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer, ["</s>"])
    return model, processor


# --- Gemma 3 ----------------------------------------------------------------------------

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}{% elif part['type'] == 'text' %}{{ part['text'] "
    "| trim }}{% endif %}"
    "{% endfor %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def build_gemma3(seed: int = 0):
    """google/gemma-3-4b-it: SigLIP ViT, average-pooled to `mm_tokens_per_image` soft tokens
    and projected into a Gemma 3 decoder (sliding + global attention, tied embeddings);
    <start_of_image> expands to "\\n\\n<start_of_image><image_soft_token>*N<end_of_image>\\n\\n".

    32 px images of 8 px patches (4x4), pooled 2x2: 4 image soft tokens per image.
    """
    tokenizer = build_bpe_tokenizer(
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    image_size, patch, image_tokens = 32, 8, 4
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=image_tokens,
    )
    vision = SiglipVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        image_size=image_size,
        patch_size=patch,
        vision_use_head=False,
    )
    text = Gemma3TextConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=HIDDEN // HEADS,
        query_pre_attn_scalar=HIDDEN // HEADS,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    boi, eoi, image_token = _ids(tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=image_tokens,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image_token,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        # The projection starts at zeros (no image signal, no gradient to the vision tower);
        # a pretrained checkpoint's is not.
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=HIDDEN**-0.5)
    _set_generation_ids(model, tokenizer, ["<end_of_turn>", "<eos>"])
    return model, processor


BUILDERS = {
    "mllama": build_mllama,
    "llava": build_llava,
    "llava_next": build_llava_next,
    "gemma3": build_gemma3,
}
