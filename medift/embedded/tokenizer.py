"""A word-level tokenizer built from code, for the embedded default model.

A real checkpoint brings its own tokenizer; the embedded default has to be built
offline. Word level (not BPE) keeps sequences short and makes every vocabulary
value a single token, which is what lets a 3M-parameter model learn to bind an
option letter to an option within CPU minutes. Multi-word attribute values
("light blue", "ill defined") are matched first so that they stay one token too,
as a real LLM's tokenizer keeps common phrases cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from medift.proxy import PROXY_TOKEN

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE_TOKEN, PROXY_TOKEN]

_WORD = r"[A-Za-z0-9]+(?:[-'/][A-Za-z0-9]+)*"
_OTHER = r"\n|[^\sA-Za-z0-9]"
_LETTER_DOT = r"[A-Z]\.(?![A-Za-z0-9])"


def split_pattern(phrases: Iterable[str], letter_dot: bool = False) -> str:
    """Regex matching multi-word phrases first, then words, newlines and punctuation.

    With `letter_dot`, a capital letter followed by a full stop ("A.") is one piece, so an
    option line `A. red` puts the letter token right before its option and the answer
    `The correct answer is A.` ends in that same token. A word is still one piece ("US.",
    "USER:" are unaffected): the alternatives are tried left to right at each position.
    """
    multi = sorted({p for p in phrases if " " in p}, key=lambda p: (-len(p), p))
    alternatives = [re.escape(p) for p in multi] + ([_LETTER_DOT] if letter_dot else []) + [_WORD, _OTHER]
    return "|".join(alternatives)


def pre_tokenize(text: str, pattern: str) -> list[str]:
    return re.findall(pattern, text)


def build_tokenizer(corpus: Iterable[str], phrases: Iterable[str], letter_dot: bool = False) -> PreTrainedTokenizerFast:
    """Vocabulary = special tokens + every piece of `corpus`, in first-seen order.

    First-seen order (not a set) keeps token ids identical across runs.
    """
    pattern = split_pattern(phrases, letter_dot)
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for text in corpus:
        for piece in pre_tokenize(text, pattern):
            vocab.setdefault(piece, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # invert=True: the pattern names the pieces to keep; whitespace between them goes.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    core.add_special_tokens(SPECIAL_TOKENS)
    # Pieces are joined by spaces on decode; WordPiece's cleanup glues punctuation back.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "proxy_token": PROXY_TOKEN},
    )
    tokenizer.padding_side = "left"
    return tokenizer
