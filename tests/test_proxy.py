"""The proxy instruction on tiny real checkpoints (LLaVA and Mllama, saved and loaded like a user's),
with inputs made by each family's own processor (medift.chat.model_inputs)."""

import pytest
import torch
from PIL import Image

from medift.chat import encode_conversation, model_inputs
from medift.model.loading import load_base_model, select_trainable
from medift.proxy import ProxyInstruction
from medift.testing.tiny_checkpoints import build_tiny_checkpoint

BUILDERS = ("llava", "mllama")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    return {family: build_tiny_checkpoint(family, root / family, seed=0) for family in BUILDERS}


def training_batch(processor, k: int) -> dict:
    """Two training rows as train.py makes them: image, k proxy placeholders, a description."""
    user = processor.tokenizer.proxy_token * k
    rows = [
        encode_conversation(processor, [user], [text], with_image=True) for text in ("a round cell", "a big red cell")
    ]
    images = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (40, 24), (20, 90, 200))]
    return model_inputs(processor, rows, images, padding_side="right")


@pytest.fixture
def make(checkpoints):
    def build(arch: str, k: int = 3):
        model, processor = load_base_model(str(checkpoints[arch]))
        hidden = model.get_input_embeddings().weight.shape[1]
        proxy = ProxyInstruction(k, hidden, processor.tokenizer.proxy_token_id, torch.Generator().manual_seed(0))
        return model, proxy, training_batch(processor, k)

    return build


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_placeholder_embeddings_are_replaced_by_the_proxy(arch, make):
    model, proxy, batch = make(arch)
    embed = model.get_input_embeddings()
    plain = embed(batch["input_ids"]).detach()
    proxy.attach(model)
    replaced = embed(batch["input_ids"]).detach()
    mask = batch["input_ids"] == proxy.placeholder_id
    for row in range(batch["input_ids"].shape[0]):
        assert torch.equal(replaced[row][mask[row]], proxy.weight.detach())
    assert torch.equal(replaced[~mask], plain[~mask])
    assert not torch.equal(replaced[mask], plain[mask])


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_proxy_gets_gradient_through_the_whole_model(arch, make):
    model, proxy, batch = make(arch)
    select_trainable(model, ["vision", "projector"])
    proxy.attach(model)
    model(**batch).loss.backward()
    assert proxy.weight.grad is not None and proxy.weight.grad.abs().sum() > 0
    frozen = [p for n, p in model.named_parameters() if "language_model" in n and "cross_attn" not in n]
    assert frozen and all(p.grad is None for p in frozen)


def test_momentum_copy_moves_by_exactly_one_minus_m_of_the_step(make):
    model, proxy, batch = make("llava")
    proxy.attach(model)
    m = 0.9
    with torch.no_grad():
        proxy.momentum_copy.add_(0.05)  # P_bar != P, so the reset in step 1 is observable
    optimizer = torch.optim.AdamW([proxy.weight], lr=1e-2)
    p_bar_before = proxy.momentum_copy.clone()
    proxy.load_momentum_copy()
    assert torch.equal(proxy.weight.detach(), p_bar_before)
    model(**batch).loss.backward()
    optimizer.step()
    step = proxy.weight.detach() - p_bar_before
    assert step.abs().max() > 0
    proxy.update_momentum_copy(m)
    torch.testing.assert_close(proxy.momentum_copy - p_bar_before, (1 - m) * step, rtol=0, atol=1e-7)


def test_proxy_is_absent_at_evaluation(make):
    model, proxy, batch = make("llava")
    with torch.no_grad():
        before = model(**batch).logits
    proxy.attach(model)
    with torch.no_grad():
        with_proxy = model(**batch).logits
    proxy.detach()
    with torch.no_grad():
        after = model(**batch).logits
    assert not torch.allclose(before, with_proxy)
    assert torch.equal(before, after)
    assert not any("proxy" in name for name in model.state_dict())


def test_wrong_number_of_placeholders_is_an_error(make):
    model, proxy, batch = make("llava", k=3)
    proxy.attach(model)
    first = (batch["input_ids"][0] == proxy.placeholder_id).nonzero()[0, 0]
    batch["input_ids"][0, first] = batch["input_ids"][0, first - 1]  # row 0 now has 2 placeholders
    with pytest.raises(ValueError, match="exactly 3 proxy placeholders"):
        model(**batch)


def test_attaching_twice_is_an_error(make):
    model, proxy, _ = make("llava")
    proxy.attach(model)
    with pytest.raises(RuntimeError):
        proxy.attach(model)


def test_unknown_or_empty_module_group_is_an_error(make):
    with pytest.raises(ValueError, match="unknown"):
        select_trainable(make("llava")[0], ["decoder"])
    with pytest.raises(
        ValueError,
        match=(
            "matches no parameter of LlavaForConditionalGeneration .*top-level modules: lm_head, "
            "model.language_model, model.multi_modal_projector, model.vision_tower"
        ),
    ):
        select_trainable(make("llava")[0], ["fusion"])


def test_paper_default_trains_vision_and_projector_only(make):
    model, _, _ = make("llava")
    counts = select_trainable(model, ["vision", "projector"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("vision_tower" in n or "multi_modal_projector" in n for n in trained)
    assert 0 < counts["trainable"] < counts["total"]


def test_mllama_fusion_group_is_the_cross_attention_and_projector(make):
    model, _, _ = make("mllama")
    select_trainable(model, ["fusion"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("cross_attn" in n for n in trained) and any("multi_modal_projector" in n for n in trained)
    assert not any("self_attn" in n for n in trained)


def test_lora_adds_trainable_adapters_to_the_language_model_only(make):
    model, _, _ = make("llava")
    select_trainable(model, ["lora"])
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "language_model" in n for n in trained)


def test_lora_merges_back_into_a_plain_checkpoint(make):
    from medift.model.loading import merge_lora

    model, _, batch = make("llava")
    plain_keys = set(model.state_dict())
    select_trainable(model, ["lora"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # make the adapters do something
    with torch.no_grad():
        adapted = model(**batch).logits
    assert merge_lora(model) > 0
    assert set(model.state_dict()) == plain_keys
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-4, atol=1e-4)
