"""The embedded LLaVA (`base_model.path: embedded_llava`, models/embedded-base): a tiny
LLaVA built offline from code, pre-trained by `pretrain.py` and the teacher of the default
embedded Mllama (`mllama.py`).

It is a standard `LlavaForConditionalGeneration` (CLIP vision tower, MLP projector,
Llama decoder) with a word-level tokenizer and a `LlavaProcessor`, saved with
`save_pretrained` so that the pipeline loads it through the same `from_pretrained`
path as a real local checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from medift import mcq
from medift.chat import CAPTION_INSTRUCTION
from medift.datasets import DATASETS
from medift.embedded import general
from medift.embedded.tokenizer import IMAGE_TOKEN, build_tokenizer
from medift.settings import EMBEDDED_DATASETS, EMBEDDED_IMAGE_SIZE  # shared with the workflow

# One template for every message shape the pipeline writes: a user turn whose content
# is a list of {"type": "image"} / {"type": "text"} parts, an assistant turn with text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}\n"
    "{% else %}ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CONTEXT_PREFIX = "Context:"


@dataclass
class EmbeddedModelConfig:
    image_size: int = field(default=EMBEDDED_IMAGE_SIZE, metadata={"help": "Square input size in pixels."})
    patch_size: int = field(default=8, metadata={"help": "ViT patch size; (image/patch)^2 image tokens."})
    vision_hidden: int = field(default=128, metadata={"help": "CLIP vision tower width."})
    vision_layers: int = field(default=2, metadata={"help": "CLIP vision tower depth."})
    text_hidden: int = field(default=192, metadata={"help": "Llama decoder width."})
    text_layers: int = field(default=4, metadata={"help": "Llama decoder depth."})
    heads: int = field(default=4, metadata={"help": "Attention heads in both towers."})
    max_positions: int = field(default=512, metadata={"help": "Longest sequence the decoder takes."})
    letter_dot_tokens: bool = field(
        default=True,
        metadata={
            "help": (
                "Tokenize an option letter with its full stop ('A.') as one token, so the letter sits right before "
                "its option (the shipped model: on)."
            )
        },
    )
    tie_word_embeddings: bool = field(
        default=True,
        metadata={
            "help": (
                "Share the decoder's input and output embeddings, so that copying an option's letter, or matching a "
                "predicted value to its option, needs no separate output map (the shipped model: on)."
            )
        },
    )


# The datasets the shipped model was built with: EMBEDDED_DATASETS (medift/settings.py).


def tokenizer_corpus(datasets: tuple[str, ...] = EMBEDDED_DATASETS) -> tuple[list[str], list[str]]:
    """Every text the embedded model must be able to read or write, and its multi-word phrases.

    The vocabulary is closed: it is built from the prompt templates and from the
    attribute vocabularies of the general domain and of `datasets`. That list is fixed to
    the datasets the shipped model (models/embedded-base) was built with, not every
    registered one, so that registering a dataset changes no token id of that model.
    """
    corpus = [
        CHAT_TEMPLATE.replace("{%", " ").replace("%}", " "),
        "USER: ASSISTANT: Yes. No. Yes No yes no",
        CAPTION_INSTRUCTION,
        CONTEXT_PREFIX,
        mcq.build_mcq_instruction("What is the ?", ["x"] * 26),
        mcq.format_answer(0),
        *general.DESCRIBE_REQUESTS,
        "Is the ?",
        " ".join(mcq.LETTERS),
    ]
    phrases: list[str] = []
    vocabularies = [(general.ATTRIBUTES, general.QUESTION_TEXT)]
    vocabularies += [(DATASETS[name].ATTRIBUTES, DATASETS[name].QUESTION_TEXT) for name in datasets]
    for attributes, questions in vocabularies:
        for key, values in attributes.items():
            corpus.append(questions[key])
            corpus.append(key.replace("_", " "))
            corpus.extend(values)
            phrases.extend(values)
    return corpus, phrases


def build_processor(config: EmbeddedModelConfig) -> LlavaProcessor:
    corpus, phrases = tokenizer_corpus()
    tokenizer = build_tokenizer(corpus, phrases, letter_dot=config.letter_dot_tokens)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_model(config: EmbeddedModelConfig, processor: LlavaProcessor, seed: int) -> LlavaForConditionalGeneration:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=config.text_hidden,
        intermediate_size=2 * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
