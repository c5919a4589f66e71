"""medift.judge: the offline judge's hand-computed scores and the hosted judge against a local server."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from medift import judge as judge_module
from medift.datasets import get_dataset
from medift.judge import (
    HostedJudge,
    Judge,
    JudgeBudgetExceeded,
    JudgeError,
    JudgeItem,
    OfflineJudge,
    Rating,
    Verdict,
    make_judge,
)
from medift.mcq import format_answer
from tests.fixtures.judge_server import FakeChatServer

WBCATT = get_dataset("wbcatt")
CBIS = get_dataset("cbis_ddsm")

EOSINOPHIL = {
    "cell_size": "big",
    "cell_shape": "round",
    "nucleus_shape": "segmented-bilobed",
    "nuclear_cytoplasmic_ratio": "low",
    "chromatin_density": "densely",
    "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear",
    "cytoplasm_colour": "light blue",
    "granularity": "yes",
    "granule_type": "coarse",
    "granule_colour": "red",
    "label": "Eosinophil",
}
LYMPHOCYTE = {
    "cell_size": "small",
    "cell_shape": "round",
    "nucleus_shape": "unsegmented-round",
    "nuclear_cytoplasmic_ratio": "high",
    "chromatin_density": "densely",
    "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear",
    "cytoplasm_colour": "light blue",
    "granularity": "no",
    "granule_type": "nil",
    "granule_colour": "nil",
    "label": "Lymphocyte",
}


@pytest.fixture
def offline() -> OfflineJudge:
    return OfflineJudge(WBCATT.ATTRIBUTES, WBCATT.QUESTION_TEXT)


def score(judge, answer, attributes=EOSINOPHIL, question="Describe the cell.", **kwargs) -> float | None:
    return judge.rate(JudgeItem(attributes, question, answer, **kwargs)).score


# --- offline judge -------------------------------------------------------------------------


def test_offline_judge_is_a_judge_and_makes_no_calls(offline):
    assert isinstance(offline, Judge)
    assert offline.calls == 0
    assert offline.describe() == {"kind": "offline"}
    rating = offline.rate(JudgeItem(EOSINOPHIL, "What is the cell size?", "big"))
    assert isinstance(rating, Rating) and offline.calls == 0


def test_fully_right_half_right_and_wrong(offline):
    question = WBCATT.QUESTION_TEXT["cell_size"]
    assert score(offline, "The cell is big.", question=question) == 10.0
    assert score(offline, "The cell is small.", question=question) == 0.0
    # Both values named: 1 correct, 1 wrong -> 10 * (1 - 0.5) / 1.
    assert score(offline, "Big, or perhaps small.", question=question) == 5.0
    # Two keys asked (both spoken names in the question): 1 of 2 right -> 5; plus a wrong shape -> 2.5.
    two = "What are the cell size and cell shape?"
    assert score(offline, "A big cell.", question=two) == 5.0
    assert score(offline, "A big, irregular cell.", question=two) == 2.5
    assert score(offline, "A big round cell.", question=two) == 10.0
    assert score(offline, "A small irregular cell.", question=two) == 0.0
    # Nothing named at all.
    assert score(offline, "I cannot tell.", question=question) == 0.0


def test_attribute_given_overrides_the_question(offline):
    assert score(offline, "densely packed", question="Anything?", attribute="chromatin_density") == 10.0
    assert score(offline, "big", question="Anything?", attribute="chromatin_density") == 0.0


def test_matching_is_case_insensitive_and_whole_word(offline):
    assert score(offline, "A BIG cell", attribute="cell_size") == 10.0
    assert score(offline, "A bigger cell", attribute="cell_size") == 0.0  # "big" inside a word is no mention
    assert score(offline, "smallish", attribute="cell_size") == 0.0


def test_multiple_choice_letter_maps_to_the_option(offline):
    options = WBCATT.QUESTION_OPTIONS["cell_size"]  # ("big", "small")
    question = WBCATT.QUESTION_TEXT["cell_size"]
    assert score(offline, format_answer(0), question=question, options=options) == 10.0
    assert score(offline, format_answer(1), question=question, options=options) == 0.0
    assert score(offline, "B.", question=question, options=options) == 0.0
    assert score(offline, "A", question=question, options=options) == 10.0
    # No valid letter and no value: 0; no letter but the value named: graded as free text.
    assert score(offline, "The correct answer is C.", question=question, options=options) == 0.0
    assert score(offline, "Because it looks so.", question=question, options=options) == 0.0
    assert score(offline, "It is big.", question=question, options=options) == 10.0
    rating = offline.rate(JudgeItem(EOSINOPHIL, question, format_answer(0), options=options))
    assert rating.reason.startswith("option A")


def test_multiple_choice_with_nothing_expected_and_no_letter_scores_zero(offline):
    # granule_colour is nil: nothing is expected, but an answer with no letter and no value still gets 0.
    item = JudgeItem(LYMPHOCYTE, "What is the granule colour?", "No idea.", options=("pink", "purple", "red"))
    assert offline.rate(item).score == 0.0


def test_multi_word_values_prefer_the_longest_phrase(offline):
    question = WBCATT.QUESTION_TEXT["cytoplasm_colour"]
    assert score(offline, "light blue cytoplasm", question=question) == 10.0  # "blue" is not also named
    assert score(offline, "Light-blue cytoplasm", question=question) == 10.0
    assert score(offline, "light  blue", question=question) == 10.0
    assert score(offline, "blue cytoplasm", question=question) == 0.0
    assert score(offline, "purple blue cytoplasm", question=question) == 0.0
    # Light blue and blue: 1 correct, 1 wrong.
    assert score(offline, "light blue, or blue", question=question) == 5.0
    # A granule colour question: "purple blue" is a cytoplasm colour, so "purple" is not named.
    red = {**EOSINOPHIL, "granule_colour": "purple"}
    assert score(offline, "purple blue cytoplasm", red, WBCATT.QUESTION_TEXT["granule_colour"]) == 0.0
    assert score(offline, "purple granules", red, WBCATT.QUESTION_TEXT["granule_colour"]) == 10.0


def test_hyphenated_values(offline):
    question = WBCATT.QUESTION_TEXT["nucleus_shape"]
    assert score(offline, "a segmented-bilobed nucleus", question=question) == 10.0
    assert score(offline, "a segmented bilobed nucleus", question=question) == 10.0
    assert score(offline, "a segmented-multilobed nucleus", question=question) == 0.0
    assert score(offline, "unsegmented-round", question=question) == 0.0
    # A vocabulary where one value is the start of another: the longer one is the only mention.
    judge = OfflineJudge({"nucleus_shape": ("segmented", "segmented-bilobed")})
    assert score(judge, "segmented-bilobed", {"nucleus_shape": "segmented-bilobed"}, attribute="nucleus_shape") == 10
    assert score(judge, "segmented-bilobed", {"nucleus_shape": "segmented"}, attribute="nucleus_shape") == 0.0
    assert score(judge, "segmented", {"nucleus_shape": "segmented"}, attribute="nucleus_shape") == 10.0


def test_nil_values_are_not_expected(offline):
    question = "What are the granularity, granule type and granule colour?"
    # Three keys relevant, only granularity expected (the granule ones are nil).
    assert score(offline, "No granularity.", LYMPHOCYTE, question) == 10.0
    assert score(offline, "No granularity, but pink granules.", LYMPHOCYTE, question) == 5.0
    assert score(offline, "nil", LYMPHOCYTE, "What is the granule colour?") == 10.0  # nothing expected, nothing wrong
    assert score(offline, "pink", LYMPHOCYTE, "What is the granule colour?") == 0.0


def test_whole_description_against_every_attribute(offline):
    # No key in the question: all 12 attributes relevant, 10 expected (granule type and colour are nil).
    # The reference description leaves out the two "no" values, so 8 of 10 are named.
    description = WBCATT.describe(LYMPHOCYTE)
    assert score(offline, description, LYMPHOCYTE) == 8.0
    # "round" is a cell shape and a granule type: right for the cell shape, so not wrong here.
    assert "round cell shape" in description


def test_shared_value_is_wrong_only_for_the_relevant_key(offline):
    # Only granule_type asked: "round" is a wrong granule type (1 correct, 1 wrong).
    assert score(offline, "round cell, coarse granules", attribute="granule_type") == 5.0
    # Cell shape also asked: "round" is its true value, so it is not wrong.
    assert score(offline, "round cell, coarse granules", question="What are the cell shape and granule type?") == 10
    # A value of an unasked key is ignored.
    assert score(offline, "coarse granules in a big, irregular cell", attribute="granule_type") == 10.0


def test_reason_gives_counts_not_the_answer(offline):
    rating = offline.rate(JudgeItem(EOSINOPHIL, "What is the cell size?", "zebra-striped big cell, small"))
    assert rating.score == 5.0
    assert "zebra" not in rating.reason
    assert "1 correct" in rating.reason and "1 wrong" in rating.reason


def test_question_text_and_compound_values_of_cbis():
    judge = OfflineJudge(CBIS.ATTRIBUTES, CBIS.QUESTION_TEXT)
    mass = {"mass_shape": "irregular-architectural distortion", "mass_margins": "spiculated",
            "abnormality_type": "mass", "pathology": "malignant"}  # fmt: skip
    # "What is the mass margin?" names no key ("mass margins") but is mass_margins' question text.
    assert judge.relevant_keys(JudgeItem(mass, CBIS.QUESTION_TEXT["mass_margins"], "")) == ["mass_margins"]
    assert score(judge, "spiculated margins", mass, CBIS.QUESTION_TEXT["mass_margins"]) == 10.0
    # Without question texts, that question falls back to every attribute: 1 of 4 named.
    plain = OfflineJudge(CBIS.ATTRIBUTES)
    assert score(plain, "spiculated margins", mass, CBIS.QUESTION_TEXT["mass_margins"]) == 2.5
    # A compound true value: named whole, or by all its terms; its terms are not wrong.
    shape = CBIS.QUESTION_TEXT["mass_shape"]
    assert score(judge, "irregular-architectural distortion", mass, shape) == 10.0
    assert score(judge, "irregular, with architectural distortion", mass, shape) == 10.0
    assert score(judge, "irregular", mass, shape) == 0.0
    assert score(judge, "oval", mass, shape) == 0.0


def test_compare_winner_and_tie(offline):
    item = JudgeItem(EOSINOPHIL, "What is the cell size?", "ignored: big")
    verdict = offline.compare(item, "big", "small")
    assert isinstance(verdict, Verdict)
    assert (verdict.winner, verdict.scores) == ("a", (10.0, 0.0))
    assert offline.compare(item, "small", "a big cell").winner == "b"
    assert offline.compare(item, "small", "tiny").winner == "tie"
    assert offline.compare(item, "big", "BIG").scores == (10.0, 10.0)


# --- hosted judge: a local OpenAI-compatible server ------------------------------------------

KEY_ENV = "MEDIFT_TEST_JUDGE_KEY"
SECRET = "sk-test-not-a-real-key"


@pytest.fixture
def server():
    fake = FakeChatServer()
    yield fake
    fake.close()


def hosted(server, tmp_path, **kwargs) -> HostedJudge:
    settings = dict(url=server.url, model="judge-model", api_key_env=None, cache_dir=tmp_path / "cache", max_calls=10)
    settings.update(retries=3, timeout_s=5, backoff_s=0.001)
    settings.update(kwargs)
    return HostedJudge(**settings)


ITEM = JudgeItem(EOSINOPHIL, "What is the cell size?", format_answer(0), options=("big", "small"))


def test_hosted_request_and_reply(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = hosted(server, tmp_path, api_key_env=KEY_ENV)
    assert isinstance(judge, Judge)
    rating = judge.rate(ITEM)
    assert rating == Rating(7.0, "The answer names the right cell size.")
    assert judge.calls == 1 and len(server.requests) == 1
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    system, user = body["messages"]
    assert system["role"] == "system" and "medical expert" in system["content"]
    assert user["role"] == "user"
    for text in ("cell size: big", "nucleus shape: segmented-bilobed", "granule colour: red", "What is the cell size?"):
        assert text in user["content"]
    assert "A. big\nB. small" in user["content"]
    assert f"Answer: {format_answer(0)}" in user["content"]
    assert "Score: N" in user["content"]
    assert SECRET not in json.dumps(judge.describe())


def test_hosted_without_key_sends_no_authorization(server, tmp_path):
    judge = hosted(server, tmp_path)
    judge.rate(ITEM)
    assert "Authorization" not in server.requests[0]["headers"]


def test_missing_key_variable_fails_at_construction(server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(JudgeError, match=KEY_ENV):
        hosted(server, tmp_path, api_key_env=KEY_ENV)
    assert server.requests == []


def test_cache_makes_a_rerun_free(server, tmp_path):
    first = hosted(server, tmp_path)
    assert first.rate(ITEM).score == 7.0
    assert first.rate(ITEM).score == 7.0  # same request: cached already
    assert first.calls == 1 and len(server.requests) == 1
    # A new judge over the same cache (a rerun), even with no budget, makes no request.
    server.default = (200, "Score: 2. Different.")
    second = hosted(server, tmp_path, max_calls=0)
    assert second.rate(ITEM).score == 7.0
    assert second.calls == 0 and len(server.requests) == 1
    # The cache file: <cache_dir>/<key[:2]>/<key>.json with request and reply, no temporary left over.
    files = sorted((tmp_path / "cache").rglob("*"))
    json_files = [path for path in files if path.is_file()]
    assert len(json_files) == 1
    path = json_files[0]
    assert path.parent.name == path.stem[:2] and len(path.stem) == 64
    stored = json.loads(path.read_text())
    assert stored["reply"].startswith("Score: 7")
    assert stored["request"]["model"] == "judge-model"
    assert stored["request"]["messages"] == server.requests[0]["body"]["messages"]
    # Another model is another request.
    assert hosted(server, tmp_path, model="other").rate(ITEM).score == 2.0
    assert len(server.requests) == 2


def test_compare_prompt_and_parse(server, tmp_path):
    server.replies = [(200, "Score 1: 8, Score 2: 3\nAnswer 1 names the size."), (200, "Score 1: 5, Score 2: 5.")]
    judge = hosted(server, tmp_path)
    verdict = judge.compare(ITEM, "big", "small")
    assert verdict == Verdict("a", (8.0, 3.0), "Answer 1 names the size.")
    user = server.requests[0]["body"]["messages"][1]["content"]
    assert "Answer 1: big" in user and "Answer 2: small" in user and "Score 1: N, Score 2: M" in user
    assert format_answer(0) not in user  # the item's own answer is ignored
    assert judge.compare(ITEM, "big", "large").winner == "tie"


def test_unparsable_replies_give_none(server, tmp_path):
    server.replies = [(200, "I would rather not say."), (200, "Score: 12"), (200, "Score 1: 4 and that is all")]
    judge = hosted(server, tmp_path)
    assert judge.rate(ITEM).score is None
    assert judge.rate(JudgeItem(EOSINOPHIL, "What is the cell size?", "small")).score is None  # outside 0-10
    verdict = judge.compare(ITEM, "big", "small")
    assert verdict.winner is None and verdict.scores == (None, None)
    assert judge.calls == 3


def test_server_error_is_retried(server, tmp_path):
    server.replies = [(500, "overloaded"), (200, "Score: 9. Right.")]
    judge = hosted(server, tmp_path)
    assert judge.rate(ITEM).score == 9.0
    assert len(server.requests) == 2 and judge.calls == 1


def test_rate_limit_is_retried_until_the_retries_run_out(server, tmp_path):
    server.replies = [(429, "slow down")] * 3
    judge = hosted(server, tmp_path, retries=2)
    with pytest.raises(JudgeError, match="HTTP 429") as error:
        judge.rate(ITEM)
    assert server.url.rstrip("/") in str(error.value)
    assert len(server.requests) == 3  # the first try and 2 retries
    assert not list((tmp_path / "cache").rglob("*.json"))  # a failure is not cached


def test_client_error_fails_at_once(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.replies = [(400, "bad request")]
    judge = hosted(server, tmp_path, api_key_env=KEY_ENV)
    with pytest.raises(JudgeError, match="HTTP 400") as error:
        judge.rate(ITEM)
    assert server.url.rstrip("/") + "/chat/completions" in str(error.value)
    assert SECRET not in str(error.value)
    assert len(server.requests) == 1


def test_timeout_is_retried(server, tmp_path, monkeypatch):
    real_urlopen = urllib.request.urlopen
    attempts = []

    def flaky_urlopen(request, timeout):
        attempts.append(timeout)
        if len(attempts) == 1:
            raise TimeoutError("timed out")
        return real_urlopen(request, timeout=timeout)

    monkeypatch.setattr(judge_module.urllib.request, "urlopen", flaky_urlopen)
    judge = hosted(server, tmp_path, timeout_s=2.5)
    assert judge.rate(ITEM).score == 7.0
    assert attempts == [2.5, 2.5] and len(server.requests) == 1


def test_unreachable_server_fails_after_the_retries(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = HostedJudge(f"http://127.0.0.1:{port}", "m", None, tmp_path, max_calls=5, retries=1, backoff_s=0.001)
    with pytest.raises(JudgeError, match="after 2 attempts"):
        judge.rate(ITEM)


def test_budget(server, tmp_path):
    judge = hosted(server, tmp_path, max_calls=1)
    judge.rate(ITEM)
    other = JudgeItem(EOSINOPHIL, "What is the cell size?", "small")
    with pytest.raises(JudgeBudgetExceeded, match="max_calls=1"):
        judge.rate(other)
    assert len(server.requests) == 1 and judge.calls == 1
    assert judge.rate(ITEM).score == 7.0  # a cached reply does not count


# --- make_judge -----------------------------------------------------------------------------


def test_make_judge(tmp_path, server):
    offline = make_judge({"kind": "offline"}, WBCATT.ATTRIBUTES, tmp_path, WBCATT.QUESTION_TEXT)
    assert isinstance(offline, OfflineJudge)
    assert make_judge(offline.describe(), WBCATT.ATTRIBUTES, tmp_path).describe() == {"kind": "offline"}
    settings = {"kind": "hosted", "url": server.url, "model": "m", "api_key_env": None, "max_calls": 3, "retries": 1}
    judge = make_judge(settings, WBCATT.ATTRIBUTES, tmp_path)
    assert isinstance(judge, HostedJudge)
    assert (judge.max_calls, judge.retries, judge.cache_dir) == (3, 1, tmp_path)
    assert isinstance(make_judge(judge.describe(), {}, tmp_path), HostedJudge)  # describe() round-trips


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({}, "'kind'"),
        ({"kind": "oracle"}, "'oracle'"),
        ({"kind": "hosted", "model": "m", "api_key_env": None, "max_calls": 1}, "'url'"),
        ({"kind": "hosted", "url": "http://x", "model": "m", "api_key_env": None}, "'max_calls'"),
        ({"kind": "hosted", "url": "http://x", "model": "m", "max_calls": 1}, "'api_key_env'"),
        ({"kind": "offline", "model": "m"}, "'model'"),
    ],
)
def test_make_judge_rejects_bad_settings(tmp_path, settings, named):
    with pytest.raises(ValueError, match=named):
        make_judge(settings, WBCATT.ATTRIBUTES, tmp_path)


def test_yes_no_answers_to_a_question_that_names_a_value():
    judge = OfflineJudge(WBCATT.ATTRIBUTES, WBCATT.QUESTION_TEXT)
    attributes = {"cell_size": "big", "cell_shape": "round"}

    def score(question, answer):
        return judge.rate(JudgeItem(attributes, question, answer, (), "cell_size")).score

    # The generated "verify" questions (medift.instructions): right about the named value, or not.
    assert score("Is the cell size big?", "Yes.") == 10.0
    assert score("Is the cell size big?", "No.") == 0.0
    assert score("Is the cell size small?", "No.") == 10.0
    assert score("Is the cell size small?", "Yes, it is.") == 0.0
