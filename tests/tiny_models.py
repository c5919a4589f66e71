"""Tiny LLaVA and Mllama models built offline, for tests of model-agnostic code."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MllamaConfig,
    MllamaForConditionalGeneration,
)
from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

VOCAB = 100
IMAGE_ID = 99
PROXY_ID = 98


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config)


def llava_inputs(batch: int = 2, k: int = 3) -> dict:
    """<image> x4 (16px / 8px patches), then k proxy placeholders, then text."""
    ids = torch.randint(5, 90, (batch, 12))
    ids[:, 0:4] = IMAGE_ID
    ids[:, 4 : 4 + k] = PROXY_ID
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 16, 16), "labels": ids.clone()}


def tiny_mllama(seed: int = 0) -> MllamaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                                intermediate_size=64, image_size=28, patch_size=14, max_num_tiles=1,
                                intermediate_layers_indices=[0], vision_output_dim=64, supported_aspect_ratios=[[1, 1]])
    text = MllamaTextConfig(hidden_size=32, num_hidden_layers=2, cross_attention_layers=[1], num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB, pad_token_id=0,
                            eos_token_id=2, bos_token_id=1)
    return MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID))


def mllama_inputs(batch: int = 2, k: int = 3) -> dict:
    length = 10
    ids = torch.randint(5, 90, (batch, length))
    ids[:, 0] = IMAGE_ID
    ids[:, 1 : 1 + k] = PROXY_ID
    cross = torch.zeros(batch, length, 1, 1, dtype=torch.long)
    cross[:, 0:] = 1
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(batch, 1, 1, 3, 28, 28),
        "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(batch, 1, 1, dtype=torch.long),
        "cross_attention_mask": cross,
        "labels": ids.clone(),
    }
