"""Fine-tuning on image + description pairs: caption fine-tuning and instruction-free tuning.

`python -m medift.train --help` lists every option. One method = one `TrainConfig`;
the methods of the benchmark (caption_ft, ift and its ablations) differ only in it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from medift import engine as ds_engine
from medift import flops
from medift.batching import resolve_accumulation
from medift.chat import CAPTION_INSTRUCTION, Encoded, encode_conversation, model_inputs
from medift.checkpoints import Checkpoints
from medift.evaluate import QUESTION_COLUMNS, score_questions, scoring_settings
from medift.images import decode_image
from medift.model.families import family_of
from medift.model.loading import (
    LORA_GROUPS,
    known_groups,
    load_base_model,
    merge_lora,
    parse_groups,
    partitioned_loading,
    save_lora_adapter,
    select_trainable,
    unwrap_lora,
)
from medift.objectives import dpo_loss, keep_flags, sequence_log_probs
from medift.proxy import ProxyInstruction
from medift.runtime import set_torch_threads
from medift.settings import (
    LORA_SAVE_MODES,
    OFFLOAD_MODES,
    SELECT_MODES,
    ZERO_STAGES,
    check_fields,
    check_train_settings,
    proxy_learning_rate,
)
from medift.shards import (
    CONVERSATIONS,
    DESCRIPTIONS,
    PREFERENCES,
    QUESTIONS,
    ShardRows,
    generated_kind,
    verify_split,
)

log = logging.getLogger(__name__)

# train_modules: comma-separated group names (medift.model.loading.known_groups).
_GROUP = "|".join(known_groups())
GROUPS_PATTERN = f"^({_GROUP})(,({_GROUP}))*$"


@dataclass
class TrainConfig:
    """One training run. Each field's default, help and limits are the only ones: the workflow's
    schema and config/README.md are generated from them (medift/settings.py)."""

    shards: str = field(metadata={"help": "Shard directory of one dataset (reads descriptions-train-*)."})
    base_model: str = field(metadata={"help": "Local Hugging Face checkpoint directory of the base model."})
    out_dir: str = field(metadata={"help": "Where the tuned model is saved (HF layout)."})
    proxy: bool = field(
        default=True,
        metadata={
            "help": "Learnable proxy instruction (IFT); false = fixed caption instruction (caption fine-tuning)."
        },
    )
    proxy_tokens: int = field(default=8, metadata={"help": "K, the number of proxy embeddings."})
    momentum: float = field(
        default=0.999, metadata={"help": "m of the proxy's momentum copy; 0 = no momentum copy (plain proxy training)."}
    )
    warmup_epochs: int = field(
        default=1, metadata={"help": "Stage-1 epochs that train the proxy alone (0 = no warm-up)."}
    )
    epochs: int = field(default=5, metadata={"help": "Stage-2 epochs (model and proxy)."})
    shuffle_responses: bool = field(
        default=True, metadata={"help": "Shuffle the description's comma-separated phrases at every load."}
    )
    train_modules: str = field(
        default="vision,fusion",
        metadata={
            "help": (
                "Comma-separated trainable groups: vision, projector, fusion (Mllama's cross-attention "
                "layers, with the "
                "projector), language_model, lora (adapters on the language model's attention), lora_vision (on the "
                "vision tower's). medift/model/families.py names each family's modules; a group that matches "
                "nothing in "
                "the model is an error. The default is the paper's for Mllama (the embedded model's family); families "
                "without fusion layers (LLaVA-style) take vision,projector."
            )
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank when `lora` or `lora_vision` is trained."})
    lora_save: str = field(
        default="merged",
        metadata={
            "help": (
                "merged: adapters folded into the saved weights (a plain checkpoint); adapter: saved as a "
                "peft adapter in "
                "lora_adapter/ beside the model (fully trained groups in the model), which PeftModel.from_pretrained "
                "loads and evaluation merges."
            )
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": (
                "Recompute activations in the backward pass (non-reentrant, so it works with a frozen vision tower or "
                "decoder); config/paper.yaml turns it on."
            )
        },
    )
    lr: float = field(
        default=3e-5,
        metadata={
            "help": (
                "AdamW learning rate (constant) of the model, and of the proxy unless proxy_lr is set. The default was "
                "chosen with proxy_lr on the validation split for the embedded model (docs/recipe-search.md); "
                "the paper's "
                "is 2e-5. In YAML write floats with a dot (1.0e-3): 1e-3 reads as a string."
            )
        },
    )
    proxy_lr: Optional[float] = field(
        default=3e-3,
        metadata={
            "help": (
                "AdamW learning rate (constant) of the proxy in both stages; null (unset) = lr, as in the paper "
                "(config/paper.yaml). Each warm-up step moves a proxy coordinate by at most this much, so a "
                "run with far "
                "fewer steps than the reference's needs a larger one for the warm-up to move the proxy at all "
                "(docs/recipe-search.md)."
            )
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Micro-batch size (per rank and accumulation step)."})
    gradient_accumulation: int = field(
        default=1,
        metadata={
            "help": (
                "Micro-batches per optimizer step on each rank; global batch = batch_size x "
                "gradient_accumulation x ranks "
                "(the launcher's WORLD_SIZE: the workflow's ranks x nodes). Derived when global_batch is set "
                "(leave it 1 "
                "then; another value that disagrees is refused)."
            )
        },
    )
    global_batch: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Samples per optimizer step over every rank, the setting that keeps a run comparable from 1 GPU to 8. "
                "Set, the accumulation is derived: global_batch / (batch_size x ranks) must be a whole number "
                ">= 1, else "
                "an error before any training (medift/batching.py; the workflow checks it before any job). "
                "null (unset): "
                "batch_size x gradient_accumulation x ranks. config/paper.yaml: 2, the reference's."
            )
        },
    )
    grad_clip: float = field(
        default=1.0, metadata={"help": "Gradient-norm clip of the model's parameters (not the proxy's)."}
    )
    zero_stage: int = field(
        default=2,
        metadata={
            "help": (
                "DeepSpeed ZeRO stage: 2 partitions the optimizer state over the ranks, 3 the parameters too (gathered "
                "again when the model is saved). LoRA with ZeRO-3 is refused."
            )
        },
    )
    offload: str = field(
        default="none",
        metadata={
            "help": (
                "ZeRO offload to CPU memory: none, optimizer (stage 2 or 3: the optimizer state) or "
                "optimizer+parameters "
                "(stage 3: the parameters too); refused with another stage."
            )
        },
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 training (GPU only); CPU runs in fp32."})
    repeat_train: int = field(
        default=1,
        metadata={"help": "Times the training list is repeated per epoch (reference: 3 for CBIS-DDSM/SKINCON)."},
    )
    seed: int = field(default=1, metadata={"help": "Seeds order, shuffling, proxy init."})
    train_data: str = field(
        default="",
        metadata={
            "help": (
                "Generated training rows instead of the descriptions of --shards (a method's data-making job "
                "writes them): conversation shards train on their answers (inst_ft, vital_select, st_dpo's first "
                "stage), preference shards with DPO (st_dpo). --shards still gives the validation questions."
            )
        },
    )
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (the rule's `threads`)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom model code from the checkpoint (off: only transformers' own classes)."},
    )
    max_steps: int = field(
        default=0,
        metadata={
            "help": (
                "Stop after this many optimizer steps in all, warm-up included (0: every epoch); for "
                "benchmarks and smoke "
                "runs."
            )
        },
    )
    validate: bool = field(
        default=True,
        metadata={
            "help": (
                "After every stage-2 epoch, letter-scoring accuracy on the validation questions (the model without the "
                "proxy, as it is saved), in the log, train_summary.json (validation) and TensorBoard."
            )
        },
    )
    select: str = field(
        default="last",
        metadata={
            "help": (
                "Which epoch's model is saved: last, or best_val (the highest validation accuracy, the "
                "earliest on a tie; "
                "needs validate)."
            )
        },
    )
    val_batch_size: int = field(default=32, metadata={"help": "Questions per forward pass of the validation."})
    checkpoint_dir: str = field(
        default="",
        metadata={
            "help": (
                "Directory of resumable checkpoints (outside the job's outputs; the workflow's: "
                "resources/checkpoints/); "
                "a restarted job resumes from its latest. Empty: no checkpoints (checkpoint_every and "
                "checkpoint_minutes "
                "do nothing)."
            )
        },
    )
    checkpoint_every: int = field(
        default=0,
        metadata={
            "help": (
                "Optimizer steps between checkpoints (warm-up steps count); 0: none. With checkpoint_minutes too, a "
                "checkpoint is written when either is due."
            )
        },
    )
    # 30, not 30.0: the workflow's jobs of configs that leave it out keep their parameters.
    checkpoint_minutes: float = field(
        default=30,
        metadata={
            "help": (
                "Minutes of training between checkpoints, on the slowest rank's clock (every rank decides the "
                "same step); "
                "0: none. The log gives each checkpoint's bytes and seconds (about 37 GB for Llama-3.2-11B-Vision with "
                "vision,fusion): choose it so that writing one is a small share of the interval."
            )
        },
    )
    shuffle_window: int = field(
        default=16,
        metadata={
            "help": (
                "Row groups (64 rows each) whose samples are shuffled together: row groups are shuffled, then "
                "the samples "
                "of each window of this many; the reader caches a window, so each row group is read once per epoch by "
                "each reading process (rank or data worker). A split of at most this many row groups is "
                "shuffled whole. "
                "Memory: about shuffle_window x 64 stored images per reading process. Part of the training "
                "order, so of "
                "the results."
            )
        },
    )
    data_workers: int = field(
        default=0,
        metadata={
            "help": (
                "DataLoader worker processes per rank that read row groups, decode images and run the "
                "processor ahead of "
                "the step (0: in the training process)."
            )
        },
    )
    question_loss: float = field(
        default=0.0,
        metadata={
            "help": (
                "Conversation data only: the probability that a non-first user turn (a question) is kept in the "
                "loss, so the model learns to ask about an image (STLLaVA-Med's first stage: 0.5); the first turn, "
                "with the image, never is."
            )
        },
    )
    dpo_beta: float = field(
        default=0.1,
        metadata={"help": "Preference data only: DPO's beta (the reference's 0.1), the KL penalty's strength."},
    )
    tensorboard_dir: str = field(
        default="",
        metadata={
            "help": (
                "Where TensorBoard event files go (loss, lr, gradient norm, proxy drift, throughput, MFU, peak memory, "
                "validation accuracy). Empty: none."
            )
        },
    )
    peak_flops: float = field(
        default=0.0,
        metadata={
            "help": (
                "Peak FLOP/s of one device that MFU/HFU are measured against; 0: $MEDIFT_PEAK_FLOPS, else the table of "
                "medift/flops.py for the GPU (H100/H200 bf16 989.4e12, A100 312e12); none on CPU (MFU not reported)."
            )
        },
    )

    def __post_init__(self):
        # Incompatible settings fail here, before any model is loaded.
        parse_groups(self.train_modules)  # unknown groups, named
        check_fields(self, TRAIN_LIMITS)
        check_train_settings(asdict(self))
        if self.train_data and self.proxy:
            raise ValueError(
                "train_data (generated instructions or preferences) trains without a proxy: set proxy false"
            )
        if self.question_loss and not self.train_data:
            raise ValueError("question_loss needs conversation data (train_data)")
        # The launcher's world size is known before any process group exists (torchrun sets it).
        self.gradient_accumulation = resolve_accumulation(
            self.global_batch, self.batch_size, self.gradient_accumulation, launcher_world_size()
        )

    @property
    def proxy_learning_rate(self) -> float:
        return proxy_learning_rate(self.lr, self.proxy_lr)


# Each setting's limits (the CLI's check, check_fields, and the schema's, generated).
TRAIN_LIMITS = {
    "proxy_tokens": {"minimum": 1},
    "momentum": {"minimum": 0, "maximum": 1},
    "warmup_epochs": {"minimum": 0},
    "epochs": {"minimum": 1},
    "train_modules": {"pattern": GROUPS_PATTERN},
    "lora_rank": {"minimum": 1},
    "lora_save": {"choices": LORA_SAVE_MODES},
    "lr": {"exclusive_minimum": 0},
    "proxy_lr": {"exclusive_minimum": 0},
    "batch_size": {"minimum": 1},
    "gradient_accumulation": {"minimum": 1},
    "global_batch": {"minimum": 1},
    "grad_clip": {"minimum": 0},
    "zero_stage": {"choices": ZERO_STAGES},
    "offload": {"choices": OFFLOAD_MODES},
    "repeat_train": {"minimum": 1},
    "threads": {"minimum": 1},
    "max_steps": {"minimum": 0},
    "select": {"choices": SELECT_MODES},
    "val_batch_size": {"minimum": 1},
    "checkpoint_every": {"minimum": 0},
    "checkpoint_minutes": {"minimum": 0},
    "shuffle_window": {"minimum": 1},
    "data_workers": {"minimum": 0},
    "peak_flops": {"minimum": 0},
    "question_loss": {"minimum": 0, "maximum": 1},
    "dpo_beta": {"exclusive_minimum": 0},
}


def launcher_world_size() -> int:
    """Ranks of the job as its launcher started them (torchrun's WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# Settings that change nothing a checkpoint holds: a job may resume under other values of them.
NOT_IN_FINGERPRINT = (
    "threads",
    "checkpoint_dir",
    "checkpoint_every",
    "checkpoint_minutes",
    "data_workers",
    "tensorboard_dir",
    "peak_flops",
)


class DescriptionSamples(torch.utils.data.Dataset):
    """Training samples read from shards row group by row group; the description is re-shuffled at every load.

    Item (index, load_count) -> (encoded conversation, image); load_count seeds the shuffle,
    so a sample's description depends on how often it was loaded, not on which process or
    DataLoader worker loads it.
    """

    def __init__(
        self, shard_dir: str, processor, user_text: str, shuffle: bool, seed: int, window: int, verify: bool = True
    ):
        # A window of row groups stays decoded: the epoch's order reads each group once (epoch_batches).
        self.rows = ShardRows(
            Path(shard_dir), DESCRIPTIONS, "train", ("image", "description"), cached_groups=window, verify=verify
        )
        if len(self.rows) == 0:
            raise ValueError(f"{shard_dir}: no training descriptions")
        self.processor, self.user_text, self.shuffle, self.seed = processor, user_text, shuffle, seed

    def __len__(self) -> int:
        return len(self.rows)

    def response(self, description: str, index: int, load_count: int) -> str:
        if not self.shuffle:
            return description
        phrases = [p.strip() for p in description.split(",") if p.strip()]
        # Seeded by (seed, sample, load) so a rerun shuffles identically, whatever the batch order.
        random.Random(f"{self.seed}:{index}:{load_count}").shuffle(phrases)
        return ", ".join(phrases)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Encoded, object]:
        index, load_count = key
        row = self.rows.row(index)
        response = self.response(row["description"], index, load_count)
        encoded = encode_conversation(self.processor, [self.user_text], [response], with_image=True)
        return encoded, decode_image(row["image"])


def collate_samples(processor, items: list[tuple[Encoded, object]]) -> dict:
    """A micro-batch through the family's processor (the one model-input builder)."""
    return model_inputs(processor, [e for e, _ in items], [image for _, image in items], padding_side="right")


DescriptionSamples.collate = staticmethod(collate_samples)


class ConversationSamples(torch.utils.data.Dataset):
    """Generated conversations (train_data of kind conversations): the loss is on every answer, and
    with `question_loss` p also on each non-first question with probability p, drawn per (seed,
    sample, load) like the descriptions' shuffle (STLLaVA-Med's first stage)."""

    collate = staticmethod(collate_samples)

    def __init__(self, data_dir: str, processor, question_loss: float, seed: int, window: int, verify: bool = True):
        self.rows = ShardRows(
            Path(data_dir), CONVERSATIONS, "train", ("image", "turns"), cached_groups=window, verify=verify
        )
        if len(self.rows) == 0:
            raise ValueError(f"{data_dir}: no generated conversations")
        self.processor, self.question_loss, self.seed = processor, question_loss, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Encoded, object]:
        index, load_count = key
        row = self.rows.row(index)
        turns = json.loads(row["turns"])
        questions, answers = [q for q, _ in turns], [a for _, a in turns]
        keep = None
        if self.question_loss > 0:
            keep = keep_flags(len(turns), f"{self.seed}:{index}:{load_count}", self.question_loss)
        encoded = encode_conversation(self.processor, questions, answers, True, learn_questions=keep)
        return encoded, decode_image(row["image"])


class PreferenceSamples(torch.utils.data.Dataset):
    """Preference pairs (train_data of kind preferences): a question on an image with a chosen and
    a rejected answer and the reference model's log-probabilities of each (DPO)."""

    def __init__(self, data_dir: str, processor, window: int, verify: bool = True):
        columns = ("image", "question", "chosen", "rejected", "reference_chosen", "reference_rejected")
        self.rows = ShardRows(Path(data_dir), PREFERENCES, "train", columns, cached_groups=window, verify=verify)
        if len(self.rows) == 0:
            raise ValueError(f"{data_dir}: no preference pairs")
        self.processor = processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]):
        row = self.rows.row(key[0])
        chosen = encode_conversation(self.processor, [row["question"]], [row["chosen"]], with_image=True)
        rejected = encode_conversation(self.processor, [row["question"]], [row["rejected"]], with_image=True)
        return chosen, rejected, decode_image(row["image"]), row["reference_chosen"], row["reference_rejected"]

    @staticmethod
    def collate(processor, items: list) -> dict:
        """The chosen rows, then the rejected rows, in one batch through the model-input builder;
        the reference's log-probabilities beside them (float64: never cast to the model's dtype)."""
        rows = [chosen for chosen, *_ in items] + [rejected for _, rejected, *_ in items]
        images = [image for _, _, image, _, _ in items] * 2
        batch = model_inputs(processor, rows, images, padding_side="right")
        batch[REFERENCE_KEY] = torch.tensor([c for *_, c, _ in items] + [r for *_, r in items], dtype=torch.float64)
        return batch


REFERENCE_KEY = "reference_log_probs"


def training_samples(config: TrainConfig, processor):
    """The job's samples: the descriptions of --shards, or the generated rows of --train_data.
    (Verified above, once, on rank 0; the readers still check their files' row counts.)"""
    if not config.train_data:
        return DescriptionSamples(
            config.shards,
            processor,
            user_text_for(config, processor),
            config.shuffle_responses,
            config.seed,
            config.shuffle_window,
            verify=False,
        )
    if generated_kind(config.train_data) == CONVERSATIONS:
        return ConversationSamples(
            config.train_data, processor, config.question_loss, config.seed, config.shuffle_window, verify=False
        )
    return PreferenceSamples(config.train_data, processor, config.shuffle_window, verify=False)


def language_model_loss(model, batch: dict, device, dtype) -> torch.Tensor:
    """The mean cross-entropy of the labelled tokens (descriptions, answers): the model's own loss."""
    return model(**on_device(batch, device, dtype)).loss


def dpo_objective(beta: float):
    """DPO over a preference batch (PreferenceSamples.collate): the policy's summed log-probabilities
    of the chosen and rejected answers against the reference's, stored with the pairs."""

    def loss(model, batch: dict, device, dtype) -> torch.Tensor:
        batch = dict(batch)
        reference = batch.pop(REFERENCE_KEY).to(device, dtype=torch.float32)
        log_probs = sequence_log_probs(model, on_device(batch, device, dtype)).float()
        n = len(log_probs) // 2
        value, _ = dpo_loss(log_probs[:n], log_probs[n:], reference[:n], reference[n:], beta)
        return value

    return loss


def training_objective(config: TrainConfig):
    if config.train_data and generated_kind(config.train_data) == PREFERENCES:
        return dpo_objective(config.dpo_beta)
    return language_model_loss


def row_group_windows(group_sizes: list[int], window: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's windows: the row groups in a seeded random order, cut into windows of `window`
    groups; each window lists the rows of its groups in index order."""
    starts = [0]
    for size in group_sizes:
        starts.append(starts[-1] + size)
    groups = list(range(len(group_sizes)))
    # An RNG of its own: the order RNG's draws stay those of a whole-split shuffle when one window holds every group.
    random.Random(f"{seed}:groups:{epoch}").shuffle(groups)
    return [
        [i for g in sorted(groups[k : k + window]) for i in range(starts[g], starts[g + 1])]
        for k in range(0, len(groups), window)
    ]


def epoch_batches(
    group_sizes: list[int], batch_size: int, repeat: int, seed: int, epoch: int, window: int
) -> list[list[int]]:
    """One epoch's sample order, cut into batches: a two-level seeded shuffle.

    Row groups are shuffled into windows of `window` groups, then each window's samples
    (repeated `repeat` times) are shuffled among themselves, window after window. A reader
    that caches `window` groups thus decodes each group once per epoch, where a shuffle over
    the whole split decoded it about once per row (64 times). A split of at most `window`
    groups is one window, shuffled whole exactly as before windows existed.
    """
    rng = random.Random(f"{seed}:order:{epoch}")
    order: list[int] = []
    for rows in row_group_windows(group_sizes, window, seed, epoch):
        part = [i for _ in range(repeat) for i in rows]
        rng.shuffle(part)
        order += part
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def global_batches(group_sizes: list[int], config: TrainConfig, epoch: int) -> list[list[int]]:
    """One epoch's global batches (batch_size x gradient_accumulation x ranks samples each).

    They depend on the global batch size and the seed only, so the same seed gives the
    same global batches whatever the rank count. A last batch too small to give every
    rank's every micro-step a sample joins the batch before it (nothing is dropped).
    """
    parts = config.gradient_accumulation * ds_engine.world_size()
    batches = epoch_batches(
        group_sizes, config.batch_size * parts, config.repeat_train, config.seed, epoch, config.shuffle_window
    )
    if len(batches) > 1 and len(batches[-1]) < parts:
        tail = batches.pop()
        batches[-1] = batches[-1] + tail
    if len(batches[-1]) < parts:
        raise ValueError(
            f"{sum(group_sizes)} training samples cannot fill {parts} micro-batches (ranks x gradient_accumulation)"
        )
    return batches


def count_loads(indices: list[int], load_counts: dict[int, int], start: int = 0) -> list[int]:
    """Each sample's load count at this occurrence, counted over the whole global batch on every
    rank, so a sample's shuffled description is the same whichever rank loads it. `start`: the
    loads before this epoch (every epoch loads every sample repeat_train times)."""
    counts = []
    for i in indices:
        load_counts[i] = load_counts.get(i, start) + 1
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


def epoch_plan(config: TrainConfig) -> list[tuple[str, int, int]]:
    """(stage, epoch within the stage, order seed) of every epoch: the warm-up's, then the main stage's."""
    warmup = config.warmup_epochs if config.proxy else 0
    return [("warmup", e, -1 - e) for e in range(warmup)] + [("main", e, e) for e in range(config.epochs)]


def epoch_steps(
    group_sizes: list[int], config: TrainConfig, plan_index: int, order_epoch: int
) -> list[list[list[tuple[int, int]]]]:
    """This rank's micro-batches, step by step, of one epoch of the plan (`group_sizes`: rows of
    each row group of the split). The data position of a checkpoint is (plan index, steps
    done): both suffice to rebuild every later batch."""
    load_counts: dict[int, int] = {}
    start = plan_index * config.repeat_train
    return [
        my_micro_batches(indices, count_loads(indices, load_counts, start), config)
        for indices in global_batches(group_sizes, config, order_epoch)
    ]


def micro_batch_loader(samples: DescriptionSamples, steps: list[list[list[tuple[int, int]]]], processor, workers: int):
    """Micro-batches in step order; with workers, images are decoded and the processor runs ahead of the step."""
    return torch.utils.data.DataLoader(
        samples,
        batch_sampler=[micro for step in steps for micro in step],
        collate_fn=partial(samples.collate, processor),
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        # Workers' seeds come from this generator, not the global RNG, whose state a resumed job restores.
        generator=torch.Generator().manual_seed(0),
    )


def on_device(batch: dict, device, dtype) -> dict:
    """Pixels in the training dtype (bf16 engines hold bf16 weights); ids and masks as they are."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def step_figures(losses: list[torch.Tensor], work: dict, seconds_since_checkpoint: float) -> tuple[float, dict, float]:
    """The step's loss (this rank's micro-batches' mean, averaged over the ranks), its work summed
    over the ranks (flops.WORK_KEYS; a figure a family cannot count stays None) and the slowest
    rank's seconds since the last checkpoint: one small collective per step.

    The loss is averaged in float32 in rank order, as an all-reduce of two ranks does, so two
    ranks log what one rank with accumulation 2 logs.
    """
    local = torch.stack([loss.detach().float() for loss in losses]).mean().item()
    keys = [key for key in flops.WORK_KEYS if work[key] is not None]
    per_rank = ds_engine.gather_across_ranks([local, seconds_since_checkpoint] + [float(work[key]) for key in keys])
    loss = (per_rank[:, 0].float().sum() / per_rank.shape[0]).item()
    counts = ("samples", "text_tokens", "image_tokens")
    summed = {key: None for key in flops.WORK_KEYS}
    for key, value in zip(keys, per_rank[:, 2:].sum(dim=0).tolist()):
        summed[key] = round(value) if key in counts else value
    return round(loss, 5), summed, float(per_rank[:, 1].max())


def checkpoint_due(step: int, seconds: float, every: int, minutes: float) -> bool:
    """Whether step `step` ends with a checkpoint: every `every` steps, or once `minutes` have
    passed since the last (`seconds`: the slowest rank's, so every rank decides alike)."""
    return bool(every and step % every == 0) or bool(minutes and seconds >= 60 * minutes)


def user_text_for(config: TrainConfig, processor) -> str:
    if not config.proxy:
        return CAPTION_INSTRUCTION
    return processor.tokenizer.proxy_token * config.proxy_tokens


def fingerprint(config: TrainConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in NOT_IN_FINGERPRINT} | {"ranks": ds_engine.world_size()}


class Validation:
    """Letter-scoring accuracy on the validation questions (rotation 0), asked of the model
    without the proxy, as the saved model will be.

    The questions are shared out over the job's ranks (`rank_share`): each rank scores its
    share of every row group and the correct answers are summed across the ranks, so the
    accuracy is the one a single rank would get, in a 1/ranks of the time. Under ZeRO-3 a
    forward is collective (each layer's parameters are gathered from every rank), so every
    rank must run the same number of forwards: a share shorter than the others is padded
    with a repeat of its row group's first question, scored and not counted.
    """

    def __init__(self, shards: str, batch_size: int, verify: bool = True):
        self.reader = ShardRows(Path(shards), QUESTIONS, "val", QUESTION_COLUMNS, verify=verify)
        if len(self.reader) == 0:
            raise ValueError(f"{shards}: no validation questions (set validate false)")
        self.config = scoring_settings(
            shards=shards,
            split="val",
            scoring="letter",
            circular=False,
            batch_size=batch_size,
            # Every rank must run the same forwards (ZeRO-3 gathers each layer's parameters in them):
            # encoding each image once would run the vision tower a number of times that depends on
            # the images of the rank's share.
            encode_once=False,
        )

    def accuracy(self, model, processor, proxy) -> float:
        if proxy is not None:
            proxy.detach()
        rank, ranks = ds_engine.rank(), ds_engine.world_size()
        correct = 0
        with tqdm(
            total=-(-len(self.reader) // ranks), desc="validation", unit="q", mininterval=5, disable=rank > 0
        ) as bar:
            for frame in self.reader.row_groups():
                positions, counted = rank_share(len(frame), rank, ranks)
                if not positions:  # an empty row group: no rank scores anything of it
                    continue
                scored = score_questions(model, processor, frame.iloc[positions], self.config, progress=bar)
                correct += int(scored["correct"].iloc[:counted].sum())
        # One collective per validation, on the backend's device (NCCL reduces only GPU tensors).
        total = ds_engine.sum_across_ranks(torch.tensor(correct, dtype=torch.int64, device=ds_engine.training_device()))
        if proxy is not None:
            proxy.attach(model)
        model.train()
        return round(100 * int(total.item()) / len(self.reader), 2)


def rank_share(n: int, rank: int, ranks: int) -> tuple[list[int], int]:
    """The rows of an n-row group that `rank` of `ranks` scores: every ranks-th from its own
    index, then padded with row 0 up to ceil(n / ranks) rows, so that every rank runs the same
    number of forwards. Returns (row positions, how many of them count: the unpadded ones)."""
    share = list(range(rank, n, ranks))
    counted = len(share)
    return share + [0] * (-(-n // ranks) - counted), counted


def trainable_weights(module, zero_stage: int) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable weights (gathered from every rank under ZeRO-3)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


def restore_trainable_weights(module, weights: dict[str, torch.Tensor], zero_stage: int) -> None:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0), torch.no_grad():
            if ds_engine.rank() == 0:
                for n, p in named:
                    p.copy_(weights[n])
        return
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])


class Board:
    """TensorBoard scalars of one job (rank 0); a resumed job first drops the events after its checkpoint."""

    def __init__(self, directory: str, first_step: int):
        self.writer = None
        if directory and ds_engine.rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            # Events of steps after the checkpoint (written by the killed run) are dropped.
            self.writer = SummaryWriter(log_dir=directory, purge_step=first_step + 1 if first_step else None)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Run:
    """Everything one training job holds: settings, data, model pieces and its progress."""

    def __init__(self, config: TrainConfig, samples, processor, proxy, checkpoints, validation, board):
        self.config, self.samples, self.processor, self.proxy = config, samples, processor, proxy
        self.checkpoints, self.validation, self.board = checkpoints, validation, board
        self.state = {
            "plan_index": 0,
            "steps_done": 0,
            "history": [],
            "validation": [],
            "best": None,
            "data_wait_seconds": 0.0,
            "main_step_seconds": [],
            "main_tokens": 0,
        }
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.resumed_stage: str | None = None  # the stage of the checkpoint resumed from
        self.epoch_length = 0  # steps of the current epoch
        # Throughput accounting (set by train(): the model's config and trained groups).
        self.warmup_work: flops.StepWork | None = None
        self.main_work: flops.StepWork | None = None
        self.peak_flops: float | None = None
        self.checkpoint_clock = time.perf_counter()  # this rank's clock since the start or the last checkpoint

    @property
    def step(self) -> int:
        return len(self.state["history"])

    @property
    def done(self) -> bool:
        """max_steps reached: the remaining steps, epochs and validations are skipped."""
        return bool(self.config.max_steps) and self.step >= self.config.max_steps

    def steps_of(self, plan_index: int, order_epoch: int) -> list:
        """The epoch's remaining steps (all, or those after a resumed checkpoint's position)."""
        steps = epoch_steps(self.samples.rows.group_sizes(), self.config, plan_index, order_epoch)
        self.epoch_length = len(steps)
        skip = self.state["steps_done"] if plan_index == self.state["plan_index"] else 0
        return steps[skip:]

    def batches(self, steps: list):
        """Each step's micro-batches, timing how long the step waits for them."""
        loader = iter(micro_batch_loader(self.samples, steps, self.processor, self.config.data_workers))
        for step in steps:
            waited = time.perf_counter()
            micro = [next(loader) for _ in step]
            self.state["data_wait_seconds"] += time.perf_counter() - waited
            yield micro

    def finish_step(
        self,
        plan_index: int,
        stage: str,
        epoch: int,
        losses,
        work: dict,
        seconds: float,
        extra: dict,
        engine=None,
        optimizer=None,
    ) -> None:
        """Record a step: its loss, its throughput (samples, text and image tokens, FLOPs: every
        rank's, from flops.StepWork) over rank 0's step time, MFU/HFU against the peak, peak memory;
        then a checkpoint if one is due (every rank decides alike, on the slowest rank's clock)."""
        loss, work, since_checkpoint = step_figures(losses, work, time.perf_counter() - self.checkpoint_clock)
        self.state["history"].append({"stage": stage, "epoch": epoch, "loss": loss})
        self.state["plan_index"], self.state["steps_done"] = plan_index, self.state["steps_done"] + 1
        figures = flops.rates(work, seconds, ds_engine.world_size(), self.peak_flops)
        memory = peak_memory_bytes()
        self.state["tokens"] = self.state.get("tokens", 0) + work["text_tokens"]
        if stage == "main":
            self.state["main_step_seconds"].append(round(seconds, 5))
            self.state["main_tokens"] += work["text_tokens"]
            self.state["main_work"] = flops.add_work(self.state.get("main_work"), work)
            if memory is not None:
                self.state["peak_memory_bytes"] = max(self.state.get("peak_memory_bytes") or 0, memory)
        scalars = {f"train/{key}": value for key, value in figures.items()}
        scalars["train/peak_memory_gib"] = None if memory is None else memory / 2**30
        self.board.scalars(self.step, {f"{stage}/loss": loss, **scalars, **extra})
        if self.checkpoints is not None and checkpoint_due(
            self.step, since_checkpoint, self.config.checkpoint_every, self.config.checkpoint_minutes
        ):
            # The events up to this step reach the disk before the checkpoint does: a job killed once
            # the checkpoint is written has lost none of them (the writer otherwise flushes every 2 min).
            self.board.flush()
            self.checkpoints.save(self.step, self.state, self.proxy, optimizer, engine, self.best_weights)
            self.checkpoint_clock = time.perf_counter()  # the writing is not training time

    def count(self, micro_batches: list[dict], stage: str) -> dict:
        """The work of a step's micro-batches (this rank's); the peak-memory counter restarts with the step."""
        device = ds_engine.training_device()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter = self.warmup_work if stage == "warmup" else self.main_work
        total = None
        for batch in micro_batches:
            total = flops.add_work(total, counter.of(batch))
        return total

    def end_epoch(self, plan_index: int) -> None:
        self.state["plan_index"], self.state["steps_done"] = plan_index + 1, 0


def proxy_optimizer(proxy: ProxyInstruction, config: TrainConfig) -> torch.optim.Optimizer:
    """The proxy's AdamW in both stages: the model's kind, at proxy_lr (lr unless set), no decay."""
    return torch.optim.AdamW([proxy.weight], lr=config.proxy_learning_rate, weight_decay=0.0)


def run_warmup(model, run: Run, resumed: Path | None) -> None:
    """Stage 1: the model is frozen; only the proxy learns (bf16 autocast if configured).

    `model` is the engine's module, already on the training device in the training dtype (it
    was loaded there); under ZeRO-3 each rank holds its partition and the forwards gather the
    layers in turn (collective, as in the main stage). The proxy's gradient is averaged."""
    config, proxy = run.config, run.proxy
    plan = [(i, e, order) for i, (stage, e, order) in enumerate(epoch_plan(config)) if stage == "warmup"]
    optimizer = proxy_optimizer(proxy, config)
    if resumed is not None and run.resumed_stage == "warmup":
        Checkpoints.load_proxy(resumed, proxy, optimizer)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    device = ds_engine.training_device()
    dtype = next(model.parameters()).dtype  # pixels in the weights' dtype, as in the main stage
    model.train()
    for plan_index, epoch, order in plan:
        if plan_index < run.state["plan_index"] or run.done:
            continue
        steps = run.steps_of(plan_index, order)
        for micro_batches in tqdm(
            run.batches(steps),
            total=len(steps),
            desc=f"warm-up epoch {epoch + 1}",
            mininterval=5,
            disable=ds_engine.rank() > 0,
        ):
            if run.done:
                break
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            losses, work = [], run.count(micro_batches, "warmup")
            for batch in micro_batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = model(**on_device(batch, device, dtype)).loss
                (loss / config.gradient_accumulation).backward()
                losses.append(loss)
            ds_engine.average_across_ranks(proxy.weight.grad)
            optimizer.step()
            run.finish_step(
                plan_index,
                "warmup",
                epoch,
                losses,
                work,
                time.perf_counter() - started,
                {"warmup/lr": optimizer.param_groups[0]["lr"]},
                optimizer=optimizer,
            )
        run.end_epoch(plan_index)
        if plan_index == plan[-1][0]:
            proxy.reset_momentum_copy()  # the warmed proxy initialises the main stage (P and P_bar)
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])


def run_main(engine, run: Run, resumed: Path | None) -> None:
    """Stage 2: model (through DeepSpeed) and proxy learn; the proxy follows its momentum copy.

    DeepSpeed scales each micro-batch's loss by 1/accumulation, averages the model's
    gradients over the ranks and steps at the accumulation boundary; the proxy, replicated
    on every rank, gets the same: its accumulated gradient averaged over the ranks, one step.
    """
    config, proxy = run.config, run.proxy
    optimizer = None
    if proxy is not None:
        # Its own optimizer: the proxy must not be partitioned by ZeRO (it is overwritten by
        # P_bar before every step) and the reference clips the model's gradients only.
        optimizer = proxy_optimizer(proxy, config)
    plan = [(i, e, order) for i, (stage, e, order) in enumerate(epoch_plan(config)) if stage == "main"]
    if resumed is not None and run.resumed_stage == "main":
        engine.load_checkpoint(str(resumed), tag="engine", load_module_strict=False, load_lr_scheduler_states=False)
        if proxy is not None:
            Checkpoints.load_proxy(resumed, proxy, optimizer)
    engine.train()
    dtype = next(engine.module.parameters()).dtype
    for plan_index, epoch, order in plan:
        if plan_index < run.state["plan_index"] or run.done:
            continue
        steps = run.steps_of(plan_index, order)
        for micro_batches in tqdm(
            run.batches(steps),
            total=len(steps),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            mininterval=5,
            disable=ds_engine.rank() > 0,
        ):
            if run.done:
                break
            started = time.perf_counter()
            if proxy is not None and config.momentum > 0:
                proxy.load_momentum_copy()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            losses, work = [], run.count(micro_batches, "main")
            for batch in micro_batches:
                loss = run.objective(engine, batch, engine.device, dtype)
                engine.backward(loss)
                engine.step()  # DeepSpeed steps only at the accumulation boundary
                losses.append(loss)
            extra = {"train/lr": engine.get_lr()[0], "train/grad_norm": _grad_norm(engine)}
            if optimizer is not None:
                ds_engine.average_across_ranks(proxy.weight.grad)
                optimizer.step()
                # |P - P_bar|: how far this step's proxy moved from the momentum copy it started from.
                extra["proxy/drift"] = float((proxy.weight.detach() - proxy.momentum_copy).norm())
                if config.momentum > 0:
                    proxy.update_momentum_copy(config.momentum)
            run.finish_step(
                plan_index,
                "main",
                epoch,
                losses,
                work,
                time.perf_counter() - started,
                extra,
                engine=engine,
                optimizer=optimizer,
            )
        stopped_early = run.done and run.state["steps_done"] < run.epoch_length
        run.end_epoch(plan_index)
        if run.validation is not None and not stopped_early:
            validate_epoch(engine, run, epoch)


def peak_memory_bytes() -> int | None:
    """The step's peak GPU memory allocated on this rank; None off CUDA (no made-up figure on CPU)."""
    device = ds_engine.training_device()
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def validate_epoch(engine, run: Run, epoch: int) -> None:
    accuracy = run.validation.accuracy(engine.module, run.processor, run.proxy)
    run.state["validation"].append({"epoch": epoch, "accuracy": accuracy})
    run.board.scalars(run.step, {"validation/accuracy": accuracy})
    log.info("epoch %d: validation accuracy %.2f%%", epoch + 1, accuracy)
    best = run.state["best"]
    if run.config.select == "best_val" and (best is None or accuracy > best["accuracy"]):
        run.state["best"] = {"epoch": epoch, "accuracy": accuracy}
        run.best_weights = trainable_weights(engine.module, run.config.zero_stage)


def throughput_summary(state: dict, peak: float | None) -> dict:
    """The main stage's throughput over all its steps (work of every rank / rank 0's step seconds):
    samples/s, image tokens/s, model TFLOP/s, MFU and HFU (None without a FLOP formula or a peak),
    and the peak GPU memory of a rank (None off CUDA)."""
    work = state.get("main_work")
    figures = flops.rates(work, sum(state["main_step_seconds"]), ds_engine.world_size(), peak) if work else {}

    def rounded(key, digits):
        return None if figures.get(key) is None else round(figures[key], digits)

    return {
        "main_samples_per_second": rounded("samples_per_second", 3),
        "main_image_tokens_per_second": rounded("image_tokens_per_second", 1),
        "main_model_tflops_per_second": rounded("model_tflops_per_second", 4),
        "main_model_flops_per_step": None
        if not work or work["model_flops"] is None
        else work["model_flops"] / len(state["main_step_seconds"]),
        "main_hardware_flops_per_step": None
        if not work or work["hardware_flops"] is None
        else work["hardware_flops"] / len(state["main_step_seconds"]),
        "peak_flops": peak,
        "mfu": rounded("mfu", 5),
        "hfu": rounded("hfu", 5),
        "peak_memory_bytes": state.get("peak_memory_bytes"),
    }


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every layer that keeps activations for a backward.

    transformers checkpoints its GradientCheckpointingLayer classes (decoder layers, most vision
    encoders); the family table's `plain_layers` (Mllama's vision encoder layers) are wrapped here
    the same way. transformers also hooks every tower's input embeddings to require gradients (for
    reentrant checkpointing): that would make a frozen vision tower keep all its activations, and
    non-reentrant checkpointing needs none of it, so the hooks are removed.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    plain = set(family_of(model.config).plain_layers)
    for module in model.modules():
        if type(module).__name__ in plain:
            module.forward = _checkpointed(module, module.forward)


def disable_activation_checkpointing(model) -> None:
    model.activation_checkpointing_disable()
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "checkpointed", False):
            del module.forward  # back to the class's forward


def _checkpointed(module, forward):
    """`forward` recomputed in the backward pass, where one is needed: in training, with gradients
    enabled and the layer's weights or tensor inputs requiring them (a frozen layer fed by frozen
    layers keeps no activations anyway, and runs plainly). Module hooks stay outside, as in transformers."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        needs_grad = any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())
        if module.training and torch.is_grad_enabled() and needs_grad:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    run.checkpointed = True
    return run


def training_dtype(config: TrainConfig) -> str:
    """The weights' dtype from the moment they load: bf16 for bf16 training (the engine would cast
    them to it anyway), fp32 otherwise (CPU)."""
    return "bfloat16" if config.bf16 else "float32"


def verify_training_shards(config: TrainConfig) -> None:
    """The checksums of the files this job reads (training descriptions, validation questions)."""
    if config.train_data:
        files = verify_split(config.train_data, generated_kind(config.train_data), "train")
    else:
        files = verify_split(config.shards, DESCRIPTIONS, "train")
    if config.validate:
        files += verify_split(config.shards, QUESTIONS, "val")
    log.info("%d shard files match their manifest's sha256", files)


def train(config: TrainConfig) -> dict:
    set_torch_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.time()
    ds_engine.init_distributed()  # before loading: ZeRO-3 partitions the weights over the ranks as they load
    if (
        config.global_batch is not None
        and config.batch_size * config.gradient_accumulation * ds_engine.world_size() != config.global_batch
    ):
        raise ValueError(
            f"global_batch {config.global_batch} was planned for {launcher_world_size()} rank(s), "
            f"but the job has {ds_engine.world_size()}"
        )
    ds_engine.on_rank_zero(partial(verify_training_shards, config), "shard verification")
    ds_config = ds_engine.deepspeed_config(
        config.batch_size,
        config.zero_stage,
        config.grad_clip,
        config.bf16,
        config.gradient_accumulation,
        config.offload,
    )
    with partitioned_loading(ds_config):
        return train_loaded(config, ds_config, started)


def train_loaded(config: TrainConfig, ds_config: dict, started: float) -> dict:
    """The job once the process group is up: load (onto the training device, partitioned under
    ZeRO-3), warm up, train, save."""
    model, processor = load_base_model(
        config.base_model,
        trust_remote_code=config.trust_remote_code,
        dtype=training_dtype(config),
        device=ds_engine.training_device(),
    )
    trainable = select_trainable(model, config.train_modules, lora_rank=config.lora_rank)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    log.info(
        "trainable parameters per group: %s (%d of %d)",
        trainable["per_group"],
        trainable["trainable"],
        trainable["total"],
    )
    # Verified above, once (rank 0); the readers still check their files' row counts.
    samples = training_samples(config, processor)
    validation = Validation(config.shards, config.val_batch_size, verify=False) if config.validate else None
    proxy = None
    if config.proxy:
        hidden = model.get_input_embeddings().embedding_dim  # (a ZeRO-3 partition has no shape)
        generator = torch.Generator().manual_seed(config.seed)
        proxy = ProxyInstruction(config.proxy_tokens, hidden, processor.tokenizer.proxy_token_id, generator).attach(
            model
        )
        proxy.to(ds_engine.training_device())
    checkpoints = Checkpoints(config.checkpoint_dir, fingerprint(config)) if config.checkpoint_dir else None
    resumed = checkpoints.latest() if checkpoints is not None else None
    run = Run(config, samples, processor, proxy, checkpoints, validation, None)
    run.objective = training_objective(config)
    if resumed is not None:
        run.state = Checkpoints.load_state(resumed)
        run.state.pop("fingerprint")
        run.best_weights = Checkpoints.load_best(resumed)
        Checkpoints.load_rng(resumed)
        run.resumed_stage = epoch_plan(config)[run.state["plan_index"]][0]
        log.info(
            "resuming from %s: step %d (epoch %d of the plan, %d steps into it)",
            resumed,
            run.step,
            run.state["plan_index"] + 1,
            run.state["steps_done"],
        )
    run.board = Board(config.tensorboard_dir, run.step)
    # Throughput: the warm-up trains the proxy alone, the main stage the groups (and the proxy).
    run.warmup_work = flops.StepWork(model.config, (), True, config.gradient_checkpointing)
    run.main_work = flops.StepWork(model.config, trainable["groups"], config.proxy, config.gradient_checkpointing)
    run.peak_flops = flops.device_peak_flops(config.peak_flops)
    if not run.main_work.has_formula:
        log.info(
            "no FLOP formula for model_type %r in medift/flops.py: FLOPs and MFU are not reported",
            model.config.model_type,
        )
    elif run.peak_flops is None:
        log.info("no peak FLOP/s for this device (set peak_flops or $%s): MFU/HFU are not reported", flops.PEAK_ENV)
    # The engine comes first: a ZeRO-3 model (partitioned as it loaded) runs its forwards only
    # through the engine's gathering hooks, the warm-up's too. Nothing moves or is cast: the
    # weights are on the training device in the training dtype already.
    engine = ds_engine.initialize(model, ds_config, config.lr)
    if proxy is not None and config.warmup_epochs > 0:
        run_warmup(engine.module, run, resumed)
    run_main(engine, run, resumed)
    state = run.state
    last_epoch = max((h["epoch"] for h in state["history"] if h["stage"] == "main"), default=None)
    if config.select == "best_val" and state["best"] is None:
        raise ValueError("select best_val: no epoch was validated (max_steps stopped the training first)")
    if config.select == "best_val" and state["best"]["epoch"] != last_epoch:
        restore_trainable_weights(engine.module, run.best_weights, config.zero_stage)
        log.info(
            "saving epoch %d's model (best validation accuracy %.2f%%)",
            state["best"]["epoch"] + 1,
            state["best"]["accuracy"],
        )
    if proxy is not None:
        proxy.detach()  # the tuned model is evaluated without it
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(g in LORA_GROUPS for g in trainable["groups"]):
        if config.lora_save == "adapter":
            save_lora_adapter(engine.module, out_dir)
            # the model beside the adapter is its base: fully trained groups, no adapters
            unwrap_lora(engine.module, merge=False)
        else:
            merge_lora(engine.module)
    if config.gradient_checkpointing:
        disable_activation_checkpointing(engine.module)
    ds_engine.save_hf(engine, processor, out_dir, config.zero_stage)
    history = state["history"]
    main_steps = sum(1 for h in history if h["stage"] == "main")
    summary = {
        "config": asdict(config),
        "ranks": ds_engine.world_size(),
        "global_batch": config.batch_size * config.gradient_accumulation * ds_engine.world_size(),
        "trainable_parameters": trainable,
        "train_images": len(samples),  # rows of the training data (images, or generated rows)
        # Every step's text tokens on every rank (warm-up and main stage; a DPO pair counts twice).
        "training_tokens": state.get("tokens", 0),
        "steps": len(history),
        "resumed_at_step": None if resumed is None else int(resumed.name.split("-")[1]),
        "seconds": round(time.time() - started, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "validation": state["validation"],
        "selected_epoch": state["best"]["epoch"] if config.select == "best_val" else last_epoch,
        # The main stage's steps on rank 0's clock, data wait excluded (tokens: every rank's):
        # the median step (robust to a slow first step) and the tokens per second of all of them.
        "main_step_seconds": statistics.median(state["main_step_seconds"]) if main_steps else None,
        "main_tokens_per_second": round(state["main_tokens"] / max(sum(state["main_step_seconds"]), 1e-9), 1),
        "main_tokens_per_step": round(state["main_tokens"] / max(main_steps, 1), 1),
        "main_step_seconds_total": round(sum(state["main_step_seconds"]), 3),
        "data_wait_seconds": round(state["data_wait_seconds"], 3),
        **throughput_summary(state, run.peak_flops),
        "history": history,
    }
    if proxy is not None:
        # Replicated, so identical on every rank; measured, not assumed.
        summary["proxy_max_difference_across_ranks"] = max(
            ds_engine.max_difference_across_ranks(proxy.weight.detach()),
            ds_engine.max_difference_across_ranks(proxy.momentum_copy),
        )
    run.board.close()
    if checkpoints is not None:
        checkpoints.remove()
    if ds_engine.rank() > 0:
        return summary
    if proxy is not None:
        from safetensors.torch import save_file

        save_file(
            {"proxy": proxy.weight.detach().contiguous(), "momentum_copy": proxy.momentum_copy.contiguous()},
            str(out_dir / "proxy.safetensors"),
        )
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    import sys

    from transformers import HfArgumentParser

    # Rank 0 logs (and shows progress) for the job; the other ranks only warn.
    level = logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(argv if argv is not None else sys.argv[1:])
    summary = train(config)
    ds_engine.shutdown()
    log.info("trained %d steps in %.1fs, final loss %s", summary["steps"], summary["seconds"], summary["final_loss"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
