"""One definition of every training and evaluation setting's rules, shared by the CLI and the workflow.

The dataclasses `medift.train.TrainConfig` and `medift.evaluate.EvaluateConfig` hold each
setting's one default and one help text (field metadata), and next to them its one validity
rule (`TRAIN_LIMITS`, `EVALUATE_LIMITS`: `minimum`, `exclusive_minimum`, `maximum`,
`choices`, `pattern`; not in the metadata, which the argument parser hands to argparse). From them:

- the CLI (`python -m medift.train --help`) shows the defaults and help; `__post_init__`
  checks every field with `check_fields` and the settings together with `check_train_settings`;
- the workflow's schema (workflow/schemas/config.schema.yaml) holds generated copies of the
  same types, defaults, help and limits: `python -m medift.settings --write` rewrites them
  (and the settings tables of config/README.md), and tests/test_settings.py fails while the
  committed files differ from what it would write;
- workflow/rules/common.smk loads this file (standard library only: a Snakemake driver
  environment may lack medift's dependencies) for the checks across settings, the proxy's
  learning rate, the train job's command-line arguments and a few facts about the embedded
  models and the machine.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from pathlib import Path

##### facts the workflow and the package share #####

# Datasets whose words the embedded models' closed vocabulary holds (medift.embedded.llava).
EMBEDDED_DATASETS = ("wbcatt", "cbis_ddsm")
# Side of the embedded models' images (medift.embedded.llava.EmbeddedModelConfig.image_size).
EMBEDDED_IMAGE_SIZE = 64


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


##### choices of single settings #####

OFFLOAD_MODES = ("none", "optimizer", "optimizer+parameters")
ZERO_STAGES = (0, 1, 2, 3)
LORA_SAVE_MODES = ("merged", "adapter")
SELECT_MODES = ("last", "best_val")
SCORING_MODES = ("generate", "letter")
SPLITS = ("val", "test")
DTYPES = ("float32", "bfloat16", "float16")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"

##### which TrainConfig fields are workflow settings #####

# TrainConfig fields a workflow job fills from its paths, wildcards and other config blocks
# (not keys of the `train` block), and fields the workflow does not set (the CLI's own).
TRAIN_JOB_FIELDS = (
    "shards",
    "base_model",
    "out_dir",
    "seed",
    "trust_remote_code",
    "checkpoint_dir",
    "tensorboard_dir",
    "threads",
    "train_data",
)
TRAIN_CLI_ONLY_FIELDS = ("max_steps", "val_batch_size")
# Keys of the `train` block that are the workflow's own (not TrainConfig fields): the
# launcher's ranks and nodes, the accelerator and the job's threads (schema only).
TRAIN_WORKFLOW_KEYS = ("ranks", "nodes", "accelerator", "threads")
# EvaluateConfig fields the workflow fills itself, and keys of the `evaluate` block of its own.
EVALUATE_JOB_FIELDS = (
    "model",
    "shards",
    "out",
    "summary",
    "trust_remote_code",
    "threads",
    "descriptions",
    "description_summary",
    "adapter",
    "describe_shards",
    "unlabelled",
)
EVALUATE_WORKFLOW_KEYS = ("describe", "threads", "ranks")


# Keys of a `methods:` entry that are not train settings: whether it trains, what it trains on
# (`data`), which method's tuned model it starts from, and vital_select's kept fraction.
METHOD_KEYS = ("train", "data", "start_from", "keep_fraction")
# What a method trains on: the descriptions (caption_ft, ift); instructions generated from the
# attributes (inst_ft; st_dpo's first stage); the candidates vital_select keeps; the preference
# pairs st_dpo's first-stage model makes (DPO; needs start_from).
DATA_SOURCES = ("descriptions", "instructions", "vital_select", "preferences")
# Adapters whose records carry structured attributes (QUESTION_OPTIONS) that generated
# instructions, candidates and the offline judge need (tests/test_settings.py holds it equal to
# medift.datasets).
ADAPTERS_WITH_ATTRIBUTES = ("wbcatt", "cbis_ddsm", "skincon", "mimic_cxr")
# Every adapter a dataset entry may name (medift.datasets.get_dataset): the four releases and
# `captions`, a user's own image-description set (tests/test_workflow.py holds it equal).
ADAPTERS = ("wbcatt", "cbis_ddsm", "skincon", "mimic_cxr", "captions")
# The blocks of `baselines:` and the dataclass each is generated from (module, class); the
# fields the workflow fills itself are not keys (paths, seed, judge, and the inference
# settings, which come from the `evaluate` block).
BASELINE_BLOCKS = {
    "instructions": ("medift.instructions", "InstructionConfig", "INSTRUCTION_LIMITS"),
    "candidates": ("medift.vital", "CandidateConfig", "CANDIDATE_LIMITS"),
    "selection": ("medift.vital", "SelectConfig", "SELECT_LIMITS"),
    "preferences": ("medift.self_training", "PreferenceConfig", "PREFERENCE_LIMITS"),
}
BASELINE_JOB_FIELDS = (
    "shards",
    "out_dir",
    "base_model",
    "model",
    "candidates",
    "judge",
    "judge_cache",
    "seed",
    "batch_size",
    "dtype",
    "device",
    "threads",
    "trust_remote_code",
    "keep_fraction",
)


def check_method(name: str, entry: dict, methods: dict, without_attributes: list[str]) -> None:
    """A method entry's own keys, before any job: its data source, its start, and that no dataset
    it runs on (`without_attributes`: those whose records have no structured attributes) lacks
    the attributes its generated data asks about."""
    data = entry.get("data", "descriptions")
    if data != "descriptions" and entry.get("proxy", True):
        raise ValueError(f"data {data}: generated instructions and preferences train without a proxy (proxy: false)")
    if data != "vital_select" and "keep_fraction" in entry:
        raise ValueError("keep_fraction is vital_select's setting (data: vital_select)")
    start = entry.get("start_from")
    if data == "preferences" and not start:
        raise ValueError(
            "data preferences needs start_from: the first-stage method whose model asks, answers and is DPO's reference"
        )
    if start is not None:
        seen = [name]
        while start is not None:
            if start not in methods or not methods[start].get("train", True):
                raise ValueError(f"start_from {start!r} is not a trained method under `methods:`")
            if start in seen:
                raise ValueError(f"start_from makes a cycle: {' -> '.join(seen + [start])}")
            seen.append(start)
            start = methods[start].get("start_from")
    if data != "descriptions" and without_attributes:
        raise ValueError(
            f"data {data} asks questions about structured attributes, which dataset(s) "
            f"{', '.join(without_attributes)} do not have (free-text descriptions only): give their releases "
            "labels the adapter reads (captions: `attributes` columns) or leave this method out"
        )


##### checks #####


def check_fields(config, limits: dict) -> None:
    """Each field of a settings dataclass against its limits (field name -> limits; the schema's, generated)."""
    for item in dataclasses.fields(config):
        value, meta = getattr(config, item.name), limits.get(item.name, {})
        if value is None:
            continue  # Optional fields: None is their own meaning (checked by the type)
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"{item.name} must be one of {tuple(meta['choices'])}, got {value!r}")
        if "pattern" in meta and not re.match(meta["pattern"], str(value)):
            raise ValueError(f"{item.name} {value!r} does not match {meta['pattern']}")
        if "exclusive_minimum" in meta and not value > meta["exclusive_minimum"]:
            what = "positive" if meta["exclusive_minimum"] == 0 else f"above {meta['exclusive_minimum']}"
            raise ValueError(f"{item.name} must be {what}, got {value}")
        if "minimum" in meta and value < meta["minimum"]:
            what = "cannot be negative" if meta["minimum"] == 0 else f"must be at least {meta['minimum']}"
            raise ValueError(f"{item.name} {what}, got {value}")
        if "maximum" in meta and value > meta["maximum"]:
            raise ValueError(f"{item.name} must be at most {meta['maximum']}, got {value}")


def check_offload(zero_stage: int, offload: str) -> None:
    """Offload needs ZeRO: the optimizer state stage 2 or 3, the parameters stage 3."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    if offload != "none" and zero_stage < 2:
        raise ValueError(f"offload {offload} needs zero_stage 2 or 3, not {zero_stage}")
    if offload == "optimizer+parameters" and zero_stage != 3:
        raise ValueError(f"offload {offload} needs zero_stage 3, not {zero_stage} (offloading parameters)")


def check_train_settings(settings) -> None:
    """The checks across training settings (a mapping with TrainConfig's field names), before any
    model is loaded: TrainConfig.__post_init__ and the workflow's config check call it."""
    check_offload(settings["zero_stage"], settings["offload"])
    groups = [g.strip() for g in settings["train_modules"].split(",")]
    if any(g.startswith("lora") for g in groups) and settings["zero_stage"] == 3:
        raise ValueError(
            "LoRA with ZeRO-3 is not supported (adapters cannot be merged or saved from "
            "partitioned weights); use zero_stage 2"
        )
    if settings["select"] == "best_val" and not settings["validate"]:
        raise ValueError("select best_val needs validate true (the validation accuracy chooses the epoch)")


def proxy_learning_rate(lr: float, proxy_lr: float | None, proxy: bool = True) -> float:
    """The proxy's learning rate: proxy_lr, or unset (None) the model's lr. Without a proxy it is
    lr too (nothing learns at it), so that a workflow job without one does not depend on proxy_lr."""
    return lr if proxy_lr is None or not proxy else proxy_lr


##### command lines #####


def launcher_arguments(ranks: int, program=("-m", "medift.train"), python: str = "python") -> list[str]:
    """The one launcher of a training job on one node: the program itself for one rank, torchrun
    (`--standalone`: a rendezvous of its own on a free port) for several. The workflow's rule,
    the tests and the benchmarks start training through it."""
    if ranks == 1:
        return [python, *program]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(ranks)]
    return [python, *torchrun, *program]


def option_arguments(settings) -> list[str]:
    """`--name value` items of a mapping, as the commands' argument parsers read them."""
    return [item for name, value in settings.items() for item in (f"--{name}", str(value))]


def to_arguments(settings, names) -> str:
    """`--name value` for each of `names` (in that order) from `settings`, as the argument
    parsers of medift's commands read them (booleans True/False, shell-quoted)."""
    return " ".join(f"--{name} {shlex.quote(str(settings[name]))}" for name in names)


##### generated files: the schema's settings and config/README.md's tables #####

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIG_README = REPO / "config" / "README.md"
BEGIN, END = "# BEGIN GENERATED {}", "# END GENERATED {}"
DOC_BEGIN, DOC_END = "<!-- BEGIN GENERATED {} -->", "<!-- END GENERATED {} -->"
WRITE_COMMAND = "python -m medift.settings --write"
JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}


def train_setting_fields() -> tuple[list, dict]:
    """TrainConfig's fields that are keys of the workflow's `train` block (in the dataclass's
    order), and their limits."""
    from medift.train import TRAIN_LIMITS, TrainConfig

    skip = TRAIN_JOB_FIELDS + TRAIN_CLI_ONLY_FIELDS
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in skip], TRAIN_LIMITS


def evaluate_setting_fields() -> tuple[list, dict]:
    """EvaluateConfig's fields that are keys of the workflow's `evaluate` block, and their limits."""
    from medift.evaluate import EVALUATE_LIMITS, EvaluateConfig

    return [f for f in dataclasses.fields(EvaluateConfig) if f.name not in EVALUATE_JOB_FIELDS], EVALUATE_LIMITS


def baseline_setting_fields() -> dict[str, tuple[list, dict]]:
    """Each `baselines:` block's fields (the data-making commands' settings the workflow passes on)
    and their limits."""
    import importlib

    blocks = {}
    for block, (module, name, limits) in BASELINE_BLOCKS.items():
        loaded = importlib.import_module(module)
        fields = [f for f in dataclasses.fields(getattr(loaded, name)) if f.name not in BASELINE_JOB_FIELDS]
        blocks[block] = (fields, getattr(loaded, limits))
    return blocks


def _yaml_scalar(value) -> str:
    """A YAML 1.1 scalar (PyYAML's reading: a float needs its dot, `3.0e-05`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        return mantissa + (f"e{exponent}" if exponent else "")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    import json

    return json.dumps(value)  # a JSON string is a double-quoted YAML string


def _flow(mapping: dict) -> str:
    return "{" + ", ".join(f"{key}: {_yaml_scalar(value)}" for key, value in mapping.items()) + "}"


def _json_type(item):
    name = str(item.type)
    optional = name.startswith("Optional[")
    base = JSON_TYPES[name[len("Optional[") : -1] if optional else name]
    return [base, "null"] if optional else base


def schema_property(item, limits: dict, with_default: bool) -> dict:
    """The JSON-schema property of a dataclass field: type, limits, (default,) help."""
    meta = limits.get(item.name, {})
    prop: dict = {"type": _json_type(item)}
    if "choices" in meta:
        prop["enum"] = list(meta["choices"]) + ([None] if isinstance(prop["type"], list) else [])
    for key, schema_key in (
        ("minimum", "minimum"),
        ("exclusive_minimum", "exclusiveMinimum"),
        ("maximum", "maximum"),
        ("pattern", "pattern"),
    ):
        if key in meta:
            prop[schema_key] = meta[key]
    if with_default:
        prop["default"] = item.default
    prop["description"] = item.metadata["help"]
    return prop


def generated_sections() -> dict[str, list[str]]:
    """Lines (without indentation) of each generated section of the schema."""
    (train, train_limits), (evaluate, evaluate_limits) = train_setting_fields(), evaluate_setting_fields()
    sections = {
        "train_settings": [f"{f.name}: {_flow(schema_property(f, train_limits, with_default=False))}" for f in train],
        "train_defaults": [f"{f.name}: {_flow({'default': f.default})}" for f in train],
        "evaluate": [f"{f.name}: {_flow(schema_property(f, evaluate_limits, with_default=True))}" for f in evaluate],
    }
    for block, (fields, limits) in baseline_setting_fields().items():
        sections[f"baselines_{block}"] = [
            f"{f.name}: {_flow(schema_property(f, limits, with_default=True))}" for f in fields
        ]
    return sections


def _markdown_value(value) -> str:
    return f"`{_yaml_scalar(value).strip(chr(34))}`"


def generated_tables() -> dict[str, list[str]]:
    """Rows of config/README.md's tables of the train and evaluate settings."""

    def rows(fields):
        table = ["| key | default | meaning |", "| --- | --- | --- |"]
        for f in fields:
            help_text = f.metadata["help"].replace("|", "\\|")
            table.append(f"| `{f.name}` | {_markdown_value(f.default)} | {help_text} |")
        return table

    tables = {"train": rows(train_setting_fields()[0]), "evaluate": rows(evaluate_setting_fields()[0])}
    for block, (fields, _) in baseline_setting_fields().items():
        tables[f"baselines_{block}"] = rows(fields)
    return tables


def _replace_sections(text: str, sections: dict[str, list[str]], begin: str, end: str, indent: bool) -> str:
    for name, lines in sections.items():
        pattern = re.compile(
            rf"^([ \t]*){re.escape(begin.format(name))}\n.*?^[ \t]*{re.escape(end.format(name))}\n", re.M | re.S
        )
        match = pattern.search(text)
        if match is None:
            raise ValueError(f"no generated section {name!r} ({begin.format(name)} ... {end.format(name)})")
        pad = match.group(1) if indent else ""
        body = "".join(f"{pad}{line}\n" for line in lines)
        replacement = f"{pad}{begin.format(name)}\n{body}{pad}{end.format(name)}\n"
        text = text[: match.start()] + replacement + text[match.end() :]
    return text


def generated_schema(text: str) -> str:
    return _replace_sections(text, generated_sections(), BEGIN, END, indent=True)


def generated_readme(text: str) -> str:
    return _replace_sections(text, generated_tables(), DOC_BEGIN, DOC_END, indent=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m medift.settings",
        description=(
            "Rewrite the generated settings of workflow/schemas/config.schema.yaml and config/README.md "
            "from medift.train.TrainConfig and medift.evaluate.EvaluateConfig."
        ),
    )
    parser.add_argument("--write", action="store_true", help="Rewrite the files (default: report which differ).")
    args = parser.parse_args(argv)
    stale = []
    for path, generate in ((SCHEMA, generated_schema), (CONFIG_README, generated_readme)):
        text = path.read_text()
        new = generate(text)
        if new != text:
            stale.append(path)
            if args.write:
                path.write_text(new)
    for path in stale:
        print(f"{'rewrote' if args.write else 'out of date'}: {path.relative_to(REPO)}", file=sys.stderr)
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    raise SystemExit(main())
