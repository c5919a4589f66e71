"""The one multiple-choice prompt builder and answer parser (method.md's protocol)."""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase
ANSWER_PREFIX = "The correct answer is"


def option_letters(n_options: int) -> list[str]:
    return list(LETTERS[:n_options])


def build_mcq_instruction(question: str, options: list[str] | tuple[str, ...]) -> str:
    """The paper's evaluation prompt, verbatim (method.md)."""
    letters = option_letters(len(options))
    lines = [question]
    lines += [f"{letter}. {option}" for letter, option in zip(letters, options)]
    choice = " or ".join(letters)
    lines.append(f"Response with only the letter of the correct choice, starting with \"{ANSWER_PREFIX} [{choice}]\".")
    return "\n".join(lines)


def format_answer(answer_index: int) -> str:
    """The response a model that follows the instruction gives."""
    return f"{ANSWER_PREFIX} {LETTERS[answer_index]}."


_AFTER_PREFIX = re.compile(re.escape(ANSWER_PREFIX) + r"\s*(\S+)", re.IGNORECASE)


def parse_answer_letter(output: str, n_options: int) -> str | None:
    """The letter after `The correct answer is`, or None when there is none.

    As the reference does, the word after the prefix is stripped of `.*[]`; unlike
    loose harnesses, a word that is not exactly one valid letter is a parse failure,
    never a substring match (`Because` does not count as `B`).
    """
    match = _AFTER_PREFIX.search(output)
    if match is None:
        return None
    token = match.group(1).strip(".*[]:,;\"'()")
    if len(token) == 1 and token.upper() in LETTERS[:n_options]:
        return token.upper()
    return None


def rotate_options(options: list[str] | tuple[str, ...], answer_index: int, shift: int) -> tuple[list[str], int]:
    """The options moved `shift` places to the left (wrapping), and the answer's new index.

    Circular evaluation asks every rotation 0..n-1: each option then stands once
    behind every letter, so a model that favours a letter cannot pass by position.
    """
    n = len(options)
    if not 0 <= shift < n:
        raise ValueError(f"rotation {shift} outside 0..{n - 1}")
    rotated = list(options[shift:]) + list(options[:shift])
    return rotated, (answer_index - shift) % n
