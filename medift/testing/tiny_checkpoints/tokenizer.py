"""A byte-level BPE tokenizer built offline, for tiny checkpoints of real VLM families.

Real checkpoints bring their own tokenizers; tests need one of the same kind (byte-level
BPE, the family's special tokens, Llama-3/Qwen2 style pre-tokenization) without a hub.
Training on a fixed corpus with a fixed vocabulary size is deterministic, so two builds
give the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from medift import mcq
from medift.chat import CAPTION_INSTRUCTION

# The split pattern of Llama 3 and Qwen2 tokenizers: newlines are their own pieces, so a
# prompt followed by its response tokenizes as the prompt's tokens followed by more
# (prefix-stable), as the real tokenizers do.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def default_corpus() -> list[str]:
    """Texts the pipeline writes (prompts, answers, the medical vocabularies), to learn merges from."""
    from medift.datasets import DATASETS

    # Every answer letter, so that " A" ... " Z" are single tokens after the answer prefix, as
    # in the real families' tokenizers.
    # (Repeated: BPE learns the most frequent merges first.)
    answers = [mcq.format_answer(i) for i in range(len(mcq.LETTERS))] * 20
    texts = [
        CAPTION_INSTRUCTION,
        mcq.build_mcq_instruction("What is the color?", ["red", "blue", "green", "white"]),
        *answers,
        "user assistant system",
    ]
    for adapter in DATASETS.values():
        for key, values in adapter.ATTRIBUTES.items():
            texts.append(adapter.QUESTION_TEXT[key])
            texts.append(", ".join(f"{value} {key.replace('_', ' ')}" for value in values))
    return texts


def build_bpe_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    unk_token: str | None = None,
    vocab_size: int = 600,
    corpus: Iterable[str] | None = None,
    extra_special_tokens: dict[str, str] | None = None,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `special_tokens` first (ids 0..n-1), merges learned from `corpus`.

    `extra_special_tokens` names attributes the family's processor reads from its tokenizer
    (e.g. {"image_token": "<|image|>"}).
    """
    core = Tokenizer(models.BPE(unk_token=unk_token))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        extra_special_tokens=extra_special_tokens or {},
        padding_side=padding_side,  # a constructor argument, so that it is saved with the tokenizer
    )
    return tokenizer
