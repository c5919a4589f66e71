"""Every VLM family through the pipeline's real interfaces, on tiny random checkpoints.

Each family's checkpoint (medift.testing.tiny_checkpoints: the family's model class, its own processor
and a chat template of the real structure) is saved with `save_pretrained` and loaded with
`load_base_model`, as a user's local checkpoint would be. Then, per family: the assembled
training sequence decodes as the family's template with the proxy placeholders after the
image and labels on the response only; one training run of caption_ft and of ift
(through DeepSpeed, ZeRO-2 and ZeRO-3) changes exactly the configured groups and saves a
model that reloads; LoRA adds to the other groups and saves merged or as a peft adapter;
and `generate` and `letter` scoring give the same letters at batch 1 and 8 and agree.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from medift import mcq
from medift.chat import IGNORE_INDEX, encode_conversation, model_inputs
from medift.embedded.pretrain import held_out_questions
from medift.evaluate import score_questions, scoring_settings
from medift.images import encode_image
from medift.model.families import FAMILIES, native_image_size
from medift.model.loading import ADAPTER_DIR, load_base_model, parameter_groups, select_trainable
from medift.testing.tiny_checkpoints import build_tiny_checkpoint, family_names
from medift.train import TrainConfig, train

ALL = family_names()
# What the benchmark trains per family: the paper's vision + fusion on Mllama, vision + projector elsewhere.
DEFAULT_GROUPS = {"mllama": "vision,fusion"}
K = 4  # proxy tokens


def groups_for(family: str) -> str:
    return DEFAULT_GROUPS.get(family, "vision,projector")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny_checkpoint(family, root / family, seed=0) for family in ALL}


@pytest.fixture(scope="module")
def shards(tiny_wbcatt_shards):
    return tiny_wbcatt_shards


def image(seed: int = 0, size=(64, 64)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def test_every_tiny_family_is_in_the_family_table():
    from medift.testing.tiny_checkpoints import build_tiny

    for family in ALL:
        model, _ = build_tiny(family)
        assert model.config.model_type in FAMILIES, family


@pytest.mark.parametrize("family", ALL)
def test_training_sequence_decodes_as_the_family_template(family, checkpoints):
    model, processor = load_base_model(str(checkpoints[family]))
    tokenizer = processor.tokenizer
    response = "large cell size, round nucleus shape"
    encoded = encode_conversation(processor, [tokenizer.proxy_token * K], [response], with_image=True)
    batch = model_inputs(processor, [encoded, encoded], [image(0), image(1, (80, 60))])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    proxy = (ids == tokenizer.proxy_token_id).nonzero().flatten().tolist()
    image_ids = {model.config.image_token_id} if hasattr(model.config, "image_token_id") else set()
    image_ids |= {getattr(model.config, "image_token_index", -1)}
    image_positions = [i for i, t in enumerate(ids.tolist()) if t in image_ids]
    supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    # K placeholders in one run, after the image, before the response.
    assert proxy == list(range(proxy[0], proxy[0] + K))
    assert image_positions and max(image_positions) < proxy[0] < supervised[0]
    # The labels are the response and the template's end of turn, nothing of the prompt.
    target = tokenizer.decode(ids[supervised])
    assert (
        target.strip().startswith(response)
        and tokenizer.decode(ids[supervised], skip_special_tokens=True).strip() == response
    )
    out = model(**batch)  # the model checks image tokens against image features
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("family", ALL)
def test_lora_adds_to_the_other_groups_and_counts_per_group(family, checkpoints):
    groups = groups_for(family)
    model, _ = load_base_model(str(checkpoints[family]))
    plain = select_trainable(model, groups)
    model, _ = load_base_model(str(checkpoints[family]))
    with_lora = select_trainable(model, groups + ",lora")
    assert {g: n for g, n in with_lora["per_group"].items() if g != "lora"} == plain["per_group"]
    assert with_lora["per_group"]["lora"] > 0
    assert with_lora["trainable"] == plain["trainable"] + with_lora["per_group"]["lora"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any("lora_" not in n for n in trained)
    model, _ = load_base_model(str(checkpoints[family]))
    vision_lora = select_trainable(model, "projector,lora_vision" if family != "mllama" else "fusion,lora_vision")
    assert vision_lora["per_group"]["lora_vision"] > 0


@pytest.mark.parametrize("family", ALL)
def test_native_image_size_comes_from_the_saved_processor(family, checkpoints):
    side = native_image_size(checkpoints[family])
    assert 16 <= side <= 448


def _changed_groups(base_dir: Path, tuned_dir: Path) -> tuple[set, set]:
    """(group, name) of the changed and of the unchanged parameters between two checkpoints, both
    loaded as the pipeline loads them (the proxy token's embedding row, added at load, left out)."""
    base, processor = load_base_model(str(base_dir))
    tuned, _ = load_base_model(str(tuned_dir))
    proxy_row = processor.tokenizer.proxy_token_id
    owners = parameter_groups(base)
    tuned_parameters = dict(tuned.named_parameters())
    changed, unchanged = set(), set()
    for name, before in base.named_parameters():
        after = tuned_parameters[name]
        if before.shape[0] > proxy_row and before.shape[0] >= len(processor.tokenizer):  # embedding / output rows
            keep = torch.arange(before.shape[0]) != proxy_row
            before, after = before[keep], after[keep]
        (unchanged if torch.equal(before, after) else changed).add((owners[name], name))
    return changed, unchanged


@pytest.mark.slow
@pytest.mark.parametrize("method,zero_stage", [("caption_ft", 3), ("ift", 2)])
@pytest.mark.parametrize("family", ALL)
def test_one_training_run_changes_exactly_the_configured_groups(
    family, method, zero_stage, checkpoints, shards, tmp_path
):
    groups = groups_for(family)
    out = tmp_path / "tuned"
    summary = train(
        TrainConfig(
            shards=str(shards),
            base_model=str(checkpoints[family]),
            out_dir=str(out),
            proxy=method == "ift",
            proxy_tokens=K,
            epochs=1,
            warmup_epochs=1,
            batch_size=4,
            lr=1e-2,
            zero_stage=zero_stage,
            train_modules=groups,
            seed=1,
            gradient_checkpointing=method == "ift",
        )
    )
    assert summary["steps"] == (2 if method == "ift" else 1)
    # One rank's rendezvous leaves no launcher variables behind for the processes this one starts.
    assert not {"WORLD_SIZE", "RANK", "MASTER_PORT"} & set(os.environ)
    model, _ = load_base_model(str(out))  # plain transformers layout, reloads
    changed, unchanged = _changed_groups(checkpoints[family], out)
    configured = set(groups.split(",")) | ({"projector"} if "fusion" in groups else set())
    assert {g for g, _ in changed} == configured, sorted(changed)[:5]
    # Some configured tensors get no gradient by the family's design (LLaVA reads the vision
    # tower's second-to-last layer, so its last layer never trains), but most do.
    frozen_in_groups = sorted(n for g, n in unchanged if g in configured)
    assert len(frozen_in_groups) < len(changed), frozen_in_groups
    assert (out / "proxy.safetensors").is_file() == (method == "ift")
    assert summary["trainable_parameters"]["per_group"]


@pytest.mark.slow
@pytest.mark.parametrize("proxy_lr", [None, 3e-2])
def test_the_warm_up_moves_the_proxy_at_proxy_lr_and_defaults_to_lr(proxy_lr, checkpoints, shards, tmp_path):
    from safetensors.torch import load_file

    from medift.proxy import ProxyInstruction

    lr, seed = 1e-4, 3
    out = tmp_path / "tuned"
    train(
        TrainConfig(
            shards=str(shards),
            base_model=str(checkpoints["mllama"]),
            out_dir=str(out),
            proxy=True,
            proxy_tokens=K,
            epochs=1,
            warmup_epochs=1,
            batch_size=4,
            lr=lr,
            proxy_lr=proxy_lr,
            train_modules="vision,fusion",
            seed=seed,
            max_steps=1,
            validate=False,
        )
    )
    model, processor = load_base_model(str(checkpoints["mllama"]))
    hidden = model.get_input_embeddings().weight.shape[1]
    initial = ProxyInstruction(
        K, hidden, processor.tokenizer.proxy_token_id, torch.Generator().manual_seed(seed)
    ).weight
    moved = (load_file(str(out / "proxy.safetensors"))["proxy"] - initial.detach()).abs()
    # AdamW's first step moves a coordinate by lr * g / (|g| + eps): lr wherever |g| >> eps.
    expected = lr if proxy_lr is None else proxy_lr
    assert expected * 0.99 < moved.max() <= expected * 1.0001
    assert torch.quantile(moved.flatten(), 0.5) > expected * 0.9


def test_a_non_positive_proxy_lr_fails_before_any_model_is_loaded():
    with pytest.raises(ValueError, match="proxy_lr must be positive"):
        TrainConfig(shards="missing", base_model="missing", out_dir="missing", proxy_lr=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL)
def test_lora_saved_merged_or_as_a_peft_adapter_gives_the_same_model(family, checkpoints, shards, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    outputs = {}
    for mode in ("merged", "adapter"):
        out = tmp_path / mode
        train(
            TrainConfig(
                shards=str(shards),
                base_model=str(checkpoints[family]),
                out_dir=str(out),
                proxy=False,
                epochs=1,
                warmup_epochs=0,
                batch_size=4,
                lr=1e-2,
                train_modules="projector,lora",
                lora_save=mode,
                seed=1,
            )
        )
        outputs[mode] = out
    assert not (outputs["merged"] / ADAPTER_DIR).exists()
    # The adapter loads with peft on the saved model (which holds the trained projector) ...
    base = AutoModelForImageTextToText.from_pretrained(outputs["adapter"], local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, str(outputs["adapter"] / ADAPTER_DIR))
    assert any("lora_" in n for n, _ in peft_model.named_parameters())
    # ... and either way the tuned weights are the same.
    merged, _ = load_base_model(str(outputs["merged"]))
    adapted, _ = load_base_model(str(outputs["adapter"]))
    merged_state, adapted_state = merged.state_dict(), adapted.state_dict()
    assert set(merged_state) == set(adapted_state)
    for name in merged_state:
        torch.testing.assert_close(merged_state[name], adapted_state[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lora_with_zero3_fails_before_training():
    with pytest.raises(ValueError, match="LoRA with ZeRO-3"):
        TrainConfig(shards="x", base_model="y", out_dir="z", train_modules="vision,lora", zero_stage=3)
    with pytest.raises(ValueError, match="unknown train_modules"):
        TrainConfig(shards="x", base_model="y", out_dir="z", train_modules="vision,decoder")


@pytest.mark.parametrize("family,groups", [("mllama", "fusion"), ("llava", "vision"), ("qwen2_5_vl", "projector")])
def test_gradient_checkpointing_gives_the_same_gradients_with_frozen_towers(family, groups, checkpoints):
    grads = {}
    for checkpointing in (False, True):
        model, processor = load_base_model(str(checkpoints[family]))
        select_trainable(model, groups)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        encoded = encode_conversation(processor, ["Describe this medical scan."], ["large cell size"], with_image=True)
        model(**model_inputs(processor, [encoded, encoded], [image(0), image(1)])).loss.backward()
        # (LLaVA's last vision layer gets no gradient at all: it reads the second-to-last.)
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[False] and set(grads[False]) == set(grads[True])
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------ scoring


def mcq_frame(n: int, seed: int) -> pd.DataFrame:
    rows = []
    for i, (instruction, picture, n_options, answer, _) in enumerate(held_out_questions(n, seed, 64)):
        lines = instruction.split("\n")
        rows.append(
            {
                "question_id": f"q{i}",
                "image_id": f"img{i}",
                "attribute": lines[0],
                "question": lines[0],
                "options": [line.split(". ", 1)[1] for line in lines[1 : 1 + n_options]],
                "answer_index": answer,
                "image": encode_image(picture),
            }
        )
    return pd.DataFrame(rows)


def answer_in_format(model, processor, questions: pd.DataFrame, steps: int = 60) -> None:
    """A few optimizer steps on `The correct answer is X.` so that generation parses (random
    weights never write the format); the labels come from the one model-input builder."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    rng = random.Random(0)
    from medift.images import decode_image

    rows = list(questions.itertuples())
    for _ in range(steps):
        chosen = rng.sample(rows, 4)
        encoded = [
            encode_conversation(
                processor,
                [mcq.build_mcq_instruction(q.question, list(q.options))],
                [mcq.format_answer(q.answer_index)],
                with_image=True,
            )
            for q in chosen
        ]
        loss = model(**model_inputs(processor, encoded, [decode_image(q.image) for q in chosen])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("family", ALL)
def test_generate_and_letter_scoring_are_batch_invariant_and_agree(family, checkpoints):
    model, processor = load_base_model(str(checkpoints[family]))
    answer_in_format(model, processor, mcq_frame(24, seed=11))
    questions = mcq_frame(8, seed=5)
    letters = {}
    for scoring in ("generate", "letter"):
        for batch_size in (1, 8):
            config = scoring_settings(
                scoring=scoring,
                batch_size=batch_size,
                max_new_tokens=12,
                circular=False,
            )
            letters[scoring, batch_size] = list(score_questions(model, processor, questions, config)["parsed_letter"])
    assert letters["generate", 1] == letters["generate", 8]
    assert letters["letter", 1] == letters["letter", 8]
    parsed = [i for i, letter in enumerate(letters["generate", 1]) if letter]
    assert len(parsed) >= 6, letters["generate", 1]  # the format was learned: the agreement below means something
    assert all(letters["letter", 1][i] == letters["generate", 1][i] for i in parsed)
