"""Judges that grade answers about an image: one interface, an offline and a hosted implementation.

The baselines medift compares with use a strong model as a judge: BioMed-VITAL rates each
candidate question/answer from 0 to 10, STLLaVA-Med scores two answers to one question
and keeps the better as "chosen", the other as "rejected". `Judge` is that interface:

- `rate(item) -> Rating`: one answer, a score in [0, 10] (None when the judgement could
  not be parsed; callers count those);
- `compare(item, answer_a, answer_b) -> Verdict`: two answers to the item's question
  (the item's own `answer` is ignored), winner "a", "b", "tie" or None (unparsable);
- `calls`: hosted requests made so far (0 offline), `describe()`: settings for manifests.

`OfflineJudge` (the default: no hosted model is reachable from the cluster) is
deterministic and grades an answer against the image's structured attributes.
`HostedJudge` asks an OpenAI-compatible chat endpoint, caching every request on disk so
that a rerun makes no call, with a call budget and retries. `make_judge` builds either
from a settings dict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from medift.mcq import LETTERS, option_letters, parse_answer_letter

log = logging.getLogger(__name__)

# Attribute values that say "not applicable" (WBCAtt's "nil" granules, MIMIC-CXR's
# unmentioned findings ""): an answer is not expected to mention them.
NOT_APPLICABLE = frozenset({"", "nil", "none", "na", "n/a", "not applicable"})


@dataclass(frozen=True)
class JudgeItem:
    """One answer to grade: the image's attributes (the judge cannot see the image) and the Q/A.

    `options` are given for a multiple-choice question: a letter answer ("The correct
    answer is B.") then stands for its option's text. `attribute` is the key the question
    asks about, when known.
    """

    attributes: dict[str, str]
    question: str
    answer: str
    options: tuple[str, ...] = ()
    attribute: str | None = None


@dataclass(frozen=True)
class Rating:
    score: float | None  # 0-10; None = the judgement could not be parsed
    reason: str


@dataclass(frozen=True)
class Verdict:
    winner: str | None  # "a", "b", "tie", or None when a judgement could not be parsed
    scores: tuple[float | None, float | None]
    reason: str


@runtime_checkable
class Judge(Protocol):
    calls: int  # hosted requests made (0 for an offline judge)

    def rate(self, item: JudgeItem) -> Rating: ...

    def compare(self, item: JudgeItem, answer_a: str, answer_b: str) -> Verdict: ...

    def describe(self) -> dict: ...


class JudgeError(RuntimeError):
    """A hosted judge could not give a judgement (HTTP failure, bad response, missing key)."""


class JudgeBudgetExceeded(JudgeError):
    """A hosted judge would make more calls than its `max_calls` budget allows."""


def _winner(score_a: float | None, score_b: float | None) -> str | None:
    if score_a is None or score_b is None:
        return None
    if score_a > score_b:
        return "a"
    if score_b > score_a:
        return "b"
    return "tie"


def _spoken_key(key: str) -> str:
    return key.replace("_", " ")


# --- offline judge -----------------------------------------------------------------------

_SEPARATORS = re.compile(r"[\s_-]+")
_COMPOUND_SPLIT = re.compile(r"\s*,\s*|-")
_BARE_LETTER = re.compile(r"^\W*([A-Za-z])\W*$")


def _canonical(phrase: str) -> str:
    """Lowercase, with runs of spaces, `_` and `-` as one space: the form phrases are compared in."""
    return " ".join(word for word in _SEPARATORS.split(phrase.strip().lower()) if word)


def _phrase_pattern(canonical: str) -> str:
    """A whole-phrase pattern: words joined by any run of spaces/`_`/`-`, not inside a longer word.

    `-` counts as part of a word at the edges, so `segmented` is not found inside
    `segmented-bilobed`, and `blue` is found in `light blue` only if `light blue` is not
    a phrase the scan prefers (the scan tries the longest phrases first).
    """
    body = r"[\s_-]+".join(re.escape(word) for word in canonical.split(" "))
    return rf"(?<![\w-]){body}(?![\w-])"


def _mentions(text: str, phrases: set[str]) -> set[str]:
    """The canonical phrases named in `text`: one left-to-right scan, longest phrase first at each place."""
    ordered = sorted((p for p in phrases if p), key=lambda p: (-len(p), p))
    if not ordered or not text:
        return set()
    pattern = re.compile("|".join(f"(?:{_phrase_pattern(p)})" for p in ordered), re.IGNORECASE)
    found = set()
    for match in pattern.finditer(text):
        found.add(_canonical(match.group(0)))
    return found


def _applicable(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in NOT_APPLICABLE


_YES_NO = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)


class OfflineJudge:
    """Deterministic judge: grades an answer against the image's structured attributes.

    Relevant attributes R: `[item.attribute]` when given; else the vocabulary keys whose
    spoken name (`cell_size` -> "cell size") or question text (`question_text[key]`, without
    its "?") appears in the question as a whole phrase; else every attribute of the image
    that the vocabulary knows. Expected E: the keys of R whose true value is applicable
    (not "nil", "", ... see `NOT_APPLICABLE`).

    The answer is scanned once, case-insensitively, for whole phrases: every vocabulary
    value and the true values of R, the longest first at each place (so "light blue" is
    not also "blue", "segmented-bilobed" not also "segmented"); spaces, `_` and `-` between
    words are interchangeable. A true value that is not in its key's vocabulary but is a
    compound of vocabulary terms (CBIS-DDSM's "irregular-architectural distortion",
    SKINCON's "papule, plaque") also counts when all its terms are named.

    - correct = keys of E whose true value is named;
    - wrong = distinct named values in the vocabulary of some key of R that are the true
      value (or a compound's term) of no key of R: a value shared by several keys (WBCAtt's
      "round", "yes") is wrong only where it is wrong for the relevant keys, and values of
      other keys are ignored;
    - score = 10 * max(0, correct - 0.5 * wrong) / len(E), rounded to one decimal; with E
      empty, 10 when nothing wrong is named, else 0.

    For a multiple-choice item a letter answer ("The correct answer is B.", or a bare "B")
    is replaced by its option's text; an answer with no valid letter is graded as free
    text, and scores 0 when it names no value of R either. A yes/no answer to a question that
    names values of R ("Is the cell size big?") scores 10 when it is right about them all,
    else 0. Negation is not understood otherwise: "not big" names "big". The reason gives
    counts and keys, never the answer's text.
    """

    kind = "offline"

    def __init__(self, vocabulary: Mapping[str, tuple[str, ...]], question_text: Mapping[str, str] | None = None):
        self.vocabulary = {key: tuple(values) for key, values in vocabulary.items()}
        self.question_text = dict(question_text or {})
        self.calls = 0
        self._canonical_vocabulary = {
            key: {_canonical(value) for value in values if value.strip()} for key, values in self.vocabulary.items()
        }
        self._all_values = set().union(*self._canonical_vocabulary.values()) if self.vocabulary else set()
        self._key_patterns = {}
        for key in self.vocabulary:
            names = [_canonical(_spoken_key(key))]
            text = self.question_text.get(key, "").strip().rstrip("?").strip()
            if text:
                names.append(_canonical(text))
            pattern = "|".join(f"(?:{_phrase_pattern(name)})" for name in names if name)
            self._key_patterns[key] = re.compile(pattern, re.IGNORECASE)

    def describe(self) -> dict:
        return {"kind": self.kind}

    def relevant_keys(self, item: JudgeItem) -> list[str]:
        if item.attribute is not None:
            return [item.attribute]
        asked = [key for key, pattern in self._key_patterns.items() if pattern.search(item.question)]
        if asked:
            return asked
        return [key for key in item.attributes if key in self.vocabulary]

    def _compound_terms(self, key: str, value: str) -> set[str]:
        """The vocabulary terms a compound true value is made of; empty when it is not one."""
        known = self._canonical_vocabulary.get(key, set())
        if _canonical(value) in known:
            return set()
        terms = {_canonical(term) for term in _COMPOUND_SPLIT.split(value) if term.strip()}
        return terms if len(terms) > 1 and terms <= known else set()

    def _choose_text(self, item: JudgeItem) -> tuple[str, str | None]:
        """(text to grade, option letter used or None)."""
        if not item.options:
            return item.answer, None
        n_options = min(len(item.options), len(LETTERS))
        letter = parse_answer_letter(item.answer, n_options)
        if letter is None:
            bare = _BARE_LETTER.match(item.answer)
            if bare and bare.group(1).upper() in option_letters(n_options):
                letter = bare.group(1).upper()
        if letter is None:
            return item.answer, None
        return item.options[LETTERS.index(letter)], letter

    def rate(self, item: JudgeItem) -> Rating:
        keys = self.relevant_keys(item)
        text, letter = self._choose_text(item)
        truths: dict[str, str] = {}  # key -> canonical true value, for keys of R with a value
        terms: dict[str, set[str]] = {}
        for key in keys:
            value = item.attributes.get(key)
            if value is None:
                continue
            truths[key] = _canonical(value)
            terms[key] = self._compound_terms(key, value) if _applicable(value) else set()
        expected = [key for key in keys if _applicable(item.attributes.get(key))]
        relevant_values = set().union(*(self._canonical_vocabulary.get(key, set()) for key in keys))
        true_values = set(truths.values()).union(*terms.values())
        verdict = self._yes_no(item, text, relevant_values, true_values)
        if verdict is not None:
            return verdict
        named = _mentions(text, self._all_values | true_values)

        correct = sum(1 for key in expected if truths[key] in named or (terms[key] and terms[key] <= named))
        wrong = len({value for value in named if value in relevant_values and value not in true_values})
        prefix = f"option {letter}; " if letter else ""
        counts = (
            f"{len(keys)} relevant ({', '.join(keys) or 'none'}), {len(expected)} expected, "
            f"{correct} correct, {wrong} wrong"
        )
        if item.options and letter is None and not named & (relevant_values | true_values):
            return Rating(0.0, f"no valid option letter and no value of the relevant attributes; {counts}")
        if expected:
            score = 10 * max(0.0, correct - 0.5 * wrong) / len(expected)
        else:
            score = 10.0 if wrong == 0 else 0.0
        return Rating(round(min(10.0, max(0.0, score)), 1), prefix + counts)

    def _yes_no(self, item: JudgeItem, text: str, relevant_values: set, true_values: set) -> Rating | None:
        """A yes/no answer to a question that names values ("Is the cell size big?"): 10 when the
        answer is right about every named value of the relevant attributes, else 0. None when the
        rule does not apply (no yes/no answer, no value named, or yes/no attributes)."""
        answer = _YES_NO.match(text)
        if answer is None or not item.question.rstrip().endswith("?") or {"yes", "no"} & relevant_values:
            return None
        claimed = _mentions(item.question, relevant_values | true_values)
        if not claimed:
            return None
        holds = claimed <= true_values
        right = (answer.group(1).lower() == "yes") == holds
        return Rating(
            10.0 if right else 0.0, f"yes/no on {len(claimed)} named value(s): {'right' if right else 'wrong'}"
        )

    def compare(self, item: JudgeItem, answer_a: str, answer_b: str) -> Verdict:
        rating_a = self.rate(dataclasses.replace(item, answer=answer_a))
        rating_b = self.rate(dataclasses.replace(item, answer=answer_b))
        winner = _winner(rating_a.score, rating_b.score)
        return Verdict(winner, (rating_a.score, rating_b.score), f"a: {rating_a.reason} | b: {rating_b.reason}")


# --- hosted judge ------------------------------------------------------------------------

RATE_SYSTEM = (
    "You are a medical expert. You grade an answer to a question about a medical image. "
    "You cannot see the image: its findings, given below, are the ground truth."
)
COMPARE_SYSTEM = (
    "You are a medical expert. You compare two answers to a question about a medical image. "
    "You cannot see the image: its findings, given below, are the ground truth."
)
RATE_INSTRUCTION = (
    "Rate how correct and helpful the answer is, given the findings, on a scale of 0 to 10. "
    'Reply with "Score: N", where N is an integer from 0 to 10, followed by one sentence '
    "giving the reason."
)
COMPARE_INSTRUCTION = (
    "Rate how correct and helpful each answer is, given the findings, on a scale of 0 to 10. "
    'Reply with "Score 1: N, Score 2: M", where N and M are integers from 0 to 10, followed '
    "by one sentence giving the reason."
)

_NUMBER = r"(\d+(?:\.\d+)?)"
_RATE_REPLY = re.compile(r"\bscore[*\s]*[:=][*\s]*" + _NUMBER, re.IGNORECASE)
_COMPARE_REPLY = re.compile(
    r"\bscore[*\s]*1[*\s]*[:=][*\s]*" + _NUMBER + r".*?\bscore[*\s]*2[*\s]*[:=][*\s]*" + _NUMBER,
    re.IGNORECASE | re.DOTALL,
)
_RETRY_STATUS = (429,)
_MAX_REASON = 500


def _findings(attributes: Mapping[str, str]) -> str:
    lines = [f"{_spoken_key(key)}: {value}" for key, value in attributes.items() if str(value).strip()]
    return "\n".join(lines) if lines else "(none recorded)"


def _question_block(item: JudgeItem) -> str:
    lines = [f"Question: {item.question}"]
    if item.options:
        lines.append("Options:")
        lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, item.options)]
    return "\n".join(lines)


def rating_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The chat messages that ask for one answer's score."""
    user = (
        f"Findings of the image:\n{_findings(item.attributes)}\n\n"
        f"{_question_block(item)}\n\nAnswer: {item.answer}\n\n{RATE_INSTRUCTION}"
    )
    return [{"role": "system", "content": RATE_SYSTEM}, {"role": "user", "content": user}]


def comparison_messages(item: JudgeItem, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The chat messages that ask for two answers' scores (the item's `answer` is not used)."""
    user = (
        f"Findings of the image:\n{_findings(item.attributes)}\n\n{_question_block(item)}\n\n"
        f"Answer 1: {answer_a}\n\nAnswer 2: {answer_b}\n\n{COMPARE_INSTRUCTION}"
    )
    return [{"role": "system", "content": COMPARE_SYSTEM}, {"role": "user", "content": user}]


def _score(text: str) -> float | None:
    value = float(text)
    return value if 0 <= value <= 10 else None


def _reason_after(reply: str, end: int) -> str:
    rest = reply[end:].lstrip(" \t\r\n.,;:-*").strip()
    return (rest.splitlines()[0].strip() if rest else "no reason given")[:_MAX_REASON]


def parse_rating(reply: str) -> Rating:
    """`Score: N` anywhere in the reply; anything else (or N outside 0-10) gives score None."""
    match = _RATE_REPLY.search(reply)
    score = _score(match.group(1)) if match else None
    if score is None:
        return Rating(None, f"unparsable judge reply ({len(reply)} characters)")
    return Rating(score, _reason_after(reply, match.end()))


def parse_comparison(reply: str) -> Verdict:
    """`Score 1: N, Score 2: M` anywhere in the reply; the higher wins, equal is a tie."""
    match = _COMPARE_REPLY.search(reply)
    scores = (_score(match.group(1)), _score(match.group(2))) if match else (None, None)
    if None in scores:
        return Verdict(None, scores, f"unparsable judge reply ({len(reply)} characters)")
    return Verdict(_winner(*scores), scores, _reason_after(reply, match.end()))


def cache_key(url: str, model: str, messages: list[dict[str, str]]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of [url, model, messages]."""
    canonical = json.dumps([url, model, messages], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class HostedJudge:
    """A judge behind an OpenAI-compatible chat endpoint (`POST {url}/chat/completions`).

    Requests are `{"model", "messages", "temperature": 0}`, with `Authorization: Bearer
    $<api_key_env>` when `api_key_env` is set (the variable is read at construction; a
    missing one is an error then). Every request is cached at
    `<cache_dir>/<key[:2]>/<key>.json` (`cache_key`; request and reply, written atomically):
    a cached request makes no call, so a rerun makes none. `calls` counts the uncached
    prompts sent (a prompt's retries do not add to it; a failed prompt still counts); a
    call that would make it exceed `max_calls` raises `JudgeBudgetExceeded` instead. URL
    errors, timeouts, HTTP 429 and 5xx are retried up to `retries` times, waiting
    `backoff_s * 2**attempt` (attempt 0, 1, ...); other HTTP errors fail at once.
    Errors name the status and the URL, never the key; logs carry counts, never text.
    """

    kind = "hosted"

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str | None,
        cache_dir: Path,
        max_calls: int,
        retries: int = 3,
        timeout_s: float = 60,
        backoff_s: float = 1.0,
    ):
        if max_calls < 0 or retries < 0:
            raise ValueError(f"max_calls ({max_calls}) and retries ({retries}) must be >= 0")
        self.url = url
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.cache_dir = Path(cache_dir)
        self.max_calls = max_calls
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.calls = 0
        self.cache_hits = 0
        self._key = None
        if api_key_env:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise JudgeError(f"hosted judge: environment variable {api_key_env} (the API key) is not set")

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "url": self.url,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "max_calls": self.max_calls,
            "retries": self.retries,
            "timeout_s": self.timeout_s,
            "backoff_s": self.backoff_s,
        }

    def rate(self, item: JudgeItem) -> Rating:
        return parse_rating(self.chat(rating_messages(item)))

    def compare(self, item: JudgeItem, answer_a: str, answer_b: str) -> Verdict:
        return parse_comparison(self.chat(comparison_messages(item, answer_a, answer_b)))

    def cache_path(self, messages: list[dict[str, str]]) -> Path:
        key = cache_key(self.endpoint, self.model, messages)
        return self.cache_dir / key[:2] / f"{key}.json"

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The reply's text: from the cache, else from one (retried) request, then cached."""
        path = self.cache_path(messages)
        cached = self._read_cache(path)
        if cached is not None:
            self.cache_hits += 1
            log.debug("hosted judge: cache hit (%d hits, %d calls)", self.cache_hits, self.calls)
            return cached
        if self.calls + 1 > self.max_calls:
            raise JudgeBudgetExceeded(
                f"hosted judge budget of max_calls={self.max_calls} calls is used up ({self.calls} made, "
                f"{self.cache_hits} answered from the cache); raise max_calls to go on"
            )
        request = {"model": self.model, "messages": messages, "temperature": 0}
        self.calls += 1
        reply = self._post(request)
        log.info("hosted judge: call %d of at most %d (%d cache hits)", self.calls, self.max_calls, self.cache_hits)
        self._write_cache(path, {"request": {"url": self.endpoint, **request}, "reply": reply})
        return reply

    def _read_cache(self, path: Path) -> str | None:
        try:
            reply = json.loads(path.read_text(encoding="utf-8"))["reply"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("hosted judge: unreadable cache file %s; asking again", path)
            return None
        return reply if isinstance(reply, str) else None

    def _write_cache(self, path: Path, record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(record, out, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _post(self, request: dict) -> str:
        data = json.dumps(request).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "hosted judge: %s from %s; retry %d of %d in %.3g s",
                    failure,
                    self.endpoint,
                    attempt,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
            http_request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as error:
                status = error.code
                error.close()
                if status in _RETRY_STATUS or 500 <= status < 600:
                    failure = f"HTTP {status}"
                    continue
                raise JudgeError(f"hosted judge: HTTP {status} from {self.endpoint} (not retried)") from None
            except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, dropped connections
                failure = type(error).__name__
                continue
            return self._content(body)
        raise JudgeError(f"hosted judge: {failure} from {self.endpoint} after {self.retries + 1} attempts")

    def _content(self, body: bytes) -> str:
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise JudgeError(f"hosted judge: {self.endpoint} answered without choices[0].message.content")
        return content


# --- construction ------------------------------------------------------------------------

_HOSTED_REQUIRED = ("url", "model", "api_key_env", "max_calls")
_HOSTED_OPTIONAL = ("retries", "timeout_s", "backoff_s")


def make_judge(
    settings: Mapping,
    vocabulary: Mapping[str, tuple[str, ...]],
    cache_dir: Path,
    question_text: Mapping[str, str] | None = None,
) -> Judge:
    """`{"kind": "offline"}` or `{"kind": "hosted", "url", "model", "api_key_env", "max_calls"}`
    (`api_key_env` may be null; optional `retries`, `timeout_s`, `backoff_s`).

    A judge's `describe()` gives settings this accepts. A missing or unknown key, or an
    unknown kind, is a ValueError naming it.
    """
    if "kind" not in settings:
        raise ValueError("judge settings: missing key 'kind' (offline or hosted)")
    kind = settings["kind"]
    if kind == "offline":
        allowed: tuple[str, ...] = ("kind",)
    elif kind == "hosted":
        allowed = ("kind", *_HOSTED_REQUIRED, *_HOSTED_OPTIONAL)
        for key in _HOSTED_REQUIRED:
            if key not in settings:
                raise ValueError(f"judge settings: missing key {key!r} for a hosted judge")
    else:
        raise ValueError(f"judge settings: unknown kind {kind!r} in key 'kind'; known: offline, hosted")
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"judge settings: unknown key {unknown[0]!r} for a {kind} judge; known: {list(allowed)}")
    if kind == "offline":
        return OfflineJudge(vocabulary, question_text)
    options = {key: settings[key] for key in _HOSTED_OPTIONAL if key in settings}
    return HostedJudge(
        url=settings["url"],
        model=settings["model"],
        api_key_env=settings["api_key_env"],
        cache_dir=Path(cache_dir),
        max_calls=int(settings["max_calls"]),
        **options,
    )
