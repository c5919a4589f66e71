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
from medift.model.loading import LORA_GROUPS, load_base_model, merge_lora, parse_groups, save_lora_adapter, unwrap_lora, select_trainable
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
    batch_size: int = field(default=2, metadata={"help": "Micro-batch size (per rank and accumulation step)."})
    gradient_accumulation: int = field(default=1, metadata={"help": "Micro-batches per optimizer step on each rank; global batch = batch_size x gradient_accumulation x ranks (ranks: the launcher's, e.g. torchrun --nproc_per_node)."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip of the model's parameters (not the proxy's)."})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage (0-3); partitions optimizer state (2) and parameters (3) over the ranks."})
    offload: str = field(default="none", metadata={"help": "none, optimizer (ZeRO 2/3: optimizer state in CPU memory) or optimizer+parameters (ZeRO-3)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 training (GPU); CPU runs in fp32."})
    repeat_train: int = field(default=1, metadata={"help": "Times the training list is repeated per epoch (reference: 3 for CBIS-DDSM/SKINCON)."})
    seed: int = field(default=1, metadata={"help": "Seeds order, shuffling, proxy init."})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (the rule's `threads`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint (off: only transformers' own classes)."})

    def __post_init__(self):
        # Incompatible settings fail here, before any model is loaded.
        groups = parse_groups(self.train_modules)
        ds_engine.zero_settings(self.zero_stage, self.offload)  # an impossible offload fails here
        if self.gradient_accumulation < 1 or self.batch_size < 1:
            raise ValueError("batch_size and gradient_accumulation must be at least 1")
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


def global_batches(n: int, config: TrainConfig, epoch: int) -> list[list[int]]:
    """One epoch's global batches (batch_size x gradient_accumulation x ranks samples each).

    They depend on the global batch size and the seed only, so the same seed gives the
    same global batches whatever the rank count. A last batch too small to give every
    rank's every micro-step a sample joins the batch before it (nothing is dropped).
    """
    parts = config.gradient_accumulation * ds_engine.world_size()
    batches = epoch_batches(n, config.batch_size * parts, config.repeat_train, config.seed, epoch)
    if len(batches) > 1 and len(batches[-1]) < parts:
        tail = batches.pop()
        batches[-1] = batches[-1] + tail
    if len(batches[-1]) < parts:
        raise ValueError(f"{n} training samples cannot fill {parts} micro-batches (ranks x gradient_accumulation)")
    return batches


def count_loads(indices: list[int], load_counts: dict[int, int]) -> list[int]:
    """Each sample's load count at this occurrence, counted over the whole global batch on every
    rank, so a sample's shuffled description is the same whichever rank loads it."""
    counts = []
    for i in indices:
        load_counts[i] = load_counts.get(i, 0) + 1
        counts.append(load_counts[i])
    return counts


def my_micro_batches(indices: list[int], counts: list[int], config: TrainConfig) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of a global batch: it is cut into ranks x accumulation
    consecutive parts as equal as possible; rank r takes parts r*A ... r*A + A - 1."""
    parts = config.gradient_accumulation * ds_engine.world_size()
    pairs = list(zip(indices, counts))
    size, extra = divmod(len(pairs), parts)
    bounds = [k * size + min(k, extra) for k in range(parts + 1)]
    chunks = [pairs[bounds[k] : bounds[k + 1]] for k in range(parts)]
    first = ds_engine.rank() * config.gradient_accumulation
    return chunks[first : first + config.gradient_accumulation]


def make_batch(samples: DescriptionSamples, pairs: list[tuple[int, int]], processor) -> dict:
    encoded, images = [], []
    for index, load_count in pairs:
        e, image = samples.load(index, load_count)
        encoded.append(e)
        images.append(image)
    return model_inputs(processor, encoded, images, padding_side="right")


def on_device(batch: dict, device, dtype) -> dict:
    """Pixels in the training dtype (bf16 engines hold bf16 weights); ids and masks as they are."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def mean_step_loss(losses: list[torch.Tensor]) -> float:
    """The step's loss: the mean over this rank's micro-batches, averaged over the ranks."""
    total = torch.stack([loss.detach().float() for loss in losses]).mean()
    return round(ds_engine.average_across_ranks(total).item(), 5)


def user_text_for(config: TrainConfig, processor) -> str:
    if not config.proxy:
        return CAPTION_INSTRUCTION
    return processor.tokenizer.proxy_token * config.proxy_tokens


def run_warmup(model, proxy, samples, processor, config, load_counts, history) -> None:
    """Stage 1: the model is frozen; only the proxy learns (on the training device, bf16 autocast
    if configured). Every rank holds the whole model; the proxy's gradient is averaged."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    device = ds_engine.training_device()
    model.to(device)
    optimizer = torch.optim.AdamW([proxy.weight], lr=config.lr, weight_decay=0.0)
    model.train()
    for epoch in range(config.warmup_epochs):
        batches = global_batches(len(samples), config, -1 - epoch)
        for indices in tqdm(batches, desc=f"warm-up epoch {epoch + 1}", mininterval=5, disable=ds_engine.rank() > 0):
            counts = count_loads(indices, load_counts)
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for pairs in my_micro_batches(indices, counts, config):
                batch = on_device(make_batch(samples, pairs, processor), device, torch.float32)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = model(**batch).loss
                (loss / config.gradient_accumulation).backward()
                losses.append(loss)
            ds_engine.average_across_ranks(proxy.weight.grad)
            optimizer.step()
            history.append({"stage": "warmup", "epoch": epoch, "loss": mean_step_loss(losses)})
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])


def run_main(engine, proxy, samples, processor, config, load_counts, history) -> None:
    """Stage 2: model (through DeepSpeed) and proxy learn; the proxy follows its momentum copy.

    DeepSpeed scales each micro-batch's loss by 1/accumulation, averages the model's
    gradients over the ranks and steps at the accumulation boundary; the proxy, replicated
    on every rank, gets the same: its accumulated gradient averaged over the ranks, one step.
    """
    optimizer = None
    if proxy is not None:
        # Same AdamW and lr as the model, but its own optimizer: the proxy must not be
        # partitioned by ZeRO (it is overwritten by P_bar before every step) and the
        # reference clips the model's gradients only.
        optimizer = torch.optim.AdamW([proxy.weight], lr=config.lr, weight_decay=0.0)
    engine.train()
    dtype = next(engine.module.parameters()).dtype
    for epoch in range(config.epochs):
        batches = global_batches(len(samples), config, epoch)
        for indices in tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", mininterval=5, disable=ds_engine.rank() > 0):
            counts = count_loads(indices, load_counts)
            if proxy is not None and config.momentum > 0:
                proxy.load_momentum_copy()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            losses = []
            for pairs in my_micro_batches(indices, counts, config):
                loss = engine(**on_device(make_batch(samples, pairs, processor), engine.device, dtype)).loss
                engine.backward(loss)
                engine.step()  # DeepSpeed steps only at the accumulation boundary
                losses.append(loss)
            if optimizer is not None:
                ds_engine.average_across_ranks(proxy.weight.grad)
                optimizer.step()
                if config.momentum > 0:
                    proxy.update_momentum_copy(config.momentum)
            history.append({"stage": "main", "epoch": epoch, "loss": mean_step_loss(losses)})


def train(config: TrainConfig) -> dict:
    set_torch_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.time()
    ds_engine.init_distributed()  # before the warm-up, which runs on every rank too
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
        proxy.to(ds_engine.training_device())
    history: list[dict] = []
    load_counts: dict[int, int] = {}
    if proxy is not None and config.warmup_epochs > 0:
        run_warmup(model, proxy, samples, processor, config, load_counts, history)
        proxy.reset_momentum_copy()
    ds_config = ds_engine.deepspeed_config(config.batch_size, config.zero_stage, config.grad_clip, config.bf16, config.gradient_accumulation, config.offload)
    engine = ds_engine.initialize(model, ds_config, config.lr)
    run_main(engine, proxy, samples, processor, config, load_counts, history)
    if proxy is not None:
        proxy.detach()  # the tuned model is evaluated without it
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(g in LORA_GROUPS for g in trainable["groups"]):
        if config.lora_save == "adapter":
            save_lora_adapter(engine.module, out_dir)
            unwrap_lora(engine.module, merge=False)  # the model beside the adapter is its base: fully trained groups, no adapters
        else:
            merge_lora(engine.module)
    if config.gradient_checkpointing:
        engine.module.activation_checkpointing_disable()
    ds_engine.save_hf(engine, processor, out_dir, config.zero_stage)
    summary = {
        "config": asdict(config),
        "ranks": ds_engine.world_size(),
        "global_batch": config.batch_size * config.gradient_accumulation * ds_engine.world_size(),
        "trainable_parameters": trainable,
        "train_images": len(samples),
        "steps": len(history),
        "seconds": round(time.time() - started, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }
    if proxy is not None:
        # Replicated, so identical on every rank; measured, not assumed.
        summary["proxy_max_difference_across_ranks"] = max(
            ds_engine.max_difference_across_ranks(proxy.weight.detach()), ds_engine.max_difference_across_ranks(proxy.momentum_copy)
        )
    if ds_engine.rank() > 0:
        return summary
    if proxy is not None:
        from safetensors.torch import save_file

        save_file({"proxy": proxy.weight.detach().contiguous(), "momentum_copy": proxy.momentum_copy.contiguous()}, str(out_dir / "proxy.safetensors"))
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    import sys

    from transformers import HfArgumentParser

    import os

    # Rank 0 logs (and shows progress) for the job; the other ranks only warn.
    level = logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(argv if argv is not None else sys.argv[1:])
    summary = train(config)
    log.info("trained %d steps in %.1fs, final loss %s", summary["steps"], summary["seconds"], summary["final_loss"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
