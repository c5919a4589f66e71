"""The metrics of medift.metrics on small hand-made predictions, every expected value counted
by hand; and that evaluation, the tables and the base-model report give those same values."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medift import metrics


def _predictions(patterns: list[str]) -> pd.DataFrame:
    """One question per pattern, one letter per rotation: c right, w wrong letter, f unparseable."""
    rows = [
        {
            "question_id": f"q{i}",
            "rotation": rotation,
            "correct": int(letter == "c"),
            "parse_failed": int(letter == "f"),
        }
        for i, pattern in enumerate(patterns)
        for rotation, letter in enumerate(pattern)
    ]
    return pd.DataFrame(rows)


# Four 4-option questions, each asked in its 4 rotations (rotation 0: as written):
#   q0 cccc  right as written, right in every rotation
#   q1 cwcf  right as written; wrong in rotation 1, unparseable in rotation 3 (not counted)
#   q2 wccc  wrong letter as written
#   q3 fccc  unparseable as written
# accuracy 2/4 (q0, q1); circular 1/4 (q0); parse failures as written 1 (q3): retention 3/4.
SEED_1 = ["cccc", "cwcf", "wccc", "fccc"]
# A second seed: right as written q0, q1, q2; in every rotation q1, q2; no parse failure.
SEED_2 = ["cccw", "cccc", "cccc", "wwww"]


def test_one_seed_by_hand():
    frame = _predictions(SEED_1)
    assert metrics.accuracy(frame) == 0.5
    assert metrics.circular_accuracy(frame) == 0.25
    assert metrics.parse_failures(frame) == 1
    assert metrics.answers(frame) == 4
    assert metrics.format_retention(frame) == 0.75
    assert metrics.question_scores(frame).to_dict() == {"q0": 1.0, "q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert metrics.question_scores(frame, circular=True).to_dict() == {"q0": 1.0, "q1": 0.0, "q2": 0.0, "q3": 0.0}


def test_two_seeds_by_hand():
    seeds = [_predictions(SEED_1), _predictions(SEED_2)]
    # As written, per question: q0 2/2, q1 2/2, q2 1/2, q3 0/2 -> 2.5 / 4 (= the seeds' 0.5 and 0.75 averaged).
    assert metrics.accuracy(seeds) == 0.625
    # Every rotation, per question: q0 1/2 (seed 1), q1 1/2, q2 1/2 (seed 2), q3 0 -> 1.5 / 4.
    assert metrics.circular_accuracy(seeds) == 0.375
    # One unparseable answer among 4 questions x 2 seeds.
    assert (metrics.parse_failures(seeds), metrics.answers(seeds), metrics.format_retention(seeds)) == (1, 8, 0.875)


def test_questions_asked_once_have_no_circular_accuracy():
    frame = _predictions(["c", "w", "f"])
    assert not metrics.is_circular(frame) and metrics.circular_accuracy(frame) is None
    assert (metrics.accuracy(frame), metrics.format_retention(frame)) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    answers = metrics.plain_answers([True, False, False], [False, False, True])
    assert (metrics.accuracy(answers), metrics.parse_failures(answers)) == (pytest.approx(1 / 3), 1)
    # The order of the rows does not matter.
    assert metrics.accuracy(_predictions(SEED_1).sample(frac=1, random_state=3)) == 0.5


def _descriptions(found: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": [f"img{i}" for i in range(len(found))], "generated": "", "found": [json.dumps(f) for f in found]}
    )


def test_description_accuracy_by_hand():
    # Per image: 1 of 2 phrases said, 1 of 1, no phrases (not counted) -> (0.5 + 1) / 2, not 2/3.
    one = _descriptions([{"x": 1, "y": 0}, {"x": 1}, {}])
    assert metrics.description_accuracy(one) == 0.75
    # A second seed: 2 of 2, 0 of 1. Each image over the seeds: 0.75, 0.5 -> 0.625.
    two = _descriptions([{"x": 1, "y": 1}, {"x": 0}, {}])
    assert metrics.description_accuracy([one, two]) == 0.625
    assert metrics.description_accuracy(_descriptions([{}, {}])) is None


def test_percent_only_for_display():
    assert metrics.percent(2 / 3) == 66.67 and metrics.summary_percent(2 / 3) == 66.67
    assert metrics.percent(0.125) == metrics.summary_percent(0.125) == 12.5
    # An exact tie of the scaled value: the tables round the float correctly, metrics.json as
    # numpy does (kept so existing files stay the same; see medift.metrics).
    assert (metrics.percent(19981 / 20000), metrics.summary_percent(19981 / 20000)) == (99.91, 99.9)


def test_evaluation_and_tables_report_the_same_hand_counted_metrics(tmp_path):
    from medift.evaluate import summarize
    from medift.tables import long_table, read_predictions
    from tests.fixtures.predictions import _write_predictions

    files = {
        ("d", "m", seed): _write_predictions(tmp_path / f"d/m/seed-{seed}/predictions.csv", patterns, n_options=4)
        for seed, patterns in ((1, SEED_1), (2, SEED_2))
    }
    summary = summarize(read_predictions(files["d", "m", 1]))
    assert summary == {
        "n": 4,
        "accuracy": 50.0,
        "parse_failures": 1,
        "format_retention": 75.0,
        "prompts_asked": 16,
        "circular_accuracy": 25.0,
    }
    row = long_table({("d", "m", 1): files["d", "m", 1]}, ["m"], ["d"], n_boot=200).iloc[0]
    assert (row["accuracy"], row["circular_accuracy"], row["parse_failures"], row["format_retention"]) == (
        50.0,
        25.0,
        1,
        75.0,
    )
    both = long_table(files, ["m"], ["d"], n_boot=200).iloc[0]
    assert (both["accuracy"], both["circular_accuracy"], both["parse_failures"], both["format_retention"]) == (
        62.5,
        37.5,
        1,
        87.5,
    )
    assert both["seed_std"] == 17.68  # sample std of 50 and 75: 25 / sqrt(2)


def test_base_model_report_by_hand(tmp_path, monkeypatch):
    import medift.embedded.__main__ as base_model
    import medift.embedded.pretrain as pretrain

    # Five held-out questions, all answered A: parsed A, none, B, A, none; the first two in
    # the fixed option order.
    items = [(f"question {i}", None, 4, 0, fixed) for i, fixed in enumerate([True, True, False, False, False])]
    parsed = ["A", None, "B", "A", None]
    monkeypatch.setattr(
        pretrain,
        "answer_held_out",
        lambda model, processor, items, max_new_tokens=50: (parsed, [p == "A" for p in parsed]),
    )
    monkeypatch.setattr(base_model, "load_base_model", lambda path: (None, None))
    monkeypatch.setattr(base_model, "held_out_questions", lambda n, seed, image_size: items)
    out = tmp_path / "base_model.json"
    base_model.evaluate_base(base_model.BaseEvalConfig(model="m", out=str(out)))
    # Fractions, 4 decimals: right 2 of 5; fixed order 1 of 2, shuffled 1 of 3; 2 unparseable.
    assert json.loads(out.read_text()) == {
        "general_mcq_accuracy": 0.4,
        "n": 5,
        "parse_failures": 2,
        "by_option_format": {"fixed_order": {"n": 2, "accuracy": 0.5}, "shuffled": {"n": 3, "accuracy": 0.3333}},
        "format_retention": 0.6,
        "model": "m",
    }
