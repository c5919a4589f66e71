import importlib.util
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")


# Jobs call `python -m medift...`: put the interpreter that runs Snakemake first on the
# jobs' PATH, so that `.venv/bin/snakemake` works without activating the venv. (This sets
# PATH rather than reading a variable the user must provide, hence no `envvars:`.) Under
# `--sdm conda` each job activates its conda environment after this, which then comes first.
os.environ.update(
    PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
)

# The embedded models (committed; `base_model.path` names them): the default is the tiny
# Mllama (rule distill_base_model), distilled from the tiny LLaVA (rule pretrain_base_model).
EMBEDDED_MODEL_DIRS = {"embedded": "models/embedded-mllama", "embedded_llava": "models/embedded-base"}

##### path templates (every rule file uses these) #####

RAW_DIR = "resources/raw/{dataset}"  # a synthetic release (source: synthetic)
SYNTHETIC_MARKER = f"{RAW_DIR}/.synthetic.done"
SHARDS_DIR = "resources/shards/{dataset}"
SHARDS_MANIFEST = f"{SHARDS_DIR}/manifest.json"
DATA_REPORT = "results/{dataset}/data_report.json"
MODEL_DIR = "resources/models/{dataset}/{method}/seed-{seed}"  # a tuned model
# Not outputs of train_model: Snakemake deletes a failed job's outputs, and these must outlive it.
CHECKPOINT_DIR = "resources/checkpoints/{dataset}/{method}/seed-{seed}"
TENSORBOARD_DIR = "logs/tensorboard/{dataset}/{method}/seed-{seed}"
RESULTS_DIR = "results/{dataset}/{method}/seed-{seed}"  # an evaluation's files
BENCHMARK_DIR = "resources/benchmarks/{benchmark}"  # an evaluation-only benchmark's shards
BENCHMARK_REPORT = "results/benchmarks/{benchmark}/data_report.json"
# Training data a baseline's data-making jobs generate (workflow/rules/baselines.smk).
GENERATED_DIR = "resources/generated/{dataset}"
INSTRUCTIONS_DIR = f"{GENERATED_DIR}/instructions"  # inst_ft, st_dpo's first stage
CANDIDATES_DIR = f"{GENERATED_DIR}/candidates"  # vital_select's rated candidates
SELECTED_DIR = f"{GENERATED_DIR}/{{method}}/selected"  # what one vital_select method keeps
PREFERENCES_DIR = f"{GENERATED_DIR}/{{method}}/seed-{{seed}}/preferences"  # st_dpo's pairs
JUDGE_CACHE = "resources/judge-cache"  # a hosted judge's calls and replies
TABLE_CSV = "results/{table}.csv"
BASE_MODEL_RESULT = "results/base_model.json"


def model_file(name):
    """Template of a file of a tuned model (MODEL_DIR)."""
    return f"{MODEL_DIR}/{name}"


def generated_manifest(directory):
    """The manifest of a directory of generated rows (written last: the data-making job's output)."""
    return f"{directory}/manifest.json"


def result_file(name):
    """Template of a file of an evaluation (RESULTS_DIR)."""
    return f"{RESULTS_DIR}/{name}"


def _load_medift_module(relative_path):
    """One standard-library-only file of medift (the family table, the GPU allocator, the batch
    rule), without importing medift's package (a conda driver environment may lack its
    dependencies)."""
    path = Path(workflow.basedir).parent / "medift" / relative_path
    spec = importlib.util.spec_from_file_location(f"medift_{path.stem}", path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up while the file runs
    spec.loader.exec_module(loaded)
    return loaded


FAMILIES = _load_medift_module("model/families.py")
GPUS = _load_medift_module("gpus.py")  # which cards a local job takes (python -m medift.gpus)
BATCHING = _load_medift_module("batching.py")  # global batch = batch_size x accumulation x ranks x nodes
# The settings' checks across keys, the proxy's lr, command lines, shared facts (medift/settings.py).
SETTINGS = _load_medift_module("settings.py")
# Datasets whose words the embedded model's closed vocabulary holds, and its image side.
EMBEDDED_DATASETS = SETTINGS.EMBEDDED_DATASETS
ADAPTERS = SETTINGS.ADAPTERS  # the adapters medift.datasets provides
EMBEDDED_IMAGE_SIZE = SETTINGS.EMBEDDED_IMAGE_SIZE


##### CPU slots #####

# A job's torch threads come from its `threads` (medift clamps them to the CPUs it may
# use). `--cores` alone does not stop `--cores 8` on a 2-core machine from running four
# 2-thread jobs at once, and oversubscribed OpenMP threads slow every matmul down; so the
# heavy rules also take `cpu_slots`, of which a local run has as many as this machine has
# CPUs. `--resources cpu_slots=N` overrides it; cluster executors are not limited by it.
CPU_SLOTS = SETTINGS.available_cpus()
if workflow.local_exec and "cpu_slots" not in workflow.global_resources:
    workflow.register_resource("cpu_slots", CPU_SLOTS)


def get_cpu_slots(wildcards, threads):
    return min(threads, CPU_SLOTS)


##### GPU cards #####

# Snakemake limits how many GPU jobs run at once (each job asks for `gpu`: its ranks, or 1
# for an evaluation) but not which card each one takes; a local job's command is started
# through `python -m medift.gpus --take N`, which locks N free cards of the machine and sets
# CUDA_VISIBLE_DEVICES (medift/gpus.py). The cards: CUDA_VISIBLE_DEVICES's list where
# Snakemake runs, else `gpus`, else as many as `nvidia-smi -L` lists (none without it, so
# that a dry run or CI needs no GPU). Under SLURM the jobs' cards are SLURM's assignment.
USER_GPU_LIMIT = "gpu" in workflow.global_resources  # --resources gpu=N wins


def _may_use_cards():
    """Whether any job may run on a GPU (only then is the machine asked for its cards)."""
    evaluate_device = config["evaluate"]["device"]
    return evaluate_device != "cpu" or any(s["accelerator"] == "cuda" for s in _train_jobs_settings())


def _local_cards():
    try:
        return GPUS.card_pool(os.environ.get("CUDA_VISIBLE_DEVICES"), config["gpus"]) if _may_use_cards() else []
    except ValueError as error:
        raise WorkflowError(f"gpus: {error}")


def check_cards(needed, what):
    """Part of an input function of a GPU job (no files): a local run caps the jobs' `gpu` at the
    machine's cards, and refuses a job that needs more cards than the machine has, before any job
    runs (Snakemake would silently shrink its `gpu` to the cap, and its ranks would find no card).
    Under the SLURM executor SLURM places the jobs; a dry run on a machine without cards checks nothing."""
    executor = getattr(workflow.executor_plugin, "name", None)
    if needed == 0 or executor in ("slurm", "slurm-jobstep") or not workflow.local_exec:
        return []
    if LOCAL_CARDS and not USER_GPU_LIMIT:
        workflow.register_resource("gpu", len(LOCAL_CARDS))
    if (workflow.dryrun or workflow.touch) and not LOCAL_CARDS:
        return []
    if needed > len(LOCAL_CARDS):
        raise WorkflowError(
            f"{what} needs {needed} GPU card(s), but this machine has {len(LOCAL_CARDS)}"
            f" ({','.join(LOCAL_CARDS) or 'none found: set `gpus` or CUDA_VISIBLE_DEVICES'})"
        )
    return []


##### configuration checks the schema cannot express #####


def _check_config():
    for name, entry in config["datasets"].items():
        if entry["source"] == "none":
            if entry["eval_from"] is None:
                raise WorkflowError(
                    f"datasets.{name}: source none (no tuning data) is an evaluation-only column: set eval_from"
                )
            trained = sorted({m for methods in config["tables"].values() for m in methods if is_trained(m)})
            if trained:
                raise WorkflowError(
                    f"datasets.{name}: an evaluation-only column (source none) has no tuning data for the trained "
                    f"methods {', '.join(trained)} of the tables; evaluate them on its benchmark through a dataset "
                    "with tuning data (eval_from) instead"
                )
            continue
        adapter = entry["adapter"] or name
        if adapter not in ADAPTERS:
            raise WorkflowError(
                f"datasets.{name}: no adapter {adapter!r}; name the entry after one of "
                f"{', '.join(ADAPTERS)} or set `adapter:`"
            )
        if adapter == "captions" and (entry["source"] != "raw" or not entry["captions"].get("file")):
            raise WorkflowError(
                f"datasets.{name}: the captions adapter reads your own files: set source: raw, raw_dir and "
                "captions: {file: ...} (docs/data.md, your own data)"
            )
        if adapter != "captions" and entry["captions"]:
            raise WorkflowError(f"datasets.{name}: `captions:` options are for adapter: captions only")
        if is_embedded_base() and adapter not in EMBEDDED_DATASETS:
            raise WorkflowError(
                f"datasets.{name}: the embedded base model's vocabulary covers only "
                f"{', '.join(EMBEDDED_DATASETS)}; {adapter} needs a real checkpoint (base_model.path)"
            )
    for method, baseline in get_comparison_pairs():
        unknown = [m for m in (method, baseline) if m not in config["methods"]]
        if unknown:
            raise WorkflowError(f"comparisons: methods {unknown} are not configured under `methods:`")
        if method == baseline:
            raise WorkflowError(f"comparisons: {method} is compared with itself")
    for table, methods in config["tables"].items():
        unknown = [m for m in methods if m not in config["methods"]]
        if unknown:
            raise WorkflowError(
                f"tables.{table}: methods {unknown} are not configured under `methods:`"
            )
    if not is_embedded_base():
        path = Path(config["base_model"]["path"])
        if not (path / "config.json").is_file():
            raise WorkflowError(
                f"base_model.path {str(path)!r} is not a Hugging Face checkpoint directory "
                f"(no config.json); use one of {', '.join(EMBEDDED_MODEL_DIRS)} for an embedded model"
            )
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type not in FAMILIES.FAMILIES and not config["base_model"]["trust_remote_code"]:
            raise WorkflowError(
                f"base_model.path {str(path)!r}: model_type {model_type!r} is not a known VLM family "
                f"({', '.join(sorted(FAMILIES.FAMILIES))}); add it to medift/model/families.py"
            )
    without_attributes = [n for n, e in config["datasets"].items() if e["source"] != "none" and not has_attributes(n)]
    for method, entry in config["methods"].items():
        try:
            SETTINGS.check_method(method, entry, config["methods"], without_attributes)
        except ValueError as error:
            raise WorkflowError(f"methods.{method}: {error}")
    for method in get_trained_methods():
        for dataset in config["datasets"]:
            try:
                # The global batch rule (medift/batching.py), then medift.train's own checks across
                # settings (medift/settings.py): the job would fail on them at its start.
                SETTINGS.check_train_settings(get_train_settings(SimpleNamespace(method=method, dataset=dataset)))
            except ValueError as error:
                raise WorkflowError(f"methods.{method} on {dataset}: {error}")
    for name, entry in config["datasets"].items():
        if entry["eval_from"] is not None and entry["eval_from"] not in config["benchmarks"]:
            raise WorkflowError(
                f"datasets.{name}.eval_from: no benchmark {entry['eval_from']!r} under `benchmarks:` "
                f"({', '.join(config['benchmarks']) or 'none configured'})"
            )
    if config["evaluate"]["device"].startswith("cuda:"):
        raise WorkflowError(
            f"evaluate.device {config['evaluate']['device']}: the workflow gives each evaluation job a card of "
            "its own (CUDA_VISIBLE_DEVICES); use `cuda`, and CUDA_VISIBLE_DEVICES or `gpus` to choose the cards"
        )
    nodes = {settings["nodes"] for settings in _train_jobs_settings()}
    if max(nodes, default=1) > 1:
        if 1 in nodes:
            raise WorkflowError(
                "train.nodes: every training job spans one node or every job several "
                f"(here {sorted(nodes)}); set nodes in the global train block"
            )


##### image size #####


def get_image_size():
    """The side of the stored images: `image_size`, or with `auto` the base model's own."""
    if config["image_size"] != "auto":
        return config["image_size"]
    if is_embedded_base():
        return EMBEDDED_IMAGE_SIZE
    try:
        return FAMILIES.native_image_size(config["base_model"]["path"])
    except (OSError, ValueError) as error:
        raise WorkflowError(f"image_size: auto: {error}")


##### wildcard constraints #####


def _alternatives(names):
    return "|".join(re.escape(name) for name in names)


wildcard_constraints:
    benchmark=_alternatives(config["benchmarks"]) or "^$",
    dataset=_alternatives(config["datasets"]),
    method=_alternatives(config["methods"]),
    table=_alternatives(config["tables"]),
    seed=_alternatives(str(seed) for seed in config["seeds"]),


##### datasets #####


def get_datasets():
    """Configured datasets, in table column order."""
    return list(config["datasets"])


def get_evaluation_only_datasets():
    """Datasets without tuning data (source none): their questions are a benchmark's, nothing is described."""
    return [name for name, entry in config["datasets"].items() if entry["source"] == "none"]


def get_tuning_datasets():
    return [name for name in config["datasets"] if name not in get_evaluation_only_datasets()]


def get_dataset_config(wildcards):
    return config["datasets"][wildcards.dataset]


def has_attributes(dataset):
    """Whether a dataset's records carry structured attributes (generated instructions, the judge)."""
    entry = config["datasets"][dataset]
    adapter = entry["adapter"] or dataset
    if adapter == "captions":
        return bool(entry["captions"].get("attributes"))
    return adapter in SETTINGS.ADAPTERS_WITH_ATTRIBUTES


def get_adapter_options(wildcards):
    """The adapter's options as `python -m medift.prepare shards` takes them (captions only)."""
    options = get_dataset_config(wildcards)["captions"]
    return f"--adapter_options {shlex.quote(json.dumps(options, sort_keys=True))}" if options else ""


def get_adapter(wildcards):
    """medift's dataset adapter of the dataset (its name unless `adapter:` is set)."""
    return get_dataset_config(wildcards)["adapter"] or wildcards.dataset


def get_synthetic_settings(wildcards):
    return get_dataset_config(wildcards)["synthetic"]


def get_raw_dir(wildcards):
    """Root of the raw release: generated under resources/raw/ or the configured raw_dir."""
    entry = get_dataset_config(wildcards)
    if entry["source"] == "synthetic":
        return RAW_DIR.format(dataset=wildcards.dataset)
    return entry["raw_dir"]


def get_raw_input(wildcards):
    """What the shards depend on: the synthetic generator's marker, or the real release."""
    if get_dataset_config(wildcards)["source"] == "synthetic":
        return SYNTHETIC_MARKER.format(dataset=wildcards.dataset)
    return get_dataset_config(wildcards)["raw_dir"]


##### base model #####


def is_embedded_base():
    return config["base_model"]["path"] in EMBEDDED_MODEL_DIRS


def get_base_model():
    """Directory of the base model: an embedded model, or the configured checkpoint."""
    return EMBEDDED_MODEL_DIRS.get(config["base_model"]["path"], config["base_model"]["path"])


def get_base_model_files():
    """Files whose change makes every model-dependent job out of date.

    For an embedded model these are outputs of rule distill_base_model or
    pretrain_base_model (committed, so neither runs on a fresh clone); a real checkpoint
    (possibly with sharded weights) is represented by its config.json, so those rules are
    then not in the DAG.
    """
    if is_embedded_base():
        return [f"{get_base_model()}/config.json", f"{get_base_model()}/model.safetensors"]
    return [os.path.join(config["base_model"]["path"], "config.json")]


##### methods and training #####


def get_trained_methods():
    """Methods that have a fine-tuning job (all but those with `train: false`)."""
    return [m for m, entry in config["methods"].items() if entry["train"]]


def is_trained(method):
    return config["methods"][method]["train"]


def get_train_settings(wildcards):
    """Train settings of one (dataset, method): global < dataset's `train` < method.

    Depends on nothing but the global block, this dataset's block and this method's entry,
    so editing one dataset's settings only makes that dataset's jobs out of date.
    """
    method = {k: v for k, v in config["methods"][wildcards.method].items() if k not in SETTINGS.METHOD_KEYS}
    settings = {**config["train"], **get_dataset_config(wildcards)["train"], **method}
    # null: the proxy learns at the model's lr; without a proxy lr too, so that changing
    # proxy_lr does not make the caption_ft jobs out of date (medift/settings.py).
    settings["proxy_lr"] = SETTINGS.proxy_learning_rate(settings["lr"], settings["proxy_lr"], settings["proxy"])
    # The accumulation that gives `global_batch` (null: the one set); global_batch then states
    # what the job runs with, and medift.train checks it against its launcher's ranks.
    world = settings["ranks"] * settings["nodes"]
    settings["gradient_accumulation"] = BATCHING.resolve_accumulation(
        settings["global_batch"], settings["batch_size"], settings["gradient_accumulation"], world
    )
    settings["global_batch"] = settings["batch_size"] * settings["gradient_accumulation"] * world
    return dict(sorted(settings.items()))


def get_train_params(wildcards):
    """The train settings that are job parameters: all but `threads`, which changes no result."""
    return {k: v for k, v in get_train_settings(wildcards).items() if k != "threads"}


# The workflow's settings as they are medift's command-line options, in the dataclasses' order:
# the schema's properties (generated from TrainConfig and EvaluateConfig) but the workflow's own keys.
_SCHEMA = yaml.safe_load((Path(workflow.basedir) / "schemas" / "config.schema.yaml").read_text())
TRAIN_ARGUMENTS = [k for k in _SCHEMA["$defs"]["train_settings"]["properties"] if k not in SETTINGS.TRAIN_WORKFLOW_KEYS]
EVALUATE_ARGUMENTS = [k for k in _SCHEMA["properties"]["evaluate"]["properties"] if k not in SETTINGS.EVALUATE_WORKFLOW_KEYS]


def get_train_args(wildcards):
    """The job's train settings as `python -m medift.train` options (`--lr 3e-05 ...`)."""
    return SETTINGS.to_arguments(get_train_settings(wildcards), TRAIN_ARGUMENTS)


def get_evaluate_params():
    """The evaluate settings that are job parameters of evaluate_model: all but `threads` (and
    `describe`, which decides the job's outputs)."""
    return {k: config["evaluate"][k] for k in EVALUATE_ARGUMENTS}


def get_evaluate_args(wildcards):
    """The evaluate settings as `python -m medift.evaluate` options."""
    return SETTINGS.to_arguments(config["evaluate"], EVALUATE_ARGUMENTS)


##### the baselines' data (workflow/rules/baselines.smk) #####


def get_method_data(method):
    """What a method trains on (`data`: descriptions, instructions, vital_select, preferences)."""
    return config["methods"][method].get("data", "descriptions")


def get_methods_with_data(data):
    return [m for m in get_trained_methods() if get_method_data(m) == data]


def get_train_data_dir(wildcards):
    """The generated rows a training job reads (--train_data), or None for the descriptions."""
    data = get_method_data(wildcards.method)
    template = {"instructions": INSTRUCTIONS_DIR, "vital_select": SELECTED_DIR, "preferences": PREFERENCES_DIR}
    if data == "descriptions":
        return None
    return template[data].format(dataset=wildcards.dataset, method=wildcards.method, seed=wildcards.seed)


def get_train_data_input(wildcards):
    """Input of train_model: the manifest of its generated rows (none for the descriptions)."""
    directory = get_train_data_dir(wildcards)
    return [] if directory is None else [generated_manifest(directory)]


def get_train_data_option(wildcards):
    directory = get_train_data_dir(wildcards)
    return "" if directory is None else f"--train_data {directory}"


def get_start_model_files(wildcards):
    """The model a training job starts from: the base model, or start_from's tuned model."""
    start = config["methods"][wildcards.method].get("start_from")
    if start is None:
        return get_base_model_files()
    model_dir = MODEL_DIR.format(dataset=wildcards.dataset, method=start, seed=wildcards.seed)
    return [f"{model_dir}/config.json", f"{model_dir}/model.safetensors"]


def get_baseline_settings(block):
    """One `baselines:` block's settings (every key: the schema fills the defaults)."""
    return dict(sorted(config["baselines"][block].items()))


def get_baseline_args(block, extra=None):
    """A data-making job's options: its block's settings, then `extra` (method keys)."""
    settings = {**get_baseline_settings(block), **(extra or {})}
    return SETTINGS.to_arguments(settings, list(settings))


def get_inference_args():
    """The evaluate block's inference settings, which the data-making jobs share."""
    return SETTINGS.to_arguments(config["evaluate"], ["batch_size", "dtype", "device"])


def get_judge_args():
    return f"--judge {shlex.quote(json.dumps(config['judge'], sort_keys=True))} --judge_cache {JUDGE_CACHE}"


def get_keep_fraction(wildcards):
    return {"keep_fraction": config["methods"][wildcards.method].get("keep_fraction", 0.4)}


def get_cost_files(method, dataset, seed):
    """The files that say what one (method, dataset, seed) cost: the train summaries of the method
    and of the methods it starts from, and the manifests of their generated data."""
    files = []
    while method is not None and is_trained(method):
        wildcards = SimpleNamespace(method=method, dataset=dataset, seed=str(seed))
        files.append(model_file("train_summary.json").format(dataset=dataset, method=method, seed=seed))
        if get_method_data(method) == "vital_select":
            files.append(generated_manifest(CANDIDATES_DIR).format(dataset=dataset))
        files += get_train_data_input(wildcards)
        method = config["methods"][method].get("start_from")
    return files


def get_table_costs(wildcards):
    """`method:dataset:seed:file` of every cost file of the table's (method, seed, dataset)."""
    return [
        f"{method}:{dataset}:{seed}:{path}"
        for method in get_table_methods(wildcards)
        for seed in get_method_seeds(method)
        for dataset in get_datasets()
        for path in get_cost_files(method, dataset, seed)
    ]


def get_table_cost_inputs(wildcards):
    return [entry.split(":", 3)[3] for entry in get_table_costs(wildcards)]


def get_train_threads(wildcards):
    """A training job's threads: `threads` for each of its ranks."""
    settings = get_train_settings(wildcards)
    return settings["threads"] * settings["ranks"]


def get_train_launcher(wildcards, threads):
    """The one launcher of a training job: the module itself for one rank, torchrun for several
    (--standalone: a rendezvous of the job's own on a free port, so jobs run side by side).

    Several nodes (SLURM only): srun starts one torchrun per node of the allocation, which
    meet in a c10d rendezvous on the first node of $SLURM_JOB_NODELIST (port from the job id,
    so two jobs sharing that node do not collide); the arguments that follow the launcher
    in the rule's shell command reach medift.train through "$@". The job step's CPUs are
    the job's threads (the plugin's job step does not pass SLURM_CPUS_PER_TASK on).
    """
    settings = get_train_settings(wildcards)
    ranks, nodes = settings["ranks"], settings["nodes"]
    if nodes > 1:
        torchrun = (
            f"python -m torch.distributed.run --nnodes {nodes} --nproc_per_node {ranks}"
            " --rdzv_backend c10d"
            ' --rdzv_endpoint "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
            ':$((29500 + SLURM_JOB_ID % 10000))"'
            ' --rdzv_id "$SLURM_JOB_ID" -m medift.train "$@"'
        )
        return (
            f"srun --nodes {nodes} --ntasks {nodes} --ntasks-per-node 1"
            f" --cpus-per-task {threads} bash -c '{torchrun}' medift.train"
        )
    return _on_cards(get_train_gpus(wildcards), " ".join(SETTINGS.launcher_arguments(ranks)))


def _on_cards(cards, command):
    """`command` started on `cards` GPU cards of its own (medift/gpus.py); as it is without cards."""
    return f"python -m medift.gpus --take {cards} -- {command}" if cards else command


def check_train_cards(wildcards):
    """Input function of train_model (no files): the job's ranks fit the machine's cards (check_cards)."""
    settings = get_train_settings(wildcards)
    if settings["nodes"] > 1:
        return []  # SLURM only
    return check_cards(get_train_gpus(wildcards), f"train_model {wildcards.dataset}/{wildcards.method} (ranks {settings['ranks']})")


def get_evaluate_gpus(wildcards):
    """Cards of an evaluation job: one per rank with evaluate.device cuda, or auto on a machine with cards."""
    device = config["evaluate"]["device"]
    return config["evaluate"]["ranks"] if device == "cuda" or (device == "auto" and LOCAL_CARDS) else 0


def get_evaluate_launcher(wildcards):
    """The evaluation's launcher: the module for one rank, torchrun for several (medift.settings)."""
    return " ".join(SETTINGS.launcher_arguments(config["evaluate"]["ranks"], ("-m", "medift.evaluate")))


def check_evaluate_cards(wildcards):
    """Input function of evaluate_model (no files): see check_cards."""
    return check_cards(get_evaluate_gpus(wildcards), "evaluate_model")


def check_train_executor(wildcards):
    """Input function of train_model (no files). Training on several nodes needs the
    SLURM executor. The executor is known only once the DAG is built (not while this file
    is parsed), so the check runs then, before any job; a dry run (or --touch) is not
    checked, as its executor stands in for the real one."""
    nodes = get_train_settings(wildcards)["nodes"]
    executor = getattr(workflow.executor_plugin, "name", None)
    if nodes > 1 and executor not in ("slurm", "slurm-jobstep", "dryrun", "touch"):
        raise WorkflowError(
            f"train.nodes {nodes}: training on several nodes needs the SLURM executor "
            "(executor: slurm, e.g. --workflow-profile workflow/profiles/slurm); "
            f"this run's executor is {executor}"
        )
    return []


def _train_jobs_settings():
    """Train settings of every (method, dataset) that has a training job."""
    return [
        get_train_settings(SimpleNamespace(method=method, dataset=dataset))
        for method in get_trained_methods()
        for dataset in config["datasets"]
    ]


def is_multinode_training():
    """Whether the training jobs span several nodes (`train.nodes` > 1; checked to be all or none)."""
    return any(settings["nodes"] > 1 for settings in _train_jobs_settings())


def get_train_gpus(wildcards):
    """GPUs per node of a training job: one per rank with accelerator cuda, else none."""
    settings = get_train_settings(wildcards)
    return settings["ranks"] if settings["accelerator"] == "cuda" else 0


def get_train_resources():
    """Resources of train_model that ask SLURM (snakemake-executor-plugin-slurm) for a
    training job's allocation; other executors ignore them.

    Per job: `nodes` (sbatch --nodes) = train.nodes, one task per node (torchrun starts the
    ranks), `cpus_per_task` = the job's threads (ranks x threads), and with accelerator cuda
    one GPU per rank: `gpu` (sbatch --gpus, and the plugin's srun of the job step) on one
    node; on several `gres` gpu:<ranks> (per node), with `mpi` so that the plugin runs the
    job's shell command in the batch script, where the launcher's srun starts the nodes.
    """

    settings, gpus = get_train_settings, get_train_gpus
    resources = dict(
        nodes=lambda wildcards: settings(wildcards)["nodes"],
        cpus_per_task=lambda wildcards, threads: threads,
    )
    if not is_multinode_training():
        # The plugin's default: one task (--ntasks=1) without GPUs; with `gpu` no task count.
        resources["gpu"] = gpus
        return resources
    resources.update(
        mpi="srun",
        tasks=lambda wildcards: settings(wildcards)["nodes"],  # --ntasks: one per node
        # With GPUs the plugin would pass `tasks` as --ntasks-per-gpu; 0 leaves that out.
        tasks_per_gpu=0,
        gres=lambda wildcards: f"gpu:{gpus(wildcards)}" if gpus(wildcards) else "",
    )
    return resources


def get_method_seeds(method):
    """Seeds a method runs with: all of `seeds`, or the first only for a method without training
    (its evaluation does not depend on a seed)."""
    return config["seeds"] if is_trained(method) else config["seeds"][:1]


##### benchmarks (evaluation-only questions, workflow/rules/data.smk) #####


def get_eval_benchmark(wildcards):
    """The benchmark a dataset's methods are evaluated on (eval_from), or None: its own questions."""
    return get_dataset_config(wildcards)["eval_from"]


def get_eval_shards_manifest(wildcards):
    """The shards an evaluation asks its questions from: the dataset's, or its benchmark's."""
    benchmark = get_eval_benchmark(wildcards)
    if benchmark is None:
        return SHARDS_MANIFEST.format(dataset=wildcards.dataset)
    return generated_manifest(BENCHMARK_DIR).format(benchmark=benchmark)


def get_benchmark_args(wildcards):
    """A benchmark's settings as `python -m medift.benchmarks` options."""
    entry = config["benchmarks"][wildcards.benchmark]
    settings = {
        "name": wildcards.benchmark,
        "file": entry["file"],
        "format": entry["format"],
        "preset": entry["preset"] or "",
        "columns": json.dumps(entry["columns"], sort_keys=True),
        "image_root": entry["image_root"] or "",
        "category": entry["category"],
        "strict": entry["strict"],
        "image_size": get_image_size(),
    }
    return SETTINGS.to_arguments(settings, list(settings))


def get_model_dir(wildcards):
    """Model evaluated for (dataset, method, seed): the fine-tuned one, or the base for `train: false`."""
    if is_trained(wildcards.method):
        return MODEL_DIR.format(dataset=wildcards.dataset, method=wildcards.method, seed=wildcards.seed)
    return get_base_model()


def get_model_files(wildcards):
    if is_trained(wildcards.method):
        model_dir = get_model_dir(wildcards)
        return [f"{model_dir}/config.json", f"{model_dir}/model.safetensors"]
    return get_base_model_files()


##### tables and targets #####


def get_table_methods(wildcards):
    return config["tables"][wildcards.table]


def _table_results(wildcards, name):
    """`name` (an evaluation's file) of every (method, seed, dataset) of the table, in table order."""
    return [
        result_file(name).format(dataset=dataset, method=method, seed=seed)
        for method in get_table_methods(wildcards)
        for seed in get_method_seeds(method)
        for dataset in get_datasets()
    ]


def get_table_predictions(wildcards):
    return _table_results(wildcards, "predictions.csv")


def get_description_outputs():
    """evaluate_model's description outputs when `evaluate.describe` is on (none otherwise)."""
    if not config["evaluate"]["describe"]:
        return {}
    return {
        "descriptions": result_file("descriptions.csv"),
        "description_metrics": result_file("description_metrics.json"),
    }


def get_describe_options(wildcards, input, output):
    """The evaluation's description outputs, the dataset's adapter (whose phrases count) and the
    shards whose test images it describes (the dataset's own, also when its questions are a benchmark's)."""
    if not config["evaluate"]["describe"]:
        return ""
    return (
        f"--descriptions {output.descriptions} --description_summary {output.description_metrics}"
        f" --adapter {get_adapter(wildcards)} --describe_shards {os.path.dirname(input.own)}"
    )


def get_table_descriptions(wildcards):
    """descriptions.csv of every (method, seed, dataset with tuning data) of the table when
    `evaluate.describe` is on (an evaluation-only column has no images of its own to describe)."""
    if not config["evaluate"]["describe"]:
        return []
    return [path for path in _table_results(wildcards, "descriptions.csv") if path.split("/")[1] in get_tuning_datasets()]


def get_comparison_pairs():
    """(method, baseline) pairs of `comparisons` (a baseline or a list of them per method)."""
    pairs = []
    for method, baselines in config["comparisons"].items():
        pairs += [(method, b) for b in ([baselines] if isinstance(baselines, str) else baselines)]
    return pairs


def get_table_comparisons(wildcards):
    """`method:baseline` pairs of `comparisons` whose two methods are both in this table."""
    methods = get_table_methods(wildcards)
    pairs = [f"{m}:{b}" for m, b in get_comparison_pairs() if m in methods and b in methods]
    return " ".join(["--compare", *pairs]) if pairs else ""


def get_final_output():
    """Targets of `all`: every table, and the embedded base model's general accuracy."""
    targets = expand(TABLE_CSV, table=config["tables"])
    if is_embedded_base():
        targets.append(BASE_MODEL_RESULT)
    return targets

##### memory and time of training and evaluation jobs (SLURM mem_mb, runtime) #####

# From the model's size (parameters P, read from the checkpoint's safetensors headers) and
# the data's (shard rows x epochs), so that an 11B checkpoint gets what it needs and the
# embedded default little. Profiles may still override them (set-resources).
#
# Host memory of a node (bytes): the checkpoint's page cache, mapped by its ranks while they
# load, once (2P for bf16: shared pages); per rank, with accelerator cpu, the
# weights in fp32 (4P, divided over the ranks by ZeRO-3) and, for what trains (at most P
# parameters), fp32 gradients and AdamW's two moments (12P, divided over the ranks by ZeRO-2/3);
# with cuda that stays on the GPU unless offloaded (optimizer: 16 bytes per trainable
# parameter over the ranks; parameters: 2P over the ranks). Plus a fixed overhead per rank
# (interpreter, torch, DeepSpeed, CUDA context, data workers): 1.5 GB (cpu) or 4 GB (cuda).
# The node's sum gets a 25 % margin (measured: bench/load_memory.py).
#
# Time: samples = training rows x repeat_train x (warm-up + main epochs), plus the
# validation questions per main epoch at a third of a sample's cost (forward only); a
# sample costs P x SECONDS_PER_SAMPLE_PARAMETER over all ranks: cpu 2e-8 (the embedded
# default measured 6e-9 with one thread: 1,800 samples of a 2.8 M model in ~30 s), cuda
# 2.4e-10 (6 P FLOPs per token-equivalent x 1,000 per sample at 50 TFLOP/s: 1.3 s per
# sample of the 11B model on one GPU, a 2x margin on a conservative bf16 rate). Plus 10
# minutes of start-up and the checkpoint read at 100 MB/s; times 1.5. Before make_shards has
# run the rows are unknown (0): Snakemake evaluates resources again once a job's inputs exist.
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
OVERHEAD_BYTES = {"cpu": 1.5e9, "cuda": 4e9}
SECONDS_PER_SAMPLE_PARAMETER = {"cpu": 2e-8, "cuda": 2.4e-10}
MEMORY_MARGIN, TIME_MARGIN, START_MINUTES, READ_BYTES_PER_SECOND = 1.25, 1.5, 10, 100e6


def checkpoint_parameters(model_dir):
    """Parameters of a checkpoint from its safetensors headers (8 bytes + JSON each: no weight is read).

    0 while the checkpoint does not exist yet (a rule of this workflow makes it, or a dry run in a
    fresh directory): Snakemake evaluates a job's resources again once its inputs exist, before
    the job is submitted, so no job runs sized on this 0."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return 0
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                total += math.prod(tensor["shape"])
    return total


def shard_rows(dataset, kind, split):
    """Rows of one split of a dataset's shards (manifest totals); 0 before make_shards has run."""
    manifest = Path(SHARDS_MANIFEST.format(dataset=dataset))
    if not manifest.is_file():
        return 0
    return json.loads(manifest.read_text())["totals"][kind][split]


def train_memory_bytes(parameters, ranks, nodes, accelerator, zero_stage, offload):
    """Host bytes of one node of a training job (see the block comment above)."""
    total_ranks = ranks * nodes
    per_rank = OVERHEAD_BYTES[accelerator]
    if accelerator == "cpu":
        per_rank += 4 * parameters / (total_ranks if zero_stage == 3 else 1)
        per_rank += 12 * parameters / (total_ranks if zero_stage >= 2 else 1)
    else:
        if offload != "none":
            per_rank += 16 * parameters / total_ranks
        if offload == "optimizer+parameters":
            per_rank += 2 * parameters / total_ranks
    return MEMORY_MARGIN * (2 * parameters + ranks * per_rank)


def train_seconds(parameters, samples, total_ranks, accelerator):
    """Wall seconds of a training job of `samples` sample passes (see the block comment above)."""
    compute = samples * parameters * SECONDS_PER_SAMPLE_PARAMETER[accelerator] / total_ranks
    return TIME_MARGIN * (START_MINUTES * 60 + 2 * parameters / READ_BYTES_PER_SECOND + compute)


def get_train_mem_mb(wildcards):
    settings = get_train_settings(wildcards)
    bytes_ = train_memory_bytes(checkpoint_parameters(get_base_model()), settings["ranks"], settings["nodes"],
                                settings["accelerator"], settings["zero_stage"], settings["offload"])
    return math.ceil(bytes_ / 1e6)


def get_train_runtime(wildcards):
    """Minutes (sbatch -t) of a training job."""
    settings = get_train_settings(wildcards)
    epochs = settings["epochs"] + (settings["warmup_epochs"] if settings["proxy"] else 0)
    samples = shard_rows(wildcards.dataset, "descriptions", "train") * settings["repeat_train"] * epochs
    if settings["validate"]:
        samples += shard_rows(wildcards.dataset, "questions", "val") * settings["epochs"] / 3
    seconds = train_seconds(checkpoint_parameters(get_base_model()), samples, settings["ranks"] * settings["nodes"],
                            settings["accelerator"])
    return math.ceil(seconds / 60)


def evaluate_accelerator():
    """Where evaluation scores: the GPU unless evaluate.device names the CPU (auto: a GPU if there is one)."""
    return "cpu" if config["evaluate"]["device"] == "cpu" else "cuda"


def get_evaluate_mem_mb(wildcards):
    """Host memory of an evaluation: the mapped checkpoint (2P), on the CPU the weights in
    evaluate.dtype as well, plus the overhead; 25 % margin. The tuned models have the base's size."""
    parameters = checkpoint_parameters(get_base_model())
    per_rank = 2 * parameters + OVERHEAD_BYTES[evaluate_accelerator()]
    if evaluate_accelerator() == "cpu":
        per_rank += {"float32": 4, "bfloat16": 2, "float16": 2}[config["evaluate"]["dtype"]] * parameters
    return math.ceil(MEMORY_MARGIN * per_rank / 1e6)


def get_evaluate_runtime(wildcards):
    """Minutes of an evaluation: every asked prompt (5 rotations at most with circular) at a third of a
    training sample's cost, times (1 + max_new_tokens / 8) when generating; the same start-up and margin."""
    settings = config["evaluate"]
    prompts = shard_rows(wildcards.dataset, "questions", settings["split"]) * (5 if settings["circular"] else 1)
    if settings["scoring"] == "generate":
        prompts *= 1 + settings["max_new_tokens"] / 8
    if settings["describe"]:
        prompts += shard_rows(wildcards.dataset, "descriptions", settings["split"]) * (1 + settings["describe_max_new_tokens"] / 8)
    seconds = train_seconds(checkpoint_parameters(get_base_model()), prompts / 3, 1, evaluate_accelerator())
    return math.ceil(seconds / 60)



_check_config()
LOCAL_CARDS = _local_cards()
# The allocator of every local job uses the same cards (CUDA_VISIBLE_DEVICES, if set, travels too).
os.environ[GPUS.COUNT_VARIABLE] = str(len(LOCAL_CARDS))
