"""Compute: activation checkpointing reaches every trained tower, frozen towers keep no
activations, and the FLOP accounting (medift/flops.py) against FlopCounterMode and a hand count.

On a tiny Mllama (tiny real checkpoint, saved and loaded; its processor pads each image to 2
tiles of 28 px, 14 px patches: 4 patches + 1 class token per tile, padded to 8 by the encoder).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from medift.chat import encode_conversation, model_inputs
from medift.flops import device_peak_flops, step_flops
from medift.model.loading import load_base_model, select_trainable
from medift.proxy import ProxyInstruction
from medift.testing.tiny_checkpoints import build_tiny_checkpoint
from medift.train import TrainConfig, disable_activation_checkpointing, enable_activation_checkpointing, train

K = 4


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    return build_tiny_checkpoint("mllama", tmp_path_factory.mktemp("mllama") / "m", seed=0)


def load(checkpoint, groups: str, checkpointing: bool, attention: str = "sdpa"):
    """The tiny Mllama with `groups` trained (none: all frozen, as in the warm-up), a proxy attached, and
    a batch of two rows: a 1-tile image (padded to 2 tiles) and a 2-tile one, rows of different lengths."""
    model, processor = load_base_model(str(checkpoint))
    model.set_attn_implementation(attention)
    if groups:
        select_trainable(model, groups)
    else:
        model.requires_grad_(False)
    if checkpointing:
        enable_activation_checkpointing(model)
    proxy = ProxyInstruction(
        K,
        model.get_input_embeddings().weight.shape[1],
        processor.tokenizer.proxy_token_id,
        torch.Generator().manual_seed(0),
    ).attach(model)
    text = processor.tokenizer.proxy_token * K
    rows = [
        encode_conversation(processor, [text], ["small round nucleus"], True),
        encode_conversation(processor, [text], ["large cell, granular cytoplasm, two lobes"], True),
    ]
    images = [Image.new("RGB", (28, 28), (10, 200, 30)), Image.new("RGB", (56, 28), (200, 20, 30))]
    model.train()
    return model, proxy, model_inputs(processor, rows, images)


def step(model, proxy, batch) -> dict:
    """Forward + backward: vision-tower bytes saved for the backward, vision layers run in the backward
    (recomputed), gradients of the trained weights and the proxy."""
    inside, saved, calls = [], {"vision": 0}, []
    vision = model.model.vision_model
    vision.register_forward_pre_hook(lambda m, a: inside.append(1))
    vision.register_forward_hook(lambda m, a, o: inside.pop() and None)
    for module in model.modules():
        if type(module).__name__ == "MllamaVisionEncoderLayer":  # its attention runs again when the layer is recomputed
            module.self_attn.register_forward_pre_hook(lambda m, a: calls.append(1) and None)

    def pack(tensor):
        if inside:
            saved["vision"] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    forward_calls = len(calls)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["proxy"] = proxy.weight.grad.clone()
    return {
        "vision_bytes": saved["vision"],
        "recomputed": len(calls) - forward_calls,
        "grads": grads,
        "loss": loss.item(),
    }


def test_checkpointing_recomputes_the_vision_layers_with_equal_gradients(mllama):
    plain = step(*load(mllama, "vision,fusion", False))
    checkpointed = step(*load(mllama, "vision,fusion", True))
    layers = 3  # 2 local + 1 global encoder layers
    assert plain["recomputed"] == 0 and checkpointed["recomputed"] == layers
    assert checkpointed["vision_bytes"] < 0.5 * plain["vision_bytes"]  # measured: 124,784 vs 425,600 bytes
    assert checkpointed["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    # The recompute repeats the same fp32 operations: the gradients agree to rounding.
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(checkpointed["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("groups", ["", "fusion"])  # the warm-up (all frozen), and a frozen vision tower
def test_a_frozen_vision_tower_keeps_no_activations(mllama, groups):
    plain = step(*load(mllama, groups, False))
    checkpointed = step(*load(mllama, groups, True))
    assert plain["vision_bytes"] == 0 and checkpointed["vision_bytes"] == 0  # before the fix: 214,184 bytes
    assert checkpointed["recomputed"] == 0
    torch.testing.assert_close(checkpointed["grads"]["proxy"], plain["grads"]["proxy"], rtol=1e-5, atol=1e-7)


def test_disabling_checkpointing_restores_the_layers(mllama):
    model, proxy, batch = load(mllama, "vision", True)
    disable_activation_checkpointing(model)
    assert not any("forward" in vars(m) for m in model.modules())
    assert step(model, proxy, batch)["recomputed"] == 0


@pytest.mark.parametrize(
    "groups,proxy",
    [
        ("vision,fusion", False),
        ("vision,fusion", True),
        ("fusion", False),
        ("language_model", False),
        ("vision,projector,language_model", True),
        ("", True),
    ],
)
def test_hardware_flops_equal_the_flop_counter(mllama, groups, proxy):
    """Eager attention, so FlopCounterMode sees attention's matmuls (it does not count CPU SDPA). The
    formula leaves out one matmul the model runs: the vision attention mask's outer product
    (2 x 16 x 16 FLOPs per image here, 1,024 of ~1.7e7: 6e-5)."""
    model, attached, batch = load(mllama, groups, False, attention="eager")
    if not proxy:
        attached.detach()
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    groups_trained = select_trainable(model, groups)["groups"] if groups else []
    counted = step_flops(model.config, batch, groups_trained, proxy=proxy)
    assert counted["hardware_flops"] == pytest.approx(counter.get_total_flops(), rel=1e-4)


def test_model_flops_by_hand(mllama):
    """The useful work of a forward (nothing trained), counted by hand for the tiny config: vision
    hidden 32, MLP 64, 3 layers, 64-wide output; text hidden 32, MLP 64, kv width 32, vocab 600, layer 1 cross."""
    model, _, batch = load(mllama, "", False)
    counted = step_flops(model.config, batch, [], proxy=False)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    vocab = model.config.text_config.vocab_size
    tiles = [1, 2]  # real tiles: 5 tokens each (4 patches + class), no pad-to-8
    tokens = [5 * t for t in tiles]
    conv = 2 * 4 * sum(tiles) * (3 * 14 * 14) * 32
    vision_layer = sum(2 * n * (4 * 32 * 32 + 2 * 32 * 64) + 4 * n * n * 32 for n in tokens)
    projector = 2 * sum(tokens) * 64 * 32
    t = sum(lengths)
    self_layer = 2 * t * (2 * 32 * 32 + 3 * 32 * 64 + 2 * 32 * 32) + sum(4 * n * n * 32 for n in lengths)
    cross_layer = (
        2 * t * (2 * 32 * 32 + 3 * 32 * 64)
        + 2 * sum(tokens) * 32 * 64
        + sum(4 * n * v * 32 for n, v in zip(lengths, tokens))
    )
    lm_head = 2 * t * 32 * vocab
    assert counted["model_flops"] == pytest.approx(
        conv + 3 * vision_layer + projector + self_layer + cross_layer + lm_head, rel=1e-12
    )
    assert counted["image_tokens"] == 15 and counted["image_tokens_computed"] == 2 * 2 * 8
    assert counted["model_flops"] < counted["hardware_flops"]  # the padding tile and pad tokens are not useful work


def test_recompute_adds_the_checkpointed_forwards(mllama):
    model, _, batch = load(mllama, "vision,fusion", False)
    plain = step_flops(model.config, batch, ["vision", "fusion"], proxy=True)
    recomputed = step_flops(model.config, batch, ["vision", "fusion"], proxy=True, recompute=True)
    assert recomputed["model_flops"] == plain["model_flops"]
    assert recomputed["hardware_flops"] > plain["hardware_flops"]
    # Per tower: transformers' own checkpointing recomputes the decoder only; the towers' extra
    # forwards add up to medift's, which recomputes both.
    extra = {
        tower: step_flops(model.config, batch, ["vision", "fusion"], proxy=True, recompute={tower})["hardware_flops"]
        - plain["hardware_flops"]
        for tower in ("vision", "text")
    }
    assert extra["vision"] > 0 and extra["text"] > 0
    assert extra["vision"] + extra["text"] == pytest.approx(
        recomputed["hardware_flops"] - plain["hardware_flops"], rel=1e-12
    )
    with pytest.raises(ValueError, match="unknown towers"):
        step_flops(model.config, batch, ["vision"], recompute={"projector"})


def test_device_peak(monkeypatch):
    monkeypatch.delenv("MEDIFT_PEAK_FLOPS", raising=False)
    assert device_peak_flops(0.0) is None  # a CPU: no invented peak
    monkeypatch.setenv("MEDIFT_PEAK_FLOPS", "2e12")
    assert device_peak_flops(0.0) == 2e12
    assert device_peak_flops(5e12) == 5e12  # the setting first
    with pytest.raises(ValueError, match="peak_flops"):
        TrainConfig(shards="s", base_model="m", out_dir="o", peak_flops=-1)


@pytest.mark.slow
def test_training_summary_reports_throughput_and_mfu(mllama, tiny_wbcatt_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDIFT_PEAK_FLOPS", raising=False)
    config = TrainConfig(
        shards=str(tiny_wbcatt_shards),
        base_model=str(mllama),
        out_dir=str(tmp_path / "out"),
        proxy_tokens=K,
        train_modules="vision,fusion",
        warmup_epochs=1,
        epochs=1,
        batch_size=2,
        gradient_checkpointing=True,
        validate=False,
        peak_flops=1e12,
        tensorboard_dir=str(tmp_path / "tb"),
    )
    summary = json.loads(json.dumps(train(config)))
    assert summary["main_samples_per_second"] > 0 and summary["main_image_tokens_per_second"] > 0
    assert summary["main_tokens_per_second"] > 0
    assert 0 < summary["mfu"] < summary["hfu"]  # padded tiles and recompute are hardware work only
    assert summary["peak_memory_bytes"] is None  # CPU
    assert summary["peak_flops"] == 1e12
