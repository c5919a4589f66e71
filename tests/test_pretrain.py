"""The shipped base model is what the pipeline's pre-training rule produces."""

import json
import logging
import random
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch

from medift import mcq
from medift.chat import IGNORE_INDEX, encode_conversation, model_inputs
from medift.embedded import general
from medift.embedded.llava import EmbeddedModelConfig, build_model, build_processor
from medift.embedded.pretrain import (
    HISTORY_FILE,
    RETIRED_SETTINGS,
    ConversationSampler,
    PretrainConfig,
    RecipeConfig,
    binding_conversation,
    binding_stage,
    general_turn,
    image_features,
    initial_model,
    lookup_sequence,
    mixed_phase_config,
    option_flags,
    option_values,
    pretrain,
    random_options,
    read_history,
    recipe_stages,
    run_stages,
    stage_differences,
    text_reads_image_loss,
    value_token_ids,
    value_words_loss,
)

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "embedded-base"


def short_run(**fields) -> PretrainConfig:
    """A run of the given few steps: the default recipe's long binding and two-option phases off."""
    return PretrainConfig(**{"binding_steps": 0, "two_option_steps": 0, "eval_every": 0, "threads": 1, **fields})


@pytest.mark.slow
def test_pretraining_is_deterministic_on_cpu():
    config = short_run(mixed_steps=4, batch_size=4, eval_questions=4)
    first = pretrain(config, EmbeddedModelConfig(), stop_after=4)["history"]
    second = pretrain(config, EmbeddedModelConfig(), stop_after=4)["history"]
    assert first == second
    assert first[-1]["aux_loss"] > 0  # the mixed phase (images) was reached


@pytest.mark.slow
def test_the_binding_phase_is_deterministic_and_reaches_the_mixed_phase():
    config = short_run(
        binding_steps=3,
        binding_batch_size=4,
        binding_hops=1,
        mixed_steps=4,
        batch_size=4,
        eval_questions=4,
        eval_every=3,
        threads=1,
    )
    model_config = EmbeddedModelConfig(letter_dot_tokens=True)
    first = pretrain(config, model_config, stop_after=6)["history"]
    assert first == pretrain(config, model_config, stop_after=6)["history"]
    assert [h["aux_loss"] > 0 for h in first[:3]] == [False] * 3  # binding conversations: text only
    assert first[-1]["aux_loss"] > 0  # the mixed phase (images) was reached
    checked = [h for h in first if "binding_accuracy" in h]
    assert [h["step"] for h in checked] == [2, 5]
    assert all(0 <= h["lookup_accuracy"] <= 1 and 0 <= h["binding_accuracy"] <= 1 for h in checked)


def test_lookup_sequences_predict_the_letter_before_each_value():
    processor = build_processor(EmbeddedModelConfig(letter_dot_tokens=True))
    vocab = processor.tokenizer.get_vocab()
    values = option_values()
    assert len(values) == len(set(values)) and all(value in vocab for value in values)
    ids, labels = lookup_sequence(random.Random(0), vocab, values, 4)
    listing = ids[: 4 * 3]  # "A." value "\n" per pair
    asked = [(ids[i - 2], label) for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert len(asked) == 4
    for value, letter in asked:
        assert listing[listing.index(value) - 1] == letter
    assert {processor.tokenizer.convert_ids_to_tokens(letter) for _, letter in asked} == {"A.", "B.", "C.", "D."}


def test_binding_stages():
    assert binding_stage(0, PretrainConfig(binding_steps=8)) == 2
    assert binding_stage(7, PretrainConfig(binding_steps=8)) == 5


def option_lines(instruction: str) -> list[str]:
    """The options of an evaluation-template question, in letter order."""
    return [line[3:] for line in instruction.split("\n") if line[:1].isupper() and line[1:3] == ". "]


@pytest.mark.parametrize("hops", [1, 2])
def test_binding_questions_are_answerable_from_their_context(hops):
    rng = random.Random(3)
    for _ in range(50):
        instructions, responses = binding_conversation(rng, 4, 3, 0.5, hops)
        assert instructions[0].startswith("Context: ")
        assert all(i.startswith("Context: ") == (hops == 1 or n == 0) for n, i in enumerate(instructions))
        for instruction, response in zip(instructions, responses):
            letter = mcq.parse_answer_letter(response, 26)
            lines = instruction.split("\n")
            options = option_lines(instruction)
            assert 2 <= len(options) <= 4
            chosen = options[mcq.LETTERS.index(letter)]
            if hops == 1:
                assert lines[0] == f"Context: {chosen}"
            elif chosen not in ("yes", "no", "nil"):  # stated by the phrase's presence or absence
                assert chosen in instructions[0].split("\n")[0]


@pytest.mark.slow
def test_a_run_can_start_from_an_earlier_runs_saved_model(tmp_path):
    model_config = EmbeddedModelConfig(letter_dot_tokens=True)
    earlier = short_run(
        out_dir=str(tmp_path / "earlier"), binding_steps=1, binding_batch_size=2, mixed_steps=0, eval_questions=2
    )
    pretrain(earlier, model_config)
    saved, _ = initial_model(replace(earlier, init_from=earlier.out_dir), model_config)
    fresh, _ = initial_model(earlier, model_config)
    saved_state, fresh_state = saved.state_dict(), fresh.state_dict()
    assert saved_state.keys() == fresh_state.keys()
    # One AdamW step moved every trained weight away from the seed's fresh initialisation.
    assert any(not torch.equal(saved_state[k], fresh_state[k]) for k in saved_state)
    with pytest.raises(ValueError, match="earlier.*letter_dot_tokens=True"):
        initial_model(replace(earlier, init_from=earlier.out_dir), EmbeddedModelConfig(letter_dot_tokens=False))


@pytest.mark.slow
def test_tied_embeddings_stay_tied_through_save_and_init_from(tmp_path):
    model_config = EmbeddedModelConfig(letter_dot_tokens=True, tie_word_embeddings=True)
    earlier = short_run(
        out_dir=str(tmp_path / "tied"), binding_steps=1, binding_batch_size=2, mixed_steps=0, eval_questions=2
    )
    pretrain(earlier, model_config)
    model, _ = initial_model(replace(earlier, init_from=earlier.out_dir), model_config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tied.*tie_word_embeddings=False"):
        initial_model(replace(earlier, init_from=earlier.out_dir), replace(model_config, tie_word_embeddings=False))


def test_binding_rows_mixed_into_later_batches():
    model_config = EmbeddedModelConfig(letter_dot_tokens=True)
    processor = build_processor(model_config)
    config = PretrainConfig(batch_size=6, binding_fraction=1.0, binding_hops=1)
    batch = ConversationSampler(processor, config, random.Random(0), model_config.image_size).batch()
    assert "pixel_values" not in batch  # every row was a text binding conversation
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "Context :" in text and "The correct answer is" in text  # the word-level decode spaces ":"


def test_value_turns_answer_with_the_value_alone():
    processor = build_processor(EmbeddedModelConfig(letter_dot_tokens=True))
    vocab = processor.tokenizer.get_vocab()
    rng = random.Random(2)
    for _ in range(50):
        attributes = general.sample_attributes(rng)
        instruction, response = general_turn(attributes, rng, 0.5, value_probability=1.0)
        key = next(k for k, question in general.QUESTION_TEXT.items() if question == instruction)
        assert response == attributes[key] and response in vocab  # one token: the answer is the value itself


def test_attribute_heads_read_the_image_tokens_the_decoder_sees():
    model_config = EmbeddedModelConfig(text_hidden=64, vision_hidden=32)
    processor = build_processor(model_config)
    model = build_model(model_config, processor, seed=0).eval()
    rng = random.Random(0)
    images = [general.render(general.sample_attributes(rng), rng) for _ in range(3)]
    turns = [encode_conversation(processor, ["What is the color?"], ["red"], with_image=True) for _ in images]
    batch = model_inputs(processor, turns, images)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        output = model(**batch)
        tokens = image_features(output, len(pixels))
        # What the decoder receives in place of the image placeholders, averaged per image.
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        expected = model.model.multi_modal_projector(hidden).mean(dim=1)
    assert torch.allclose(tokens, expected, atol=1e-6)


def test_option_probe_targets_mark_the_answer_among_each_questions_options():
    model_config = EmbeddedModelConfig(letter_dot_tokens=True)
    processor = build_processor(model_config)
    tokenizer = processor.tokenizer
    turns = [
        (mcq.build_mcq_instruction("What is the color?", ["blue", "red", "green"]), mcq.format_answer(1)),
        ("Describe this image.", "big size, red color"),
        (mcq.build_mcq_instruction("What is the size?", ["small", "big"]), mcq.format_answer(1)),
    ]
    encoded = encode_conversation(processor, [t[0] for t in turns], [t[1] for t in turns], with_image=True)
    image = general.render(general.sample_attributes(random.Random(0)), random.Random(0))
    batch = model_inputs(processor, [encoded, encoded], [image, image])
    letter_ids = torch.tensor(tokenizer.convert_tokens_to_ids([f"{letter}." for letter in "ABCDE"]))
    rows, positions, targets = option_flags(batch["input_ids"], batch["labels"], letter_ids)
    values = tokenizer.convert_ids_to_tokens(batch["input_ids"][rows, positions].tolist())
    assert rows.tolist() == [0] * 5 + [1] * 5
    assert values[:5] == ["blue", "red", "green", "small", "big"]
    assert targets.tolist()[:5] == [0.0, 1.0, 0.0, 0.0, 1.0]
    # Only with letter-dot tokens (the probe reads the token after each 'A.').
    with pytest.raises(ValueError, match="letter_dot_tokens"):
        pretrain(
            short_run(option_flag_weight=1.0, mixed_steps=0, eval_questions=2),
            EmbeddedModelConfig(letter_dot_tokens=False),
            stop_after=1,
        )
    with pytest.raises(ValueError, match="option_flag_layer 5"):
        pretrain(short_run(option_flag_layer=5, mixed_steps=0, eval_questions=2), model_config, stop_after=1)


def option_flags_by_loop(input_ids, labels, letter_ids):
    """option_flags written as the definition reads: each prompt letter, the next answer letter after it."""
    rows, positions, targets = [], [], []
    for row in range(input_ids.shape[0]):
        ids, in_response = input_ids[row].tolist(), (labels[row] != IGNORE_INDEX).tolist()
        letters = [p for p, t in enumerate(ids) if t in letter_ids.tolist()]
        answers = [p for p in letters if in_response[p]]
        for p in (p for p in letters if not in_response[p]):
            answer = next((q for q in answers if q > p), None)
            if answer is not None:
                rows.append(row)
                positions.append(p + 1)
                targets.append(float(ids[p] == ids[answer]))
    return rows, positions, targets


def test_option_flags_match_their_definition_on_sampled_batches():
    config = short_run(batch_size=16, binding_batch_size=16, binding_fraction=0.3, text_fraction=0.3)
    model_config = EmbeddedModelConfig()
    processor = build_processor(model_config)
    letter_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids([f"{letter}." for letter in "ABCDE"]))
    sampler = ConversationSampler(processor, config, random.Random(5), model_config.image_size)
    batches = [sampler.batch() for _ in range(3)] + [sampler.binding_batch(5)]
    for batch in batches:
        rows, positions, targets = option_flags(batch["input_ids"], batch["labels"], letter_ids)
        expected = option_flags_by_loop(batch["input_ids"], batch["labels"], letter_ids)
        assert len(rows) > 16
        assert (rows.tolist(), positions.tolist(), targets.tolist()) == expected
        assert 0 < targets.mean() < 1


def test_two_option_image_questions_shuffle_two_value_attributes_too():
    # Off (0), the draws are exactly those of the code before the option existed.
    assert random_options(("big", "small"), "small", random.Random(3), 0.0) == (["big", "small"], 1)
    assert random_options(general.ATTRIBUTES["color"], "red", random.Random(4), 0.3) == random_options(
        general.ATTRIBUTES["color"], "red", random.Random(4), 0.3, 0
    )
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        for key, values in general.ATTRIBUTES.items():
            options, answer = random_options(values, values[-1], rng, 0.0, most_options=2)
            assert len(options) == 2 and options[answer] == values[-1]
            seen.add((key, answer))
    assert {(key, a) for key in general.ATTRIBUTES for a in (0, 1)} <= seen  # both orders, every attribute
    with pytest.raises(ValueError, match="image_options_most 1"):
        PretrainConfig(image_options_most=1)


def test_two_option_steps_come_first_in_the_mixed_phase_then_the_configured_mix():
    config = PretrainConfig(mixed_steps=10, two_option_steps=4, fixed_order_fraction=0.3, image_options_most=5)
    early = [mixed_phase_config(step, config) for step in range(4)]
    assert all((c.fixed_order_fraction, c.image_options_most) == (0.0, 2) for c in early)
    assert all(mixed_phase_config(step, config) is config for step in (4, 9))  # then the mix
    processor = build_processor(EmbeddedModelConfig(letter_dot_tokens=True))
    sampler = ConversationSampler(processor, replace(config, binding_fraction=0.0, batch_size=40), random.Random(0), 64)
    a, c = processor.tokenizer.convert_tokens_to_ids(["A.", "C."])
    two_option_ids = sampler.batch(mixed_phase_config(0, sampler.config))["input_ids"].flatten().tolist()
    assert two_option_ids.count(a) > 20 and two_option_ids.count(c) == 0  # options, never a third one
    mix_ids = sampler.batch()["input_ids"].flatten().tolist()  # the run's own settings
    assert mix_ids.count(c) > 5
    with pytest.raises(ValueError, match="two_option_steps 11 exceeds mixed_steps 10"):
        replace(config, two_option_steps=11)


def test_value_words_loss_classifies_every_kept_position_by_the_value_embeddings():
    model_config = EmbeddedModelConfig(text_hidden=32, vision_hidden=16)
    processor = build_processor(model_config)
    model = build_model(model_config, processor, seed=0)
    value_ids = value_token_ids(processor.tokenizer)
    assert [processor.tokenizer.convert_ids_to_tokens(ids) for ids in value_ids] == [
        list(v) for v in general.ATTRIBUTES.values()
    ]
    embeddings = model.get_input_embeddings().weight.detach()
    targets = torch.tensor([[0, 1, 2, 0, 1], [1, 0, 0, 2, 0]])
    tokens = torch.randn(2, 3, 32)
    expected = (
        sum(
            torch.nn.functional.cross_entropy(
                (tokens @ embeddings[ids].T).flatten(0, 1), targets[:, k].repeat_interleave(3)
            )
            for k, ids in enumerate(value_ids)
        )
        / 5
    )
    every = torch.ones(2, 3, dtype=torch.bool)
    assert torch.allclose(value_words_loss(model, tokens, targets, value_ids, every), expected)
    # Tokens that are the sum of their values' embeddings score lower than for other values.
    words = torch.stack([sum(embeddings[value_ids[k][row[k]]] for k in range(5)) for row in targets.tolist()])
    words = 10 * words.unsqueeze(1).expand(-1, 3, -1)
    assert value_words_loss(model, words, targets, value_ids, every) < value_words_loss(
        model, words, (targets + 1) % 2, value_ids, every
    )


def test_text_reads_image_loss_covers_the_text_after_each_image_only():
    model_config = EmbeddedModelConfig(text_hidden=32, vision_hidden=16)
    processor = build_processor(model_config)
    model = build_model(model_config, processor, seed=0)
    value_ids = value_token_ids(processor.tokenizer)
    encoded = [
        encode_conversation(processor, ["What is the size?"], ["big"], with_image=True),
        encode_conversation(processor, ["Describe this image."], ["big size, red color"], with_image=False),
        encode_conversation(
            processor, ["Describe this image."], ["small size, blue color, circle shape"], with_image=True
        ),
    ]
    rng = random.Random(0)
    image = general.render(general.sample_attributes(rng), rng)
    batch = model_inputs(processor, encoded, [image, None, image])
    hidden = torch.randn(*batch["input_ids"].shape, 32)
    targets = torch.tensor([[0, 0, 0, 0, 0], [1, 2, 0, 1, 1]])  # one row per image: rows 0 and 2
    embeddings = model.get_input_embeddings().weight
    image = model.config.image_token_id
    expected = 0
    for k, ids in enumerate(value_ids):
        logits, wanted = [], []
        for image_row, row in enumerate((0, 2)):
            ids_row = batch["input_ids"][row].tolist()
            last_image = max(i for i, t in enumerate(ids_row) if t == image)
            for position in range(last_image + 1, int(batch["attention_mask"][row].sum())):
                logits.append(hidden[row, position] @ embeddings[ids].T)
                wanted.append(targets[image_row, k])
        expected += torch.nn.functional.cross_entropy(torch.stack(logits), torch.stack(wanted))
    got = text_reads_image_loss(model, hidden, batch["input_ids"], batch["attention_mask"], targets, value_ids)
    assert torch.allclose(got, expected / 5)


@pytest.mark.slow
def test_bridge_losses_train_deterministically():
    config = short_run(
        binding_steps=1,
        binding_batch_size=4,
        mixed_steps=2,
        batch_size=4,
        eval_questions=4,
        option_flag_weight=1.0,
        text_reads_image_weight=1.0,
        image_options_most=2,
    )
    model_config = EmbeddedModelConfig(letter_dot_tokens=True)
    first = pretrain(config, model_config, stop_after=3)["history"]
    assert first == pretrain(config, model_config, stop_after=3)["history"]
    # Text binding conversations have option lines too: the probe marks their answers from the first step.
    assert all(h["flag_loss"] > 0 for h in first)
    assert [h["reads_loss"] > 0 for h in first] == [False, True, True]  # image steps only
    with pytest.raises(ValueError, match="text_reads_image_layer 9"):
        pretrain(replace(config, text_reads_image_layer=9), model_config, stop_after=1)


def shipped_stages() -> list[dict]:
    """The shipped model's recorded stages, first to last."""
    shipped = read_history(SHIPPED)
    return [*shipped.get("earlier_stages", []), shipped]


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "pretrain_history.json").exists(), reason="no shipped base model")
def test_shipped_weights_come_from_this_pretraining_code():
    """The first stage starts from code, so its first steps can be re-run and compared."""
    first = shipped_stages()[0]
    assert not first["config"]["init_from"]
    config = PretrainConfig(**first["config"])
    model_config = EmbeddedModelConfig(**first["model_config"])
    rerun = pretrain(config, model_config, stop_after=3)["history"]
    for ours, theirs in zip(rerun, first["history"][:3]):
        # Losses are rounded to 5 decimals; thread count may change float summation order.
        assert ours["lm_loss"] == pytest.approx(theirs["lm_loss"], abs=2e-3)


@pytest.mark.skipif(not (SHIPPED / "pretrain_history.json").exists(), reason="no shipped base model")
def test_rule_defaults_rebuild_the_shipped_model():
    """`--forcerun pretrain_base_model` passes only out_dir, first_stage_dir, seed, image size and threads.

    Settings deleted since the shipped run are compared through read_history: left out where the
    run had them off, so only the settings that still exist are compared; one it had on stays."""
    recorded = shipped_stages()
    stages = recipe_stages(RecipeConfig())
    assert len(recorded) == len(stages)
    model_config = EmbeddedModelConfig()
    settings = {f.name for f in fields(PretrainConfig)}
    for index, (stage, run) in enumerate(zip(stages, recorded)):
        assert run["config"].keys() <= settings, (index, "a deleted setting was on in the shipped run")
        # Each later stage started from a saved model; the path it was saved at does not matter.
        assert bool(run["config"]["init_from"]) == (index > 0)
        # Settings added after the shipped run (absent from its record) default to what that run did.
        defaults = {**asdict(stage), **asdict(model_config)}
        for key in stage_differences(run, stage, model_config):
            assert key not in run["config"] and key not in run["model_config"], (index, key)
            assert defaults[key] == ADDED_SINCE_SHIPPED_RUN[key], (index, key)


ADDED_SINCE_SHIPPED_RUN: dict = {}  # setting -> the value the shipped run had in effect


def test_read_history_leaves_out_deleted_settings_only_where_they_were_off(tmp_path):
    """A first stage saved before a setting was deleted is still reused while it had it off."""
    current = asdict(PretrainConfig())
    off, on = {**current, **RETIRED_SETTINGS}, {**current, **RETIRED_SETTINGS, "text_steps": 300}
    model_config = asdict(EmbeddedModelConfig())
    runs = [{"config": config, "model_config": model_config} for config in (off, on)]
    (tmp_path / HISTORY_FILE).write_text(json.dumps({**runs[1], "earlier_stages": [runs[0]]}))
    history = read_history(tmp_path)
    assert history["earlier_stages"][0]["config"] == current
    assert history["config"] == {**current, "text_steps": 300}
    assert stage_differences(history["earlier_stages"][0], PretrainConfig(), EmbeddedModelConfig()) == []
    assert stage_differences(history, PretrainConfig(), EmbeddedModelConfig()) == ["text_steps"]


def test_recipe_refines_from_the_first_stage():
    first, refine = recipe_stages(RecipeConfig(out_dir="final", first_stage_dir="first", seed=3, threads=1))
    assert asdict(first) == asdict(PretrainConfig(out_dir="first", seed=3, threads=1))
    assert asdict(refine) == asdict(
        PretrainConfig(
            out_dir="final",
            init_from="first",
            seed=3,
            threads=1,
            binding_steps=0,
            mixed_steps=1500,
            two_option_steps=0,
            lr=1e-3,
            warmup_steps=30,
        )
    )
    (only,) = recipe_stages(RecipeConfig(out_dir="final", refine_steps=0))
    assert only.out_dir == "final" and not only.init_from


@pytest.mark.slow
def test_run_stages_records_earlier_stages_and_reuses_only_a_matching_first_stage(tmp_path, monkeypatch, caplog):
    tiny = dict(mixed_steps=1, batch_size=4, eval_questions=4)
    first = short_run(out_dir=str(tmp_path / "first"), **tiny)
    second = short_run(out_dir=str(tmp_path / "final"), init_from=first.out_dir, lr=1e-3, **tiny)
    model_config = EmbeddedModelConfig()
    run_stages([first, second], model_config, reuse_first=True)
    first_run, final_run = read_history(first.out_dir), read_history(second.out_dir)
    assert final_run["earlier_stages"] == [first_run]
    assert final_run["config"]["init_from"] == first.out_dir
    # The second stage started from the first one's weights, not from a fresh model.
    assert final_run["history"][0]["lm_loss"] != first_run["history"][0]["lm_loss"]

    from medift.embedded import pretrain as module

    ran = []
    real = module.pretrain
    monkeypatch.setattr(
        module,
        "pretrain",
        lambda config, model_config, **kw: ran.append(config.out_dir) or real(config, model_config, **kw),
    )
    run_stages([first, second], model_config, reuse_first=True)
    assert ran == [second.out_dir]
    # Another thread count computes the same stage; other settings do not.
    run_stages([replace(first, threads=2), second], model_config, reuse_first=True)
    assert ran == [second.out_dir] * 2
    with caplog.at_level(logging.INFO, logger="medift.embedded.pretrain"):
        run_stages([replace(first, lr=1e-3), second], model_config, reuse_first=True)
    assert f"not reusing {first.out_dir}: its settings differ in lr" in caplog.text
    assert ran == [second.out_dir] * 2 + [first.out_dir, second.out_dir]
    run_stages([first, second], model_config, reuse_first=False)
    assert ran[-2:] == [first.out_dir, second.out_dir]
