"""Diagnostic: does the embedded model's architecture learn option binding, and how fast?

Option binding (say the letter of the option that matches what you know) is what the
embedded base model lacks (`results/base_model.json`: shuffled-option accuracy at chance).
This probe trains a fresh embedded-architecture model on text only and prints held-out
accuracy every `--eval_every` steps, for one of three tasks of decreasing difficulty:

- `two_hop`: `Context: <full description>` then the evaluation-template question about one
  attribute with shuffled options (look the value up, then find its option);
- `one_hop`: `Context: <value>` then the question (find the stated value among the options);
- `lookup`: no template: `A . w1 \\n B . w2 ...` then every `w : <letter>` query, random
  vocabulary words (pure in-context reverse lookup, dense signal, short sequences).

Template tasks report accuracy on questions with shuffled options only (2-valued attributes
always list their full vocabulary in order, so they can be memorised); `lookup` reports
accuracy over all queries (answering by elimination alone gives about 0.46 with 5 options).

    python research/option_binding.py --task one_hop --steps 600 --threads 2
    python research/option_binding.py --task lookup --curriculum 2:500,3:500,5:1000

`--curriculum N:STEPS,...` (lookup only) trains with N pairs for STEPS steps, then the next
stage; held-out accuracy is always measured with `--options` pairs. `--merged` builds the
tokenizer with one-token option letters ("A.", `letter_dot_tokens`); `--device cuda` runs
on a GPU. The README gives what these measured, on 2 CPU cores and on an H100.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from medift import mcq
from medift.chat import collate, encode_conversation
from medift.embedded import general
from medift.embedded.llava import CONTEXT_PREFIX, EmbeddedModelConfig, build_model, build_processor
from medift.embedded.pretrain import lookup_sequence, random_options
from medift.runtime import set_torch_threads

SHUFFLED_KEYS = [key for key, values in general.ATTRIBUTES.items() if len(values) > 2]


def template_conversation(task: str, rng: random.Random, turns: int, only_shuffled: bool = False):
    attributes = general.sample_attributes(rng)
    instructions, responses = [], []
    for _ in range(turns):
        key = rng.choice(SHUFFLED_KEYS if only_shuffled else list(general.ATTRIBUTES))
        options, answer = random_options(general.ATTRIBUTES[key], attributes[key], rng, 0.0)
        question = mcq.build_mcq_instruction(general.QUESTION_TEXT[key], options)
        if task == "one_hop":
            question = f"{CONTEXT_PREFIX} {attributes[key]}\n{question}"
        instructions.append(question)
        responses.append(mcq.format_answer(answer))
    if task == "two_hop":
        instructions[0] = f"{CONTEXT_PREFIX} {general.describe(attributes)}\n{instructions[0]}"
    return instructions, responses


def letter_token(k: int, merged: bool) -> str:
    return mcq.LETTERS[k] + ("." if merged else "")


def make_batch(args, processor, rng, size, held_out=False, n_options=None):
    if args.task == "lookup":
        vocab = processor.tokenizer.get_vocab()
        words = sorted(w for w in vocab if w.isalpha() and w.islower() and len(w) > 2)
        rows = [lookup_sequence(rng, vocab, words, n_options or args.options) for _ in range(size)]
        width = max(len(r[0]) for r in rows)
        if any(len(r[0]) != width for r in rows):
            raise ValueError("lookup rows of one batch must have one length")
        return {"input_ids": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows])}
    turns = 1 if held_out else args.turns
    encoded = [
        encode_conversation(processor, *template_conversation(args.task, rng, turns, held_out), with_image=False)
        for _ in range(size)
    ]
    return collate(encoded, processor.tokenizer.pad_token_id)


def to_device(batch: dict, device: str) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def held_out_accuracy(model, batch, letter_ids: set[int]) -> float:
    """Accuracy on the letter tokens of the labels (teacher forced)."""
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    model.train()
    targets = batch["labels"][:, 1:]
    is_letter = torch.isin(targets, torch.tensor(sorted(letter_ids), device=targets.device))
    return (logits.argmax(-1)[is_letter] == targets[is_letter]).float().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["two_hop", "one_hop", "lookup"], default="one_hop")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3, help="questions per training conversation")
    parser.add_argument("--options", type=int, default=5, help="pairs per lookup sequence")
    parser.add_argument("--curriculum", default="", help="lookup only: N:STEPS,... pairs per training stage")
    parser.add_argument(
        "--merged",
        action="store_true",
        help="one-token 'A.' (the embedded tokenizer's letter_dot_tokens); lookup: 'A.' right before its word",
    )
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    torch.manual_seed(args.seed)
    config = EmbeddedModelConfig(heads=args.heads, text_layers=args.layers, letter_dot_tokens=args.merged)
    processor = build_processor(config)
    model = build_model(config, processor, args.seed).to(args.device)
    vocab = processor.tokenizer.get_vocab()
    letter_ids = {
        vocab[token] for k in range(8) for token in (letter_token(k, False), letter_token(k, True)) if token in vocab
    }
    held_out = to_device(
        make_batch(args, processor, random.Random(f"held-out-{args.seed}"), 200, held_out=True), args.device
    )
    rng = random.Random(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    stages = [tuple(map(int, stage.split(":"))) for stage in args.curriculum.split(",") if stage]
    if stages:
        args.steps = sum(steps for _, steps in stages)

    def pairs_at(step: int) -> int:
        for n, steps in stages:
            if step <= steps:
                return n
            step -= steps
        return args.options

    started = time.time()
    print("step  loss  held-out letter accuracy  seconds", flush=True)
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)
        loss = model(
            **to_device(make_batch(args, processor, rng, args.batch_size, n_options=pairs_at(step)), args.device)
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0:
            accuracy = held_out_accuracy(model, held_out, letter_ids)
            print(f"{step:5d} {loss.item():.3f} {accuracy:.3f} {time.time() - started:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
