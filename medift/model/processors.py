"""Processors of the video-taking families without their video part (no torchvision needed).

The Qwen2-VL, Qwen2.5-VL, SmolVLM and InternVL processors take a video processor, and
every video processor needs torchvision: without it they can be neither built (even with
`video_processor=None`: transformers cannot resolve `VideoProcessorMixin` to check it) nor
loaded (`AutoVideoProcessor` raises). The pipeline only ever gives them images, so each
has an image-only twin here: the same image and text behaviour, an instance of the
family's processor class, registered with `AutoProcessor` under its own name when this
module is imported (medift.model.loading imports it). `load_processor` loads a real
checkpoint of these families through its twin when torchvision is missing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from transformers import (
    AutoProcessor,
    InternVLConfig,
    InternVLProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    SmolVLMConfig,
    SmolVLMProcessor,
)
from transformers.processing_utils import ProcessorMixin

log = logging.getLogger(__name__)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent passes (image_processor, tokenizer, None) on; ProcessorMixin pairs
        # positional arguments with this signature's attributes, so the None is dropped.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class InternVLImageOnlyProcessor(InternVLProcessor):
    """`InternVLProcessor` without its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template=chat_template, **kwargs)


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """`SmolVLMProcessor` without its video processor (torchvision) and without num2words.

    SmolVLMProcessor's own __init__ insists on num2words (used only to write video
    timestamps) and its apply_chat_template reads the video processor's frame settings,
    so both are replaced: the same attributes, then ProcessorMixin's.
    """

    def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kwargs):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


# The family's processor class name (as a real checkpoint saves it) -> its image-only twin.
IMAGE_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "Qwen2VLProcessor": Qwen2VLImageOnlyProcessor,
    "Qwen2_5_VLProcessor": Qwen2_5_VLImageOnlyProcessor,
    "SmolVLMProcessor": SmolVLMImageOnlyProcessor,
    "InternVLProcessor": InternVLImageOnlyProcessor,
}


def register_image_only_processors() -> None:
    """Let `AutoProcessor` find the image-only processors by the class name saved with them."""
    for config_class, processor_class in (
        (Qwen2VLConfig, Qwen2VLImageOnlyProcessor),
        (Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor),
        (SmolVLMConfig, SmolVLMImageOnlyProcessor),
        (InternVLConfig, InternVLImageOnlyProcessor),
    ):
        AutoProcessor.register(config_class, processor_class, exist_ok=True)


register_image_only_processors()


def load_processor(path: str | Path, **kwargs) -> ProcessorMixin:
    """A checkpoint's processor; a video-taking family's through its image-only twin when
    torchvision is missing (said in the log). A load that yields no image processor (as
    AutoProcessor does for a processor class it cannot find: it returns the bare
    tokenizer) is an error naming the class."""
    config_file = Path(path) / "processor_config.json"
    name = json.loads(config_file.read_text()).get("processor_class") if config_file.is_file() else None
    if name in IMAGE_ONLY_PROCESSORS and importlib.util.find_spec("torchvision") is None:
        log.info(
            "%s: loading %s without its video processor (torchvision is not installed; medift uses images only)",
            path,
            name,
        )
        processor = IMAGE_ONLY_PROCESSORS[name].from_pretrained(path, **kwargs)
    else:
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path}: processor {name or type(processor).__name__} loaded without an image processor")
    return processor
