"""The embedded default base model (`base_model.path: embedded`, models/embedded-mllama) in
the paper's architecture: a tiny Mllama, distilled from the embedded LLaVA (`llava.py`).

Llama-3.2-Vision reads the image through gated cross-attention layers inside the decoder
(one `<image>` token in the text marks where the image is); its self-attention and MLP
layers are a text LLM's. The tiny Mllama here is built the same way from what the
embedded LLaVA's pre-training learned (docs/base-model-trials.md):

- its text layers *are* the LLaVA decoder's (word embeddings, the 4 self-attention
  layers, final norm, output embeddings; copied and kept frozen), so text-only behaviour,
  option binding included, is the LLaVA's;
- cross-attention layers are inserted after decoder layers 0 and 1, gates at 0 (the
  untrained model is the text LLM exactly);
- the vision tower starts as the LLaVA's CLIP tower (copied into Mllama's vision encoder),
  and the projector, a single linear map as in Llama-3.2-Vision, is fitted by least
  squares to the LLaVA's projected image tokens;
- only the vision tower, projector and cross-attention layers are trained, by distilling
  the LLaVA teacher on the same general-domain conversations: its next-token distributions
  on the responses, its hidden states at the text after the image at the matching depths
  (the LLaVA decoder reads the image's values into the text by layer 1; the student's
  first cross-attention layer has to put them there), its projected image tokens, and the
  true labels;
- then, in a language stage, its text layers (the cross-attention layers, vision tower and
  projector frozen) learn to write medical descriptions from text alone: caption requests
  answered by random descriptions in the datasets' vocabularies, half of them with the
  description stated first, beside the distillation's losses on general conversations. The
  text LLM then knows the language of reports, as Llama-3.2-Vision's does, but has never seen
  a medical image: zero-shot it writes a plausible description, not one of the image.

The student's tokenizer is the teacher's (same ids, `<image>` as Mllama's image token)
and its chat template the teacher's with the Mllama BOS first.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from medift.chat import IGNORE_INDEX, Encoded, collate, encode_conversation, model_inputs
from medift.embedded import general
from medift.embedded.llava import CHAT_TEMPLATE
from medift.embedded.pretrain import (
    HISTORY_FILE,
    ConversationSampler,
    PretrainConfig,
    general_mcq_accuracy,
    held_out_questions,
    lr_at,
    medical_describe_turn,
    read_history,
)
from medift.model.loading import load_base_model
from medift.runtime import set_torch_threads

log = logging.getLogger(__name__)

MLLAMA_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE


@dataclass
class DistillConfig:
    teacher: str = field(
        default="models/embedded-base",
        metadata={"help": "The embedded LLaVA whose decoder is copied and whose outputs are distilled."},
    )
    out_dir: str = field(default="models/embedded-mllama", metadata={"help": "Where the Mllama is saved (HF layout)."})
    seed: int = field(default=1, metadata={"help": "Seeds initialisation and every sampled conversation."})
    steps: int = field(default=800, metadata={"help": "Distillation steps."})
    batch_size: int = field(default=32, metadata={"help": "Conversations per step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate (cosine decay to a tenth)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up steps."})
    cross_attention_after: str = field(
        default="0,1",
        metadata={
            "help": (
                "Teacher decoder layers after which a cross-attention layer is inserted (the LLaVA decoder moves the "
                "image's values into the text in its first two layers)."
            )
        },
    )
    vision_hidden: int = field(default=128, metadata={"help": "Mllama vision tower width."})
    vision_layers: int = field(default=2, metadata={"help": "Local layers of the vision tower."})
    vision_global_layers: int = field(default=1, metadata={"help": "Gated global layers of the vision tower."})
    hidden_weight: float = field(
        default=1.0, metadata={"help": "Weight of matching the teacher's hidden states at the text after the image."}
    )
    image_weight: float = field(
        default=1.0,
        metadata={
            "help": (
                "Weight of matching the teacher's projected image tokens (what its decoder reads) with the student's "
                "projected patch features (what its cross-attention reads): the teacher's vision tower was trained to "
                "make the attributes readable, the student's starts from scratch."
            )
        },
    )
    copy_vision: bool = field(
        default=True,
        metadata={
            "help": (
                "Start the vision tower from the teacher's CLIP tower (same widths; Mllama's vision attention has no "
                "biases, so those are dropped) and fit the projector to the teacher's projected image tokens by least "
                "squares, instead of from scratch."
            )
        },
    )
    gate_init: float = field(
        default=0.0,
        metadata={
            "help": (
                "Initial value of the cross-attention layers' tanh gates (0: the untrained student is the text LLM "
                "exactly)."
            )
        },
    )
    kl_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the KL divergence to the teacher's next-token distribution on response tokens."},
    )
    label_weight: float = field(
        default=1.0, metadata={"help": "Weight of the cross-entropy on the true response tokens."}
    )
    language_steps: int = field(
        default=400,
        metadata={
            "help": (
                "Steps of the language stage after distillation (0: none). It trains the decoder's text layers (not "
                "the cross-attention layers, vision tower or projector) on text-only caption requests answered by "
                "random medical descriptions, beside the distillation's losses on general conversations, so that the "
                "text LLM knows the language of reports (as Llama-3.2-Vision's does) but has seen no medical image."
            )
        },
    )
    language_lr: float = field(
        default=1e-3, metadata={"help": "Peak learning rate of the language stage (cosine decay to a tenth)."}
    )
    language_warmup_steps: int = field(default=20, metadata={"help": "Linear warm-up steps of the language stage."})
    describe_rows: int = field(
        default=16,
        metadata={
            "help": (
                "Text-only medical description rows per language-stage step, beside batch_size general conversations."
            )
        },
    )
    describe_context_fraction: float = field(
        default=0.5,
        metadata={
            "help": (
                "Share of the description rows that state the description first ('Context: ...'), so that the decoder "
                "learns to write out the values its text carries."
            )
        },
    )
    describe_image_fraction: float = field(
        default=0.5,
        metadata={
            "help": (
                "Share of the description rows that carry a general-domain drawing, unrelated to the description: the "
                "caption request asks for a report's language whatever image is shown (as a general VLM writes a "
                "medical-sounding description of any scan), and the model learns nothing of how medical images look."
            )
        },
    )
    first_stage_dir: str = field(
        default="resources/embedded-mllama-distilled",
        metadata={
            "help": (
                "With language_steps: where the distilled model is saved; the language stage starts from it. Reused, "
                "not distilled again, when its recorded settings match (reuse_first_stage)."
            )
        },
    )
    reuse_first_stage: bool = field(
        default=True,
        metadata={
            "help": "Skip the distillation when first_stage_dir holds a finished run with these distillation settings."
        },
    )
    eval_every: int = field(
        default=200, metadata={"help": "Steps between held-out checks on 100 questions (0: only at the end)."}
    )
    eval_questions: int = field(
        default=300, metadata={"help": "Held-out general multiple-choice questions at the end."}
    )
    threads: int = field(default=2, metadata={"help": "torch intra-op threads."})
    save_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": (
                "dtype of the saved weights (bfloat16, as Llama-3.2-Vision ships; the pipeline loads them as "
                "float32). The final accuracy is measured on the saved model."
            )
        },
    )


def build_processor(teacher_processor, image_size: int) -> MllamaProcessor:
    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size}, max_image_tiles=1)
    return MllamaProcessor(
        image_processor=image_processor, tokenizer=teacher_processor.tokenizer, chat_template=MLLAMA_TEMPLATE
    )


def cross_layer_indices(after: list[int], teacher_layers: int) -> list[int]:
    """Positions of the cross-attention layers in the student's layer list."""
    return [a + 1 + i for i, a in enumerate(sorted(after)) if a < teacher_layers]


def build_student(teacher, processor: MllamaProcessor, config: DistillConfig) -> MllamaForConditionalGeneration:
    teacher_text = teacher.config.text_config
    teacher_vision = teacher.config.vision_config
    after = [int(x) for x in config.cross_attention_after.split(",")]
    cross = cross_layer_indices(after, teacher_text.num_hidden_layers)
    tokenizer = processor.tokenizer
    vision = MllamaVisionConfig(
        hidden_size=config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_global_layers=config.vision_global_layers,
        attention_heads=teacher_vision.num_attention_heads,
        intermediate_size=2 * config.vision_hidden,
        image_size=teacher_vision.image_size,
        patch_size=teacher_vision.patch_size,
        max_num_tiles=1,
        intermediate_layers_indices=[0],
        vision_output_dim=2 * config.vision_hidden,
        supported_aspect_ratios=[[1, 1]],
        hidden_act=teacher_vision.hidden_act,
    )
    text = MllamaTextConfig(
        hidden_size=teacher_text.hidden_size,
        intermediate_size=teacher_text.intermediate_size,
        num_hidden_layers=teacher_text.num_hidden_layers + len(cross),
        cross_attention_layers=cross,
        num_attention_heads=teacher_text.num_attention_heads,
        num_key_value_heads=teacher_text.num_key_value_heads,
        vocab_size=teacher_text.vocab_size,
        max_position_embeddings=teacher_text.max_position_embeddings,
        rope_parameters=dict(teacher_text.rope_parameters),
        rms_norm_eps=teacher_text.rms_norm_eps,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(config.seed)
    student = MllamaForConditionalGeneration(
        MllamaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id)
    )
    copy_decoder(teacher, student, cross, config.gate_init)
    if config.copy_vision:
        copy_vision(teacher, student)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(student.generation_config, key, getattr(teacher.generation_config, key))
    return student


@torch.no_grad()
def copy_decoder(teacher, student, cross: list[int], gate_init: float) -> None:
    """The teacher's decoder into the student's self-attention layers; cross-attention gates at 0."""
    t_lm, s_lm = teacher.model.language_model, student.model.language_model
    vocab = t_lm.embed_tokens.weight.shape[0]
    s_lm.embed_tokens.weight[:vocab].copy_(t_lm.embed_tokens.weight)
    student.lm_head.weight.copy_(teacher.lm_head.weight)
    s_lm.norm.load_state_dict(t_lm.norm.state_dict())
    self_layers = [i for i in range(len(s_lm.layers)) if i not in cross]
    for t_layer, s_index in zip(t_lm.layers, self_layers):
        s_lm.layers[s_index].load_state_dict(t_layer.state_dict(), strict=True)
    for i in cross:
        s_lm.layers[i].cross_attn_attn_gate.fill_(gate_init)
        s_lm.layers[i].cross_attn_mlp_gate.fill_(gate_init)


# Teacher CLIP vision tower -> student Mllama vision tower (local layers), parameter names.
_VISION_NAMES = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "patch_embedding.weight",
    "embeddings.position_embedding.weight": "gated_positional_embedding.embedding",
    "pre_layrnorm.weight": "layernorm_pre.weight",
    "pre_layrnorm.bias": "layernorm_pre.bias",
    "post_layernorm.weight": "layernorm_post.weight",
    "post_layernorm.bias": "layernorm_post.bias",
}
_VISION_LAYER_NAMES = {
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.out_proj.weight": "self_attn.o_proj.weight",
    "layer_norm1.weight": "input_layernorm.weight",
    "layer_norm1.bias": "input_layernorm.bias",
    "layer_norm2.weight": "post_attention_layernorm.weight",
    "layer_norm2.bias": "post_attention_layernorm.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


@torch.no_grad()
def copy_vision(teacher, student) -> None:
    """The teacher's CLIP tower into the student's local vision layers (biases of the attention
    projections have no place in Mllama's and are dropped); the position gates stay at 0, so
    a single tile gets the CLIP position embeddings alone."""
    source = dict(teacher.model.vision_tower.named_parameters())
    target = dict(student.model.vision_model.named_parameters())
    if len(teacher.model.vision_tower.encoder.layers) != len(student.model.vision_model.transformer.layers):
        raise ValueError("copy_vision needs as many local vision layers as the teacher's CLIP tower has")
    names = dict(_VISION_NAMES)
    for i in range(len(teacher.model.vision_tower.encoder.layers)):
        names |= {f"encoder.layers.{i}.{a}": f"transformer.layers.{i}.{b}" for a, b in _VISION_LAYER_NAMES.items()}
    for a, b in names.items():
        target[b].copy_(source[a].reshape(target[b].shape))


@torch.no_grad()
def fit_projector(student, teacher, pairs_of_batches: list[tuple[dict, dict]]) -> float:
    """Least-squares fit of the student's projector (a linear map of its vision features) to
    the teacher's projected image tokens over the batches' images; returns the fit's relative
    error on the last batch, which the fit did not see."""
    captured = []
    hook = student.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    inputs, targets = [], []
    try:
        for t_batch, s_batch in pairs_of_batches:
            captured.clear()
            student(**{k: v for k, v in s_batch.items() if k != "labels"})
            t_out = teacher(**{k: v for k, v in t_batch.items() if k != "labels"})
            targets.append(t_out.image_hidden_states.reshape(-1, t_out.image_hidden_states.shape[-1]))
            # (images, media, tiles, CLS + patches, features) -> the patches, in the teacher's order
            features = captured[0].reshape(-1, captured[0].shape[-2], captured[0].shape[-1])[:, 1:]
            inputs.append(torch.cat([features.reshape(-1, features.shape[-1]), torch.ones(targets[-1].shape[0], 1)], 1))
    finally:
        hook.remove()
    design, target = torch.cat(inputs[:-1]).double(), torch.cat(targets[:-1]).double()
    solution = torch.linalg.solve(
        design.T @ design + 1e-3 * torch.eye(design.shape[1], dtype=design.dtype), design.T @ target
    ).float()
    projector = student.model.multi_modal_projector
    projector.weight.copy_(solution[:-1].T)
    projector.bias.copy_(solution[-1])
    return float(relative_error(inputs[-1] @ solution, targets[-1]))


def matched_depths(cross: list[int], teacher_layers: int) -> list[tuple[int, int]]:
    """(student hidden-state index, teacher hidden-state index) pairs at the same depth:
    after each cross-attention layer and after every later self-attention layer."""
    pairs, t = [], 0
    total = teacher_layers + len(cross)
    for s in range(total):
        if s in cross:
            pairs.append((s + 1, t))
        else:
            t += 1
            if any(c < s for c in cross):
                pairs.append((s + 1, t))
    return pairs


def text_after_image(input_ids: torch.Tensor, attention: torch.Tensor, image_id: int) -> torch.Tensor:
    """Mask of the tokens after each row's last image token (rows without one: none)."""
    is_image = input_ids == image_id
    seen = is_image.long().cumsum(1)
    last = seen == seen[:, -1:]
    return last & ~is_image & (seen > 0) & attention.bool()


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher) / teacher.pow(2).mean()


def distill_loss(student, teacher, s_batch: dict, t_batch: dict, image_id: int, pairs, config: DistillConfig) -> dict:
    with torch.no_grad():
        t_out = teacher(**{k: v for k, v in t_batch.items() if k != "labels"}, output_hidden_states=True)
    s_inputs = {k: v for k, v in s_batch.items() if k != "labels"}
    projected = []
    hook = student.model.multi_modal_projector.register_forward_hook(lambda m, i, o: projected.append(o))
    try:
        s_out = student(**s_inputs, output_hidden_states=True)
    finally:
        hook.remove()
    # Student: CLS then the patches in the teacher's order; the teacher's strategy drops its CLS.
    width = t_out.image_hidden_states.shape[-1]
    t_image = t_out.image_hidden_states.reshape(len(projected[0]), -1, width)
    s_image = projected[0].reshape(len(t_image), -1, width)[:, 1:]
    image = relative_error(s_image, t_image)
    s_resp = s_batch["labels"][:, 1:] != IGNORE_INDEX
    t_resp = t_batch["labels"][:, 1:] != IGNORE_INDEX
    s_logits = s_out.logits[:, :-1][s_resp]
    t_logits = t_out.logits[:, :-1][t_resp]
    kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean")
    ce = F.cross_entropy(s_logits, s_batch["labels"][:, 1:][s_resp])
    s_text = text_after_image(s_batch["input_ids"], s_batch["attention_mask"], image_id)
    t_text = text_after_image(t_batch["input_ids"], t_batch["attention_mask"], image_id)
    # Relative squared error: the residual stream's scale grows with depth.
    hidden = sum(
        relative_error(s_out.hidden_states[s][s_text], t_out.hidden_states[t][t_text]) for s, t in pairs
    ) / len(pairs)
    total = (
        config.kl_weight * kl + config.label_weight * ce + config.hidden_weight * hidden + config.image_weight * image
    )
    return {"loss": total, "kl": kl.detach(), "ce": ce.detach(), "hidden": hidden.detach(), "image": image.detach()}


def student_row(row: Encoded, bos_id: int, bos: str) -> Encoded:
    """The teacher's row as the student's template renders it (the same text after a BOS)."""
    return Encoded([bos_id, *row.input_ids], [IGNORE_INDEX, *row.labels], row.has_image, bos + row.text)


def paired_batches(sampler: ConversationSampler, s_processor) -> tuple[dict, dict]:
    """One sampled batch of conversations, as the teacher's and as the student's processor make it."""
    rows, images, _ = sampler.rows()
    tokenizer = s_processor.tokenizer
    s_rows = [student_row(r, tokenizer.bos_token_id, tokenizer.bos_token) for r in rows]
    return (
        model_inputs(sampler.processor, rows, images, padding_side="right"),
        model_inputs(s_processor, s_rows, images, padding_side="right"),
    )


def sampler_config(config: DistillConfig) -> PretrainConfig:
    """Image conversations only: the student's text path is the teacher's, frozen."""
    return PretrainConfig(
        seed=config.seed, batch_size=config.batch_size, text_fraction=0.0, binding_fraction=0.0, two_option_steps=0
    )


# Settings since deleted, each with the value that left it off (what the code does now): a saved
# run's history may still record them (pretrain.read_history).
RETIRED_SETTINGS = {"text_fraction": 0.0, "binding_fraction": 0.0}


# Settings of the language stage, and those that only name outputs, set threads or schedule the
# held-out checks (which leave the weights as they are: a run with eval_every 0 saved the same
# bytes as the shipped one): a finished distillation whose recorded settings differ from the
# run's in these alone is reused.
NOT_DISTILL_SETTINGS = (
    "out_dir",
    "threads",
    "eval_every",
    "first_stage_dir",
    "reuse_first_stage",
    "language_steps",
    "language_lr",
    "language_warmup_steps",
    "describe_rows",
    "describe_context_fraction",
    "describe_image_fraction",
)


def distill_settings(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in NOT_DISTILL_SETTINGS}


def load_teacher(config: DistillConfig):
    teacher, t_processor = load_base_model(config.teacher)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, t_processor


def train_only(student, prefixes: tuple[str, ...], excluded: tuple[str, ...] = ()) -> list:
    """Freeze every parameter but those whose names start with one of `prefixes` (and not with
    one of `excluded`); return the trained ones."""
    trainable = []
    for name, p in student.named_parameters():
        train = name.startswith(prefixes) and not name.startswith(excluded)
        p.requires_grad_(train)
        if train:
            trainable.append(p)
    return trainable


def distill(config: DistillConfig, stop_after: int | None = None) -> dict:
    """Build the embedded Mllama: distil it (saved to out_dir, or with language_steps to
    first_stage_dir, reused when it is already there), then the language stage. With
    `stop_after`, return the first distillation steps' losses unsaved (tests)."""
    set_torch_threads(config.threads)
    if not config.language_steps or stop_after is not None:
        return distill_stage(config, config.first_stage_dir if config.language_steps else config.out_dir, stop_after)
    history = Path(config.first_stage_dir) / HISTORY_FILE
    recorded = read_history(config.first_stage_dir, RETIRED_SETTINGS) if history.exists() else None
    if (
        config.reuse_first_stage
        and recorded
        and distill_settings(recorded["config"]) == distill_settings(asdict(config))
    ):
        log.info(
            "reusing the distilled model in %s (its settings are this run's): %s",
            config.first_stage_dir,
            recorded["final"],
        )
    else:
        distill_stage(config, config.first_stage_dir, stop_after)
    return language_stage(config)


def distill_stage(config: DistillConfig, out_dir: str, stop_after: int | None = None) -> dict:
    teacher, t_processor = load_teacher(config)
    image_size = teacher.config.vision_config.image_size
    s_processor = build_processor(t_processor, image_size)
    student = build_student(teacher, s_processor, config)
    cross = student.config.text_config.cross_attention_layers
    trainable = train_only(
        student,
        ("model.vision_model.", "model.multi_modal_projector.", *(f"model.language_model.layers.{i}." for i in cross)),
    )
    log.info(
        "student: %d parameters, %d trained (vision, projector, cross-attention layers %s)",
        sum(p.numel() for p in student.parameters()),
        sum(p.numel() for p in trainable),
        cross,
    )
    pairs = matched_depths(cross, teacher.config.text_config.num_hidden_layers)
    sampling = sampler_config(config)
    projector_fit = None
    if config.copy_vision:
        fitting = ConversationSampler(t_processor, sampling, random.Random(f"projector-fit-{config.seed}"), image_size)
        projector_fit = fit_projector(student, teacher, [paired_batches(fitting, s_processor) for _ in range(9)])
        log.info("vision tower copied, projector fitted: relative error %.4f on unseen images", projector_fit)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    sampler = ConversationSampler(t_processor, sampling, random.Random(f"distill-{config.seed}"), image_size)
    image_id = t_processor.tokenizer.image_token_id
    held_out = held_out_questions(config.eval_questions, config.seed, image_size)

    def step_loss() -> dict:
        t_batch, s_batch = paired_batches(sampler, s_processor)
        losses = distill_loss(student, teacher, s_batch, t_batch, image_id, pairs, config)
        return losses | {"total": losses["loss"]}

    started = time.time()
    history, checks = train_steps(
        student, trainable, optimizer, step_loss, config.steps, config, "distil", s_processor, held_out, stop_after
    )
    if stop_after is not None:
        return {"losses": history, "projector_fit_error": projector_fit}
    seconds = round(time.time() - started, 1)
    final, _ = save_and_measure(student, s_processor, out_dir, config, held_out, seconds)
    (Path(out_dir) / HISTORY_FILE).write_text(
        json.dumps(
            {
                "config": asdict(config),
                "final": final,
                "projector_fit_error": projector_fit,
                "checks": checks,
                "losses": history,
            },
            indent=0,
        )
    )
    return final


def train_steps(
    student, trainable, optimizer, step_loss, steps: int, schedule, name: str, processor, held_out, stop_after
) -> tuple[list, list]:
    """The training loop of both stages: `step_loss()` samples a batch and returns its losses
    with the one to minimise as `total`; the learning rate follows `schedule`'s warm-up and
    cosine decay (pretrain.lr_at). Returns each step's losses (without `total`) and the
    held-out checks; with `stop_after`, stops after that many steps."""
    history, checks = [], []
    student.train()
    for step in tqdm(range(steps), desc=name, mininterval=10):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, schedule)
        losses = step_loss()
        optimizer.zero_grad(set_to_none=True)
        losses.pop("total").backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        history.append({k: round(float(v.detach()), 5) for k, v in losses.items()})
        if stop_after is not None and len(history) >= stop_after:
            break
        if step % 50 == 0:
            log.info("%s step %d: %s", name, step, history[-1])
        if schedule.eval_every and (step + 1) % schedule.eval_every == 0 and step + 1 < steps:
            checks.append(held_out_check(student, processor, held_out[:100], step + 1))
    return history, checks


def held_out_check(student, processor, questions, step: int) -> dict:
    student.eval()
    check = general_mcq_accuracy(student, processor, questions)
    student.train()
    check["step"] = step
    log.info("held out at step %d: %s", step, check)
    return check


def save_and_measure(
    student, processor, out_dir: str, config: DistillConfig, held_out, seconds: float
) -> tuple[dict, object]:
    """Save in `save_dtype`; the accuracy is measured on the model as every later job loads it
    (float32 from the saved weights)."""
    out = Path(out_dir)
    student.to(getattr(torch, config.save_dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    saved, saved_processor = load_base_model(str(out))
    final = general_mcq_accuracy(saved, saved_processor, held_out)
    final["seconds"] = seconds
    log.info("final (saved model, %s): %s", out, final)
    return final, saved


def describe_batch(rng: random.Random, t_processor, s_processor, config: DistillConfig, image_size: int = 64) -> dict:
    """Medical description rows as the student's template renders them; with
    `describe_image_fraction`, a row carries a general drawing unrelated to its description."""
    tokenizer = s_processor.tokenizer
    rows, images = [], []
    for _ in range(config.describe_rows):
        instruction, description = medical_describe_turn(rng, config.describe_context_fraction)
        image = None
        if rng.random() < config.describe_image_fraction:
            image = general.render(general.sample_attributes(rng), rng, image_size)
        row = encode_conversation(t_processor, [instruction], [description], with_image=image is not None)
        rows.append(student_row(row, tokenizer.bos_token_id, tokenizer.bos_token))
        images.append(image)
    if not any(image is not None for image in images):
        return collate(rows, tokenizer.pad_token_id)
    return model_inputs(s_processor, rows, images, padding_side="right")


def language_stage(config: DistillConfig, stop_after: int | None = None) -> dict:
    """From the distilled model: its text layers learn to write medical descriptions (text only,
    no image), while the distillation's losses on general conversations keep its general
    behaviour the teacher's. The cross-attention layers, vision tower and projector stay as
    distilled: the stage teaches the language of reports, not how to read a medical image.
    With `stop_after`, return the first steps' losses and the model, unsaved (tests)."""
    teacher, t_processor = load_teacher(config)
    student, s_processor = load_base_model(config.first_stage_dir)
    image_size = teacher.config.vision_config.image_size
    cross = student.config.text_config.cross_attention_layers
    trainable = train_only(
        student, ("model.language_model.", "lm_head."), tuple(f"model.language_model.layers.{i}." for i in cross)
    )
    log.info(
        "language stage: %d parameters trained (text layers; cross-attention layers %s frozen)",
        sum(p.numel() for p in trainable),
        cross,
    )
    pairs = matched_depths(cross, teacher.config.text_config.num_hidden_layers)
    stage = replace(config, lr=config.language_lr, warmup_steps=config.language_warmup_steps)
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=0.0)
    sampler = ConversationSampler(
        t_processor, sampler_config(config), random.Random(f"language-{config.seed}"), image_size
    )
    describe_rng = random.Random(f"describe-{config.seed}")
    image_id = t_processor.tokenizer.image_token_id
    held_out = held_out_questions(config.eval_questions, config.seed, image_size)
    held_out_describe = describe_batch(
        random.Random(f"held-out-describe-{config.seed}"),
        t_processor,
        s_processor,
        replace(config, describe_rows=200),
        image_size,
    )

    with torch.no_grad():  # the distilled model's, before any step
        before = round(float(student.eval()(**held_out_describe).loss), 4)

    def step_loss() -> dict:
        t_batch, s_batch = paired_batches(sampler, s_processor)
        losses = distill_loss(student, teacher, s_batch, t_batch, image_id, pairs, config)
        losses["describe"] = student(**describe_batch(describe_rng, t_processor, s_processor, config, image_size)).loss
        return losses | {"total": losses["loss"] + losses["describe"]}

    started = time.time()
    history, checks = train_steps(
        student,
        trainable,
        optimizer,
        step_loss,
        config.language_steps,
        stage,
        "language",
        s_processor,
        held_out,
        stop_after,
    )
    if stop_after is not None:
        return {"losses": history, "model": student}
    seconds = round(time.time() - started, 1)
    # The processor as the distillation saved it (loading set its training-time padding side).
    final, saved = save_and_measure(
        student, build_processor(t_processor, image_size), config.out_dir, config, held_out, seconds
    )
    with torch.no_grad():
        final["held_out_describe_loss"] = round(float(saved(**held_out_describe).loss), 4)
    log.info(
        "held-out medical description loss: %.4f before the stage, %.4f after", before, final["held_out_describe_loss"]
    )
    first_stage = read_history(config.first_stage_dir, RETIRED_SETTINGS)
    (Path(config.out_dir) / HISTORY_FILE).write_text(
        json.dumps(
            {
                "config": asdict(config),
                "final": final,
                "held_out_describe_loss_before": before,
                "checks": checks,
                "losses": history,
                "first_stage": first_stage,
            },
            indent=0,
        )
    )
    return final
