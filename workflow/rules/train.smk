rule train_model:
    """Fine-tune the base model on one dataset's descriptions with one method (DeepSpeed).

    caption_ft, ift and the ablations differ only in their train settings
    (get_train_settings: global < dataset < method); the baselines also in their data
    (--train_data, workflow/rules/baselines.smk) and the model they start from (start_from).
    """
    input:
        manifest=SHARDS_MANIFEST,
        # The base model, or the tuned model of the method this one starts from (start_from).
        base_model=get_start_model_files,
        # The generated rows of a baseline (inst_ft, vital_select, st_dpo); none for the descriptions.
        train_data=get_train_data_input,
        executor_check=check_train_executor,  # no files: train.nodes > 1 needs SLURM
        cards_check=check_train_cards,  # no files: the machine has a card per rank
    output:
        config=model_file("config.json"),
        weights=model_file("model.safetensors"),
        summary=model_file("train_summary.json"),
    params:
        shards=subpath(input.manifest, parent=True),
        base_model=lambda wildcards, input: os.path.dirname(input.base_model[0]),
        out_dir=subpath(output.weights, parent=True),
        # Not outputs: Snakemake deletes a failed job's outputs, and these must outlive it.
        checkpoint_dir=CHECKPOINT_DIR,
        tensorboard_dir=TENSORBOARD_DIR,
        trust_remote_code=config["base_model"]["trust_remote_code"],
        # Every train setting but threads: a changed setting makes the job out of date.
        settings=get_train_params,
        # The same settings as medift.train options (derived from `input`, so Snakemake does not
        # compare them as a parameter of their own: `settings` holds them).
        args=lambda wildcards, input: get_train_args(wildcards),
        launcher=get_train_launcher,
        train_data=get_train_data_option,
    wildcard_constraints:
        method=_alternatives(get_trained_methods()),
    log:
        "logs/train_model/{dataset}/{method}/seed-{seed}.log",
    benchmark:
        "benchmarks/train_model/{dataset}/{method}/seed-{seed}.tsv"
    threads: get_train_threads
    resources:
        cpu_slots=get_cpu_slots,
        # From the model's and the data's size (common.smk); a profile's set-resources overrides them.
        mem_mb=get_train_mem_mb,
        runtime=get_train_runtime,
        # SLURM: nodes, cpus per task, GPUs per job from train.nodes/ranks/accelerator;
        # locally `gpu` (ranks with cuda) caps the jobs at the machine's cards.
        **get_train_resources(),
    conda:
        "../envs/medift.yaml"
    shell:
        "DS_ACCELERATOR={params.settings[accelerator]} HF_HUB_OFFLINE=1 {params.launcher}"
        " --shards {params.shards} {params.train_data} --base_model {params.base_model} --out_dir {params.out_dir}"
        " {params.args}"
        " --checkpoint_dir {params.checkpoint_dir} --tensorboard_dir {params.tensorboard_dir}"
        " --trust_remote_code {params.trust_remote_code} --seed {wildcards.seed}"
        # Each rank's share of the job's threads (not a param: threads change no result).
        " --threads $(( ({threads} + {params.settings[ranks]} - 1) / {params.settings[ranks]} )) > {log} 2>&1"
