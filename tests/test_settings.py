"""One source of truth for the training and evaluation settings (medift/settings.py).

The dataclasses hold each setting's default, help and limits; the workflow's schema and
config/README.md hold generated copies (checked here to be current), the checks across
settings are one function that the CLI and the workflow both call, and the workflow's jobs
pass exactly their settings to medift's argument parsers (checked on a dry run).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex

import pytest
import yaml
from transformers import HfArgumentParser

from medift import settings
from medift.evaluate import EvaluateConfig
from medift.train import TrainConfig
from tests.fixtures.workflow import DEFAULT_CONFIG, REPO, snakemake, write_config

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def test_committed_schema_and_readme_are_the_generated_ones():
    """`python -m medift.settings --write` would change nothing."""
    assert settings.generated_schema(SCHEMA.read_text()) == SCHEMA.read_text(), "run python -m medift.settings --write"
    readme = settings.CONFIG_README.read_text()
    assert settings.generated_readme(readme) == readme, "run python -m medift.settings --write"


def test_schema_defaults_types_and_help_are_the_dataclasses():
    schema = yaml.safe_load(SCHEMA.read_text())
    train_fields, _ = settings.train_setting_fields()
    properties = schema["$defs"]["train_settings"]["properties"]
    defaults = schema["properties"]["train"]["properties"]
    assert list(properties) == [f.name for f in train_fields] + list(settings.TRAIN_WORKFLOW_KEYS)
    for item in train_fields:
        assert defaults[item.name] == {"default": item.default}, item.name
        assert properties[item.name]["description"] == item.metadata["help"]
    evaluate_fields, _ = settings.evaluate_setting_fields()
    evaluate = schema["properties"]["evaluate"]["properties"]
    assert list(evaluate) == [f.name for f in evaluate_fields] + list(settings.EVALUATE_WORKFLOW_KEYS)
    for item in evaluate_fields:
        assert (
            evaluate[item.name]["default"] == item.default
            and evaluate[item.name]["description"] == item.metadata["help"]
        )


def test_the_shipped_config_sets_the_defaults_where_it_names_a_setting():
    """config/config.yaml's train and evaluate values are the defaults (it documents them)."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    train_defaults = {f.name: f.default for f in settings.train_setting_fields()[0]}
    for key, value in config["train"].items():
        if key in train_defaults:
            assert value == train_defaults[key], key
    evaluate_defaults = {f.name: f.default for f in settings.evaluate_setting_fields()[0]}
    for key, value in config["evaluate"].items():
        if key in evaluate_defaults:
            assert value == evaluate_defaults[key], key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(zero_stage=1, offload="optimizer"), "offload optimizer needs zero_stage 2 or 3, not 1"),
        (dict(zero_stage=2, offload="optimizer+parameters"), "offload optimizer+parameters needs zero_stage 3, not 2"),
        (dict(zero_stage=3, train_modules="vision,lora"), "LoRA with ZeRO-3 is not supported"),
        (dict(select="best_val", validate=False), "select best_val needs validate true"),
    ],
)
def test_the_cli_and_the_workflow_share_the_checks_across_settings(tmp_path, change, message):
    defaults = {f.name: f.default for f in settings.train_setting_fields()[0]}
    with pytest.raises(ValueError, match=re.escape(message)):
        settings.check_train_settings({**defaults, **change})
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(shards="x", base_model="y", out_dir="z", **change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(epochs=0), "epochs must be at least 1, got 0"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(momentum=1.5), "momentum must be at most 1"),
        (dict(lora_save="both"), "lora_save must be one of ('merged', 'adapter')"),
        (dict(data_workers=-1), "data_workers cannot be negative"),
        (dict(train_modules="vision,decoder"), "unknown train_modules"),
    ],
)
def test_each_setting_has_one_limit(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(shards="x", base_model="y", out_dir="z", **change)


def test_evaluate_settings_are_checked():
    with pytest.raises(ValueError, match="device 'gpu' does not match"):
        EvaluateConfig(model="m", shards="s", out="o", summary="j", device="gpu")
    with pytest.raises(ValueError, match="scoring must be one of"):
        EvaluateConfig(model="m", shards="s", out="o", summary="j", scoring="logits")


def test_an_unset_proxy_lr_is_lr():
    assert settings.proxy_learning_rate(2e-5, None) == 2e-5
    assert settings.proxy_learning_rate(2e-5, 3e-3) == 3e-3
    assert settings.proxy_learning_rate(2e-5, 3e-3, proxy=False) == 2e-5  # no proxy: nothing learns at it
    assert TrainConfig(shards="x", base_model="y", out_dir="z", lr=2e-5, proxy_lr=None).proxy_learning_rate == 2e-5


def test_the_workflow_shares_the_embedded_facts_and_the_cpu_count():
    """common.smk reads them from medift/settings.py, which medift's own modules import too."""
    from medift.embedded.llava import EMBEDDED_DATASETS, EmbeddedModelConfig
    from medift.prepare import ShardsConfig

    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "EMBEDDED_DATASETS = SETTINGS.EMBEDDED_DATASETS" in common
    assert (
        "EMBEDDED_IMAGE_SIZE = SETTINGS.EMBEDDED_IMAGE_SIZE" in common
        and "CPU_SLOTS = SETTINGS.available_cpus()" in common
    )
    assert EMBEDDED_DATASETS is settings.EMBEDDED_DATASETS
    assert (
        EmbeddedModelConfig().image_size == ShardsConfig("x", "y", "z", "r").image_size == settings.EMBEDDED_IMAGE_SIZE
    )
    assert not re.search(r"sched_getaffinity|cpu_count|= 64\b", common)


##### the workflow's jobs pass their settings, and only them #####


def _expected_train_settings(config: dict, dataset: str, method: str) -> dict:
    """A job's train settings derived here from the config and the dataclass's defaults (not by
    the workflow): defaults < global train < the dataset's < the method's; proxy_lr null (or no
    proxy) = lr; the accumulation of global_batch."""
    fields, _ = settings.train_setting_fields()
    merged = {f.name: f.default for f in fields}
    merged.update(ranks=1, nodes=1)
    entry = {k: v for k, v in config["methods"][method].items() if k != "train"}
    merged.update({**config["train"], **config["datasets"][dataset].get("train", {}), **entry})
    if merged["proxy_lr"] is None or not merged["proxy"]:
        merged["proxy_lr"] = merged["lr"]
    world = merged["ranks"] * merged["nodes"]
    if merged["global_batch"] is not None:
        merged["gradient_accumulation"] = merged["global_batch"] // (merged["batch_size"] * world)
    merged["global_batch"] = merged["batch_size"] * merged["gradient_accumulation"] * world
    return {f.name: merged[f.name] for f in fields}


def _dry_run_commands(tmp_path, config: dict) -> str:
    configfile = write_config(tmp_path / "config.yaml", config)
    result = snakemake(
        "-n", "-p", f"--configfile={configfile}", "results/table1.csv", "results/table2.csv", workdir=tmp_path / "work"
    )
    return result.stdout + result.stderr


def _options(command: str, module: str) -> list[str]:
    """The options after `-m <module>` of a job's shell command, up to its --threads (a shell expression)."""
    words = shlex.split(command.split(f"-m {module} ", 1)[1].split(" > logs/")[0])
    return words[: words.index("--threads")]


@pytest.mark.parametrize("variant", ["shipped", "changed"])
def test_train_jobs_pass_exactly_their_settings(tmp_path, variant, monkeypatch):
    """Every training job's options, read by TrainConfig's own argument parser, are the job's
    settings as derived from the config here (config/config.yaml, and with settings changed)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if variant == "changed":
        config = copy.deepcopy(config)
        config["train"].update(proxy_lr=None, batch_size=4, global_batch=8, gradient_checkpointing=True)
        config["datasets"]["cbis_ddsm"]["train"].update(repeat_train=3, shuffle_window=2)
        config["methods"]["ift_no_momentum"].update(lr=1.0e-4, offload="optimizer", select="best_val")
    output = _dry_run_commands(tmp_path, config)
    commands = re.findall(r"^Shell command: (.*medift\.train .*)$", output, re.M)
    assert len(commands) == 10
    fields = [f.name for f in settings.train_setting_fields()[0]]
    for command in commands:
        dataset, method, seed = re.search(r"--out_dir resources/models/(\w+)/(\w+)/seed-(\d+) ", command).groups()
        (parsed,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(_options(command, "medift.train"))
        assert {name: getattr(parsed, name) for name in fields} == _expected_train_settings(config, dataset, method)
        assert (parsed.shards, parsed.seed) == (f"resources/shards/{dataset}", int(seed))
        assert parsed.checkpoint_dir == f"resources/checkpoints/{dataset}/{method}/seed-{seed}"
        assert parsed.tensorboard_dir == f"logs/tensorboard/{dataset}/{method}/seed-{seed}"
    evaluations = re.findall(r"^Shell command: (.*medift\.evaluate .*)$", output, re.M)
    assert len(evaluations) == 12
    for command in evaluations:
        (parsed,) = HfArgumentParser(EvaluateConfig).parse_args_into_dataclasses(_options(command, "medift.evaluate"))
        for item in settings.evaluate_setting_fields()[0]:
            assert getattr(parsed, item.name) == config["evaluate"][item.name], item.name
        assert parsed.descriptions.endswith("/descriptions.csv") and parsed.adapter in ("wbcatt", "cbis_ddsm")


def test_every_train_setting_but_threads_is_a_job_parameter():
    """train.smk's params: the settings dict (so that a changed setting reruns the job); the
    options string is derived (from `input`), and the shell lists no setting by hand."""
    rule = (REPO / "workflow" / "rules" / "train.smk").read_text()
    assert "settings=get_train_params," in rule and "args=lambda wildcards, input: get_train_args(wildcards)" in rule
    assert "params.settings[" not in rule.split("shell:")[1].replace("params.settings[accelerator]", "").replace(
        "params.settings[ranks]", ""
    )
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert 'if k != "threads"' in common
    evaluate = (REPO / "workflow" / "rules" / "evaluate.smk").read_text()
    assert "**get_evaluate_params()," in evaluate and "--split" not in evaluate


def test_each_path_template_is_spelled_once():
    rules = {path.name: path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk")}
    for template in (
        "resources/shards/{dataset}",
        "resources/models/{dataset}",
        "results/{dataset}/{method}",
        "resources/raw/{dataset}",
        "resources/checkpoints/",
        "logs/tensorboard/",
        "results/{table}.csv",
        "resources/generated/",
        "resources/judge-cache",
    ):
        spelled = sum(text.count(template) for text in rules.values())
        assert spelled == 1, (template, spelled)
    assert ".replace(" not in rules["common.smk"]
    assert "def get_shards_dir(" not in rules["common.smk"] and "def get_methods(" not in rules["common.smk"]


def test_to_arguments_quotes_for_the_shell():
    assert (
        settings.to_arguments({"a": "x y", "b": True, "c": None, "d": 3e-05}, ["a", "b", "c", "d"])
        == "--a 'x y' --b True --c None --d 3e-05"
    )
    assert dataclasses.is_dataclass(TrainConfig)
