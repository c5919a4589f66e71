rule evaluate_model:
    """Multiple-choice evaluation of one (dataset, method, seed), and with `evaluate.describe` its
    description accuracy; `train: false` methods use the base model."""
    input:
        # The questions: the dataset's own, or its benchmark's (eval_from).
        manifest=get_eval_shards_manifest,
        # The test images it describes: always the dataset's own.
        own=SHARDS_MANIFEST,
        model=get_model_files,
        cards_check=check_evaluate_cards,  # no files: the machine has a card for it
    output:
        predictions=result_file("predictions.csv"),
        metrics=result_file("metrics.json"),
        # A benchmark's questions without an answer, asked and written, not scored (empty otherwise).
        unlabelled=result_file("unlabelled.csv"),
        # With evaluate.describe: description accuracy, measured with the same loaded model.
        **get_description_outputs(),
    params:
        shards=subpath(input.manifest, parent=True),
        model=lambda wildcards, input: os.path.dirname(input.model[0]),
        trust_remote_code=config["base_model"]["trust_remote_code"],
        # Every evaluate setting but threads: a changed setting makes the job out of date.
        **get_evaluate_params(),
        # The same settings as medift.evaluate options (derived from `input`: not compared twice).
        args=lambda wildcards, input: get_evaluate_args(wildcards),
        describe=get_describe_options,
        launcher=get_evaluate_launcher,
        ranks=config["evaluate"]["ranks"],
    wildcard_constraints:
        dataset=_alternatives(get_tuning_datasets()) or "^$",
    log:
        "logs/evaluate_model/{dataset}/{method}/seed-{seed}.log",
    benchmark:
        "benchmarks/evaluate_model/{dataset}/{method}/seed-{seed}.tsv"
    threads: config["evaluate"]["threads"] * config["evaluate"]["ranks"]
    resources:
        cpu_slots=get_cpu_slots,
        # From the model's and the questions' size (common.smk); a profile's set-resources overrides them.
        mem_mb=get_evaluate_mem_mb,
        runtime=get_evaluate_runtime,
        # A card with evaluate.device cuda (or auto on a machine with cards); the SLURM profile sets it too.
        gpu=get_evaluate_gpus,
    conda:
        "../envs/medift.yaml"
    shell:
        # --take 0 runs the command as it is; otherwise it runs on a card of its own (medift/gpus.py).
        "HF_HUB_OFFLINE=1 python -m medift.gpus --take {resources.gpu} -- {params.launcher} --model {params.model}"
        " --shards {params.shards} {params.args} --out {output.predictions} --summary {output.metrics}"
        " --trust_remote_code {params.trust_remote_code} {params.describe}"
        " --unlabelled {output.unlabelled} --threads $(( {threads} / {params.ranks} )) > {log} 2>&1"



use rule evaluate_model as evaluate_on_benchmark_only with:
    input:
        manifest=get_eval_shards_manifest,
        model=get_model_files,
        cards_check=check_evaluate_cards,
    output:
        predictions=result_file("predictions.csv"),
        metrics=result_file("metrics.json"),
        unlabelled=result_file("unlabelled.csv"),
    params:
        shards=subpath(input.manifest, parent=True),
        model=lambda wildcards, input: os.path.dirname(input.model[0]),
        trust_remote_code=config["base_model"]["trust_remote_code"],
        **get_evaluate_params(),
        args=lambda wildcards, input: get_evaluate_args(wildcards),
        describe="",  # an evaluation-only column has no images of its own to describe
        launcher=get_evaluate_launcher,
        ranks=config["evaluate"]["ranks"],
    wildcard_constraints:
        dataset=_alternatives(get_evaluation_only_datasets()) or "^$",
    log:
        "logs/evaluate_model/{dataset}/{method}/seed-{seed}.log",
    benchmark:
        "benchmarks/evaluate_model/{dataset}/{method}/seed-{seed}.tsv"
