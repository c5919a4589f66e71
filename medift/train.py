"""Fine-tuning on image + description pairs: caption fine-tuning and instruction-free tuning.

`python -m medift.train --help` lists every option. One method = one `TrainConfig`;
the methods of the benchmark (caption_ft, ift and its ablations) differ only in it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medift.runtime import set_torch_threads
from medift.chat import CAPTION_INSTRUCTION, Encoded, encode_conversation, model_inputs
from medift.images import decode_image
from medift.model.loading import LORA_GROUPS, load_base_model, merge_lora, parse_groups, remove_lora, save_lora_adapter, select_trainable
from medift.proxy import ProxyInstruction
from medift.shards import load_descriptions
from medift import engine as ds_engine

log = logging.getLogger(__name__)

@dataclass
class TrainConfig:
    shards: str = field(metadata={"help": "Shard directory of one dataset (reads descriptions-train-*)."})
    base_model: str = field(metadata={"help": "Local Hugging Face checkpoint directory of the base model."})
    out_dir: str = field(metadata={"help": "Where the tuned model is saved (HF layout)."})
    proxy: bool = field(default=True, metadata={"help": "Use the learnable proxy instruction (IFT); off = fixed caption instruction."})
    proxy_tokens: int = field(default=8, metadata={"help": "K, the number of proxy embeddings."})
    momentum: float = field(default=0.999, metadata={"help": "m of the proxy's momentum copy; 0 = no momentum copy (plain proxy training)."})
    warmup_epochs: int = field(default=1, metadata={"help": "Stage-1 epochs that train the proxy alone (0 = no warm-up)."})
    epochs: int = field(default=5, metadata={"help": "Stage-2 epochs."})
    shuffle_responses: bool = field(default=True, metadata={"help": "Shuffle the description's comma-separated phrases at every load."})
    train_modules: str = field(default="vision,projector", metadata={"help": "Comma-separated groups: vision, projector, fusion (Mllama's cross-attention layers), language_model, lora (adapters on the language model), lora_vision (adapters on the vision tower). medift/model/families.py names each family's modules."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank when `lora` or `lora_vision` is trained."})
    lora_save: str = field(default="merged", metadata={"help": "merged: adapters folded into the saved weights (a plain checkpoint); adapter: saved as a peft adapter in lora_adapter/ beside the model (PeftModel.from_pretrained loads it)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in the backward pass (non-reentrant, so frozen towers need no input gradients)."})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate (constant), model and proxy."})
    batch_size: int = field(default=2, metadata={"help": "Micro-batch size."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip of the model's parameters (not the proxy's)."})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage (0-3)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 training (GPU); CPU runs in fp32."})
    repeat_train: int = field(default=1, metadata={"help": "Times the training list is repeated per epoch (reference: 3 for CBIS-DDSM/SKINCON)."})
    seed: int = field(default=1, metadata={"help": "Seeds order, shuffling, proxy init."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (the rule's `threads`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint (off: only transformers' own classes)."})

    def __post_init__(self):
        # Incompatible settings fail here, before any model is loaded.
        groups = parse_groups(self.train_modules)
        if self.lora_save not in LORA_SAVE_MODES:
            raise ValueError(f"lora_save must be one of {LORA_SAVE_MODES}, got {self.lora_save!r}")
        if any(g in LORA_GROUPS for g in groups) and self.zero_stage == 3:
            raise ValueError("LoRA with ZeRO-3 is not supported (adapters cannot be merged or saved from partitioned weights); use zero_stage 2")


LORA_SAVE_MODES = ("merged", "adapter")


class DescriptionSamples:
    """Training samples read from shards; the description is re-shuffled at every load."""

    def __init__(self, shard_dir: str, processor, user_text: str, shuffle: bool, seed: int):
        frame = load_descriptions(Path(shard_dir), "train")
        if frame.empty:
            raise ValueError(f"{shard_dir}: no training descriptions")
        self.images = list(frame["image"])
        self.descriptions = list(frame["description"])
        self.processor, self.user_text, self.shuffle, self.seed = processor, user_text, shuffle, seed

    def __len__(self) -> int:
        return len(self.descriptions)

    def response(self, index: int, load_count: int) -> str:
        text = self.descriptions[index]
        if not self.shuffle:
            return text
        phrases = [p.strip() for p in text.split(",") if p.strip()]
        # Seeded by (seed, sample, load) so a rerun shuffles identically, whatever the batch order.
        random.Random(f"{self.seed}:{index}:{load_count}").shuffle(phrases)
        return ", ".join(phrases)

    def load(self, index: int, load_count: int) -> tuple[Encoded, object]:
        encoded = encode_conversation(self.processor, [self.user_text], [self.response(index, load_count)], with_image=True)
        return encoded, decode_image(self.images[index])


def epoch_batches(n: int, batch_size: int, repeat: int, seed: int, epoch: int) -> list[list[int]]:
    order = [i for _ in range(repeat) for i in range(n)]
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def make_batch(samples: DescriptionSamples, indices: list[int], load_counts: dict[int, int], processor) -> dict:
    encoded, images = [], []
    for i in indices:
        load_counts[i] = load_counts.get(i, 0) + 1
        e, image = samples.load(i, load_counts[i])
        encoded.append(e)
        images.append(image)
    return model_inputs(processor, encoded, images, padding_side="right")


def user_text_for(config: TrainConfig, processor) -> str:
    if not config.proxy:
        return CAPTION_INSTRUCTION
    return processor.tokenizer.proxy_token * config.proxy_tokens


def run_warmup(model, proxy, samples, processor, config, load_counts, history) -> None:
    """Stage 1: the model is frozen; only the proxy learns (on the training device, bf16 autocast if configured)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    device = ds_engine.training_device()
    model.to(device)
    proxy.to(device)
    optimizer = torch.optim.AdamW([proxy.weight], lr=config.lr, weight_decay=0.0)
    model.train()
    for epoch in range(config.warmup_epochs):
        batches = epoch_batches(len(samples), config.batch_size, config.repeat_train, config.seed, -1 - epoch)
        for indices in tqdm(batches, desc=f"warm-up epoch {epoch + 1}", mininterval=5):
            batch = {k: v.to(device) for k, v in make_batch(samples, indices, load_counts, processor).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append({"stage": "warmup", "epoch": epoch, "loss": round(loss.item(), 5)})
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])


def run_main(engine, proxy, samples, processor, config, load_counts, history) -> None:
    """Stage 2: model (through DeepSpeed) and proxy learn; the proxy follows its momentum copy."""
    optimizer = None
    if proxy is not None:
        # Same AdamW and lr as the model, but its own optimizer: the proxy must not be
        # partitioned by ZeRO (it is overwritten by P_bar before every step) and the
        # reference clips the model's gradients only.
        optimizer = torch.optim.AdamW([proxy.weight], lr=config.lr, weight_decay=0.0)
    engine.train()
    for epoch in range(config.epochs):
        batches = epoch_batches(len(samples), config.batch_size, config.repeat_train, config.seed, epoch)
        for indices in tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", mininterval=5):
            if proxy is not None and config.momentum > 0:
                proxy.load_momentum_copy()
            batch = make_batch(samples, indices, load_counts, processor)
            # Pixels in the engine's dtype (bf16 engines hold bf16 weights); ids and masks as they are.
            dtype = next(engine.module.parameters()).dtype
            batch = {k: v.to(engine.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}
            loss = engine(**batch).loss
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            engine.backward(loss)
            engine.step()
            if optimizer is not None:
                optimizer.step()
                if config.momentum > 0:
                    proxy.update_momentum_copy(config.momentum)
            history.append({"stage": "main", "epoch": epoch, "loss": round(loss.item(), 5)})


def train(config: TrainConfig) -> dict:
    set_torch_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.time()
    model, processor = load_base_model(config.base_model, trust_remote_code=config.trust_remote_code)
    trainable = select_trainable(model, config.train_modules, lora_rank=config.lora_rank)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing back-propagates into frozen towers without needing their inputs to require grad.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    log.info("trainable parameters per group: %s (%d of %d)", trainable["per_group"], trainable["trainable"], trainable["total"])
    samples = DescriptionSamples(config.shards, processor, user_text_for(config, processor), config.shuffle_responses, config.seed)
    proxy = None
    if config.proxy:
        hidden = model.get_input_embeddings().weight.shape[1]
        generator = torch.Generator().manual_seed(config.seed)
        proxy = ProxyInstruction(config.proxy_tokens, hidden, processor.tokenizer.proxy_token_id, generator).attach(model)
    history: list[dict] = []
    load_counts: dict[int, int] = {}
    if proxy is not None and config.warmup_epochs > 0:
        run_warmup(model, proxy, samples, processor, config, load_counts, history)
        proxy.reset_momentum_copy()
    ds_config = ds_engine.deepspeed_config(config.batch_size, config.zero_stage, config.grad_clip, config.bf16)
    engine = ds_engine.initialize(model, ds_config, config.lr)
    run_main(engine, proxy, samples, processor, config, load_counts, history)
    if proxy is not None:
        proxy.detach()  # the tuned model is evaluated without it
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(g in LORA_GROUPS for g in trainable["groups"]):
        if config.lora_save == "adapter":
            save_lora_adapter(engine.module, out_dir)
            remove_lora(engine.module)  # the model beside the adapter is its base: fully trained groups, no adapters
        else:
            merge_lora(engine.module)
    if config.gradient_checkpointing:
        engine.module.activation_checkpointing_disable()
    ds_engine.save_hf(engine, processor, out_dir, config.zero_stage)
    summary = {
        "config": asdict(config),
        "trainable_parameters": trainable,
        "train_images": len(samples),
        "steps": len(history),
        "seconds": round(time.time() - started, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }
    if proxy is not None:
        from safetensors.torch import save_file

        save_file({"proxy": proxy.weight.detach().contiguous(), "momentum_copy": proxy.momentum_copy.contiguous()}, str(out_dir / "proxy.safetensors"))
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    import sys

    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(argv if argv is not None else sys.argv[1:])
    summary = train(config)
    log.info("trained %d steps in %.1fs, final loss %s", summary["steps"], summary["seconds"], summary["final_loss"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
