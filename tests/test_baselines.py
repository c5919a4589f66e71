"""The baselines' data and training paths (docs/baselines.md): generated instructions, vital_select's
corruptions, st_dpo's question prompts and preference batches, the method checks, the data table;
training on conversations and on preference pairs through medift.train on a tiny Mllama and a
tiny LLaVA checkpoint (slow)."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from medift import mcq, settings
from medift.chat import IGNORE_INDEX, encode_conversation, render, user_message
from medift.datasets import DATASETS, get_dataset
from medift.instructions import InstructionConfig, image_turns, make_instructions, require_attributes
from medift.judge import JudgeItem, OfflineJudge
from medift.model.loading import load_base_model
from medift.self_training import clean_question, next_question_prompt
from medift.shards import CONVERSATIONS, DESCRIPTIONS, PREFERENCES, ShardRows, write_generated_shards
from medift.tables import data_table, seed_costs
from medift.testing.tiny_checkpoints import build_tiny_checkpoint
from medift.train import ConversationSamples, PreferenceSamples, TrainConfig, dpo_objective, train
from medift.vital import corrupted_answer

WBCATT = get_dataset("wbcatt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline-checkpoints")
    return {family: build_tiny_checkpoint(family, root / family, seed=0) for family in ("mllama", "llava")}


@pytest.fixture(scope="module")
def instructions(tiny_wbcatt_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("instructions")
    manifest = make_instructions(InstructionConfig(shards=str(tiny_wbcatt_shards), out_dir=str(out), seed=5))
    return out, manifest


# --------------------------------------------------------------------------- generated instructions


def test_instructions_ask_every_askable_attribute_and_answer_from_the_truth(tiny_wbcatt_shards, instructions):
    out, manifest = instructions
    images = ShardRows(tiny_wbcatt_shards, DESCRIPTIONS, "train", ("image_id", "attributes")).frame()
    truth = {row.image_id: json.loads(row.attributes) for row in images.itertuples()}
    rows = ShardRows(out, CONVERSATIONS, "train", ("image_id", "turns")).frame()
    turns_of: dict[str, list] = {}
    for row in rows.itertuples():
        turns = json.loads(row.turns)
        assert 1 <= len(turns) <= 4
        turns_of.setdefault(row.image_id, []).extend(turns)
    assert set(turns_of) == set(truth)
    forms = set()
    for image_id, turns in turns_of.items():
        attributes = truth[image_id]
        askable = {k for k, options in WBCATT.QUESTION_OPTIONS.items() if attributes.get(k) in options}
        asked = set()
        for question, answer in turns:
            if "\nA. " in question:  # multiple choice: the answered letter's option is the true value
                forms.add("mcq")
                stem, *lines = question.split("\n")
                options = [line[3:] for line in lines[:-1]]
                key = next(k for k, text in WBCATT.QUESTION_TEXT.items() if text == stem)
                letter = mcq.parse_answer_letter(answer, len(options))
                assert options[mcq.LETTERS.index(letter)] == attributes[key]
            elif question.startswith("Is the "):  # verify: "Yes." exactly when the named value is true
                forms.add("verify")
                key = next(k for k in askable if question.startswith(f"Is the {k.replace('_', ' ')} "))
                shown = question[len(f"Is the {key.replace('_', ' ')} ") : -1]
                assert shown in WBCATT.QUESTION_OPTIONS[key]
                assert answer == ("Yes." if shown == attributes[key] else "No.")
            else:  # open: the question text, answered with the value
                forms.add("open")
                key = next(k for k, text in WBCATT.QUESTION_TEXT.items() if text == question)
                assert answer == f"{attributes[key]}."
            assert key not in asked  # one question per attribute and round
            asked.add(key)
        assert asked == askable
    assert forms == {"mcq", "open", "verify"}
    summary = manifest["summary"]
    assert summary["images"] == len(truth) and summary["generated_rows"] == len(rows) == summary["kept_rows"]
    assert sum(summary["turns"].values()) == sum(len(t) for t in turns_of.values())


def test_instructions_are_the_same_for_the_same_seed_and_differ_for_another(tiny_wbcatt_shards, tmp_path, instructions):
    _, manifest = instructions
    again = make_instructions(InstructionConfig(shards=str(tiny_wbcatt_shards), out_dir=str(tmp_path / "a"), seed=5))
    other = make_instructions(InstructionConfig(shards=str(tiny_wbcatt_shards), out_dir=str(tmp_path / "b"), seed=6))
    assert [f["sha256"] for f in again["files"]] == [f["sha256"] for f in manifest["files"]]
    assert [f["sha256"] for f in other["files"]] != [f["sha256"] for f in manifest["files"]]


def test_a_dataset_without_structured_attributes_cannot_make_instructions():
    reports = SimpleNamespace(NAME="reports", ATTRIBUTES={}, QUESTION_OPTIONS={})
    with pytest.raises(ValueError, match="'reports' has no structured attributes"):
        require_attributes(reports, "generated instructions")
    with pytest.raises(ValueError, match="dataset\\(s\\) reports do not have"):
        settings.check_method("inst_ft", {"proxy": False, "data": "instructions"}, {}, ["reports"])
    # The workflow's list is the package's: the adapters with attributes to ask about.
    assert set(settings.ADAPTERS_WITH_ATTRIBUTES) == {n for n, m in DATASETS.items() if m.ATTRIBUTES}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"proxy": True, "data": "instructions"}, "without a proxy"),
        ({"proxy": False, "data": "preferences"}, "needs start_from"),
        ({"proxy": False, "data": "instructions", "keep_fraction": 0.4}, "keep_fraction is vital_select's"),
        ({"proxy": False, "data": "preferences", "start_from": "zero_shot"}, "not a trained method"),
        ({"proxy": False, "data": "preferences", "start_from": "b"}, "cycle"),
    ],
)
def test_method_entries_are_checked_before_any_job(entry, message):
    methods = {"zero_shot": {"train": False}, "b": {"proxy": False, "data": "instructions", "start_from": "a"}}
    methods["a"] = entry
    with pytest.raises(ValueError, match=message):
        settings.check_method("a", entry, methods, [])


# --------------------------------------------------------------------------- vital_select and st_dpo pieces


def test_corrupted_answers_are_wrong_and_the_offline_judge_ranks_them_below_the_truth():
    judge = OfflineJudge(WBCATT.ATTRIBUTES, WBCATT.QUESTION_TEXT)
    attributes = {"cell_size": "big", "cell_shape": "round", "label": "Eosinophil"}
    config = SimpleNamespace(seed=1, forms="mcq,open,verify", rounds=3, max_options=4)
    options = {k: v for k, v in WBCATT.QUESTION_OPTIONS.items()}
    turns = image_turns(WBCATT, options, "img-1", attributes, config)
    assert {t.form for t in turns} == {"mcq", "open", "verify"}
    rng = random.Random(0)
    for turn in turns:
        candidate = {"form": turn.form, "answer": turn.answer, "options": turn.options, "attribute": turn.attribute}
        wrong = corrupted_answer(candidate, rng, options)
        assert wrong is not None and wrong != turn.answer
        if turn.form == "mcq":
            letters = mcq.option_letters(len(turn.options))
            assert mcq.parse_answer_letter(wrong, len(letters)) != mcq.parse_answer_letter(turn.answer, len(letters))
        truth = judge.rate(JudgeItem(attributes, turn.question, turn.answer, turn.options, turn.attribute)).score
        corrupted = judge.rate(JudgeItem(attributes, turn.question, wrong, turn.options, turn.attribute)).score
        assert truth == 10.0 and corrupted == 0.0, (turn, wrong)


@pytest.mark.parametrize("family", ["mllama", "llava"])
def test_the_next_question_prompt_ends_where_the_users_text_begins(family, checkpoints):
    _, processor = load_base_model(str(checkpoints[family]))
    prompt = next_question_prompt(processor, "big cell size, round cell shape")
    question = "What is the cell size?"
    full = render(
        processor,
        [
            user_message("Describe this medical scan.", True),
            {"role": "assistant", "content": [{"type": "text", "text": "big cell size, round cell shape"}]},
            user_message(question, False),
        ],
        False,
    )
    assert full.startswith(prompt.text) and full[len(prompt.text) :].startswith(question)
    assert prompt.has_image and all(label == IGNORE_INDEX for label in prompt.labels)
    assert clean_question("  What is the cell size? big. ASSISTANT: no") == "What is the cell size?"
    assert clean_question("describe the cell\nmore") == "describe the cell"
    assert clean_question("   ") == ""


def _image_bytes():
    from PIL import Image

    from medift.images import encode_image

    return encode_image(Image.new("RGB", (64, 64), (120, 30, 60)))


def test_conversation_samples_label_answers_and_with_question_loss_the_later_questions(checkpoints, tmp_path):
    _, processor = load_base_model(str(checkpoints["llava"]))
    turns = [
        ["What is the cell size?", "big."],
        ["Is the cell shape round?", "Yes."],
        ["What is the label?", "Basophil."],
    ]
    row = {"image_id": "a", "split": "train", "image": _image_bytes(), "turns": json.dumps(turns), "origin": "t"}
    write_generated_shards(tmp_path, CONVERSATIONS, [row], lambda: {})
    plain = ConversationSamples(str(tmp_path), processor, 0.0, seed=1, window=2)[0, 1][0]
    assert (
        plain.input_ids == encode_conversation(processor, [q for q, _ in turns], [a for _, a in turns], True).input_ids
    )
    labelled = processor.tokenizer.decode([t for t in plain.labels if t != IGNORE_INDEX])
    assert "big" in labelled and "Basophil" in labelled and "cell shape" not in labelled
    asking = ConversationSamples(str(tmp_path), processor, 1.0, seed=1, window=2)[0, 1][0]
    labelled = processor.tokenizer.decode([t for t in asking.labels if t != IGNORE_INDEX])
    # With probability 1 every question but the first (which goes with the image) is learned too.
    assert "Is the cell shape round?" in labelled and "What is the label?" in labelled
    assert "What is the cell size?" not in labelled


@pytest.mark.parametrize("family", ["mllama", "llava"])
def test_dpo_against_the_policys_own_log_probabilities_is_log_2(family, checkpoints, tmp_path):
    """The first DPO step: the reference is the policy itself, so every margin is 0 and the loss
    is -log sigmoid(0) = log 2; a reference 1 nat worse on the chosen answer gives -log sigmoid(beta)."""
    from medift.objectives import sequence_log_probs
    from medift.self_training import reference_log_probs

    model, processor = load_base_model(str(checkpoints[family]))
    from PIL import Image

    pairs = [
        {"image_id": "a", "question": "What is the cell size?", "chosen": "big.", "rejected": "small round."},
        {"image_id": "b", "question": "Is the cell shape round?", "chosen": "Yes.", "rejected": "No, it is not."},
    ]
    images = {"a": Image.new("RGB", (64, 64), (200, 10, 10)), "b": Image.new("RGB", (64, 64), (10, 200, 10))}
    references = reference_log_probs(model, processor, pairs, images, batch_size=2)
    rows = [
        {
            **pair,
            "split": "train",
            "image": _image_bytes(),
            "chosen_score": 10.0,
            "rejected_score": 0.0,
            "reference_chosen": ref_c,
            "reference_rejected": ref_r,
        }
        for pair, (ref_c, ref_r) in zip(pairs, references)
    ]
    # The stored images differ from the ones scored above: score the stored ones as training will.
    write_generated_shards(tmp_path, PREFERENCES, rows, lambda: {})
    samples = PreferenceSamples(str(tmp_path), processor, window=2)
    batch = PreferenceSamples.collate(processor, [samples[0, 1], samples[1, 1]])
    assert batch["input_ids"].shape[0] == 4 and batch["reference_log_probs"].dtype == torch.float64
    with torch.no_grad():
        own = sequence_log_probs(model, {k: v for k, v in batch.items() if k != "reference_log_probs"})
    batch["reference_log_probs"] = own.double()
    loss = dpo_objective(0.1)(model, batch, model.device, model.dtype)
    assert abs(float(loss.detach()) - math.log(2)) < 1e-5
    batch["reference_log_probs"] = own.double() - torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    loss = dpo_objective(0.1)(model, batch, model.device, model.dtype)
    assert abs(float(loss.detach()) - math.log1p(math.exp(-0.1))) < 1e-5


# --------------------------------------------------------------------------- the data table


def test_the_data_table_adds_each_stage_and_counts_generated_rows_once(tmp_path):
    def summary(name, rows, tokens, seconds, train_data=""):
        path = tmp_path / name / "train_summary.json"
        path.parent.mkdir(parents=True)
        config = {"train_data": train_data}
        path.write_text(
            json.dumps({"train_images": rows, "training_tokens": tokens, "seconds": seconds, "config": config})
        )
        return str(path)

    def manifest(name, **values):
        path = tmp_path / name / "manifest.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"summary": values}))
        return str(path)

    ift = summary("ift", 300, 1000, 40.0)
    stage1 = summary("stage1", 900, 5000, 100.0, "instructions")
    dpo = summary("dpo", 120, 800, 20.0, "preferences")
    instructions = manifest("instructions", images=300, generated_rows=900, kept_rows=900, judge_calls=0)
    preferences = manifest("preferences", images=300, generated_rows=300, kept_rows=120, judge_calls=300)
    costs = seed_costs([dpo, preferences, stage1, instructions])
    assert costs == {
        "images": 300,
        "generated_rows": 1200,
        "kept_rows": 120,
        "judge_calls": 300,
        "training_rows": 120,
        "training_tokens": 5800,
        "train_seconds": 120.0,
    }
    assert seed_costs([ift])["images"] == 300 and seed_costs([ift])["kept_rows"] == 0
    import pandas as pd

    long = pd.DataFrame(
        {
            "method": ["zero_shot", "ift", "inst_ft"],
            "dataset": ["wbcatt"] * 3,
            "accuracy": [30.0, 36.0, 50.0],
        }
    )
    inst = summary("inst", 900, 5000, 100.0, "instructions")
    entries = [f"ift:wbcatt:1:{ift}", f"inst_ft:wbcatt:1:{inst}", f"inst_ft:wbcatt:1:{instructions}"]
    table = data_table(long, entries, ["zero_shot", "ift", "inst_ft"], ["wbcatt"]).set_index("method")
    assert table.loc["zero_shot", "training_tokens"] == 0
    # ift gains 6 points over zero_shot, inst_ft 20: ift recovers 0.3 of the instructions' gain.
    assert table.loc["inst_ft", "ift_recovers"] == pytest.approx(6 / 20)
    assert math.isnan(table.loc["ift", "ift_recovers"])


# --------------------------------------------------------------------------- training (slow)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mllama", "llava"])
def test_training_on_conversations_and_then_on_preference_pairs(family, checkpoints, tiny_wbcatt_shards, tmp_path):
    """st_dpo on a tiny checkpoint of each kind of family: stage 1 on generated conversations
    (questions in the loss with p 0.5), pairs from its model, then DPO starting at log 2."""
    from medift.self_training import PreferenceConfig, make_preferences

    groups = "vision,fusion" if family == "mllama" else "vision,projector"
    conversations = tmp_path / "conversations"
    make_instructions(InstructionConfig(shards=str(tiny_wbcatt_shards), out_dir=str(conversations)))
    common = dict(shards=str(tiny_wbcatt_shards), proxy=False, batch_size=4, train_modules=groups, seed=1)
    stage1 = train(
        TrainConfig(
            base_model=str(checkpoints[family]),
            out_dir=str(tmp_path / "stage1"),
            train_data=str(conversations),
            question_loss=0.5,
            epochs=1,
            lr=1e-3,
            **common,
        )
    )
    assert (
        stage1["train_images"]
        == json.loads((conversations / "manifest.json").read_text())["totals"]["conversations"]["train"]
    )
    assert stage1["training_tokens"] > 0
    preferences = make_preferences(
        PreferenceConfig(
            shards=str(tiny_wbcatt_shards),
            model=str(tmp_path / "stage1"),
            out_dir=str(tmp_path / "preferences"),
            questions_per_image=3,
            device="cpu",
        )
    )
    summary = preferences["summary"]
    dropped = sum(summary["dropped"].values())
    assert summary["questions"] == 3 * summary["images"] == summary["kept_rows"] + dropped
    # A random tiny model's answers name no attribute value, so the judge ties them all: DPO
    # trains here on pairs of a right and a wrong answer, with the stage-1 model's log-probabilities.
    from PIL import Image

    from medift.images import decode_image
    from medift.self_training import reference_log_probs

    model, processor = load_base_model(str(tmp_path / "stage1"))
    rows = ShardRows(tiny_wbcatt_shards, DESCRIPTIONS, "train", ("image_id", "image", "attributes")).frame()
    pairs = [
        {
            "image_id": row.image_id,
            "question": "What is the cell size?",
            "chosen": f"{json.loads(row.attributes)['cell_size']}.",
            "rejected": "small." if json.loads(row.attributes)["cell_size"] == "big" else "big.",
        }
        for row in rows.itertuples()
    ]
    images = {row.image_id: decode_image(row.image) for row in rows.itertuples()}
    assert all(isinstance(image, Image.Image) for image in images.values())
    references = reference_log_probs(model, processor, pairs, images, batch_size=4)
    raw = dict(zip(rows["image_id"], rows["image"]))
    preference_rows = [
        {
            **pair,
            "split": "train",
            "image": raw[pair["image_id"]],
            "chosen_score": 10.0,
            "rejected_score": 0.0,
            "reference_chosen": ref_c,
            "reference_rejected": ref_r,
        }
        for pair, (ref_c, ref_r) in zip(pairs, references)
    ]
    write_generated_shards(tmp_path / "pairs", PREFERENCES, preference_rows, lambda: {})
    dpo = train(
        TrainConfig(
            base_model=str(tmp_path / "stage1"),
            out_dir=str(tmp_path / "dpo"),
            train_data=str(tmp_path / "pairs"),
            epochs=1,
            lr=5e-6,
            **common,
        )
    )
    # The first step's policy is the reference: every margin is 0, the loss log 2.
    assert dpo["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert dpo["train_images"] == len(pairs) and dpo["training_tokens"] > 0
    load_base_model(str(tmp_path / "dpo"))


def test_candidates_rated_by_a_hosted_judge_are_cached_so_a_rerun_makes_no_call(
    checkpoints, tiny_wbcatt_shards, tmp_path
):
    """make_candidates with `judge: hosted` against a local server: a call per distinct prompt,
    every reply cached on disk; the same job again makes no call and writes the same shards."""
    from medift.vital import CandidateConfig, make_candidates
    from tests.fixtures.judge_server import FakeChatServer

    server = FakeChatServer()
    try:
        judge = {"kind": "hosted", "url": server.url, "model": "judge", "api_key_env": None, "max_calls": 500}
        judge.update(backoff_s=0.001)

        def run(out):
            return make_candidates(
                CandidateConfig(
                    shards=str(tiny_wbcatt_shards),
                    base_model=str(checkpoints["llava"]),
                    out_dir=str(tmp_path / out),
                    judge=json.dumps(judge),
                    judge_cache=str(tmp_path / "cache"),
                    rounds=1,
                    max_new_tokens=4,
                    device="cpu",
                )
            )

        first = run("first")
        summary = first["summary"]
        # One call per distinct prompt (findings, question, answer): a repeated one is read from the cache.
        assert 0 < summary["judge_calls"] == len(server.requests) <= summary["generated_rows"]
        assert summary["by_origin"]["ground_truth"] == summary["by_origin"]["model"]
        ratings = ShardRows(tmp_path / "first", "candidates", "train", ("rating",)).frame()["rating"]
        assert (ratings == 7.0).all()  # the server's "Score: 7"
        calls = len(server.requests)
        second = run("second")
        assert second["summary"]["judge_calls"] == 0 and len(server.requests) == calls
        assert [f["sha256"] for f in second["files"]] == [f["sha256"] for f in first["files"]]
    finally:
        server.close()
