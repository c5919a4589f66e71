rule evaluate_model:
    """Multiple-choice evaluation of one (dataset, method, seed), and with `evaluate.describe` its
    description accuracy; `train: false` methods use the base model."""
    input:
        manifest="resources/shards/{dataset}/manifest.json",
        model=get_model_files,
        cards_check=check_evaluate_cards,  # no files: the machine has a card for it
    output:
        predictions="results/{dataset}/{method}/seed-{seed}/predictions.csv",
        metrics="results/{dataset}/{method}/seed-{seed}/metrics.json",
        # With evaluate.describe: description accuracy, measured with the same loaded model.
        **get_description_outputs(),
    params:
        shards=subpath(input.manifest, parent=True),
        model=lambda wildcards, input: os.path.dirname(input.model[0]),
        trust_remote_code=config["base_model"]["trust_remote_code"],
        split=config["evaluate"]["split"],
        scoring=config["evaluate"]["scoring"],
        circular=config["evaluate"]["circular"],
        max_new_tokens=config["evaluate"]["max_new_tokens"],
        batch_size=config["evaluate"]["batch_size"],
        device=config["evaluate"]["device"],
        dtype=config["evaluate"]["dtype"],
        describe=get_describe_options,
    log:
        "logs/evaluate_model/{dataset}/{method}/seed-{seed}.log",
    benchmark:
        "benchmarks/evaluate_model/{dataset}/{method}/seed-{seed}.tsv"
    threads: config["evaluate"]["threads"]
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
        "HF_HUB_OFFLINE=1 python -m medift.gpus --take {resources.gpu} -- python -m medift.evaluate --model {params.model}"
        " --shards {params.shards} --split {params.split}"
        " --scoring {params.scoring} --circular {params.circular}"
        " --out {output.predictions} --summary {output.metrics}"
        " --max_new_tokens {params.max_new_tokens} --batch_size {params.batch_size}"
        " --device {params.device} --dtype {params.dtype}"
        " --trust_remote_code {params.trust_remote_code} {params.describe} --threads {threads} > {log} 2>&1"

