rule train_model:
    """Fine-tune the base model on one dataset's descriptions with one method (DeepSpeed).

    caption_ft, ift and the ablations differ only in their train settings
    (get_train_settings: global < dataset < method).
    """
    input:
        manifest="resources/shards/{dataset}/manifest.json",
        base_model=get_base_model_files(),
        executor_check=check_train_executor,  # no files: train.nodes > 1 needs SLURM
        cards_check=check_train_cards,  # no files: the machine has a card per rank
    output:
        config="resources/models/{dataset}/{method}/seed-{seed}/config.json",
        weights="resources/models/{dataset}/{method}/seed-{seed}/model.safetensors",
        summary="resources/models/{dataset}/{method}/seed-{seed}/train_summary.json",
    params:
        shards=subpath(input.manifest, parent=True),
        base_model=lambda wildcards, input: os.path.dirname(input.base_model[0]),
        out_dir=subpath(output.weights, parent=True),
        # Not outputs: Snakemake deletes a failed job's outputs, and these must outlive it.
        checkpoint_dir="resources/checkpoints/{dataset}/{method}/seed-{seed}",
        tensorboard_dir="logs/tensorboard/{dataset}/{method}/seed-{seed}",
        trust_remote_code=config["base_model"]["trust_remote_code"],
        settings=get_train_params,
        launcher=get_train_launcher,
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
        " --shards {params.shards} --base_model {params.base_model} --out_dir {params.out_dir}"
        " --proxy {params.settings[proxy]} --proxy_tokens {params.settings[proxy_tokens]}"
        " --momentum {params.settings[momentum]} --warmup_epochs {params.settings[warmup_epochs]}"
        " --epochs {params.settings[epochs]} --shuffle_responses {params.settings[shuffle_responses]}"
        " --train_modules {params.settings[train_modules]} --lora_rank {params.settings[lora_rank]}"
        " --lora_save {params.settings[lora_save]} --gradient_checkpointing {params.settings[gradient_checkpointing]}"
        " --lr {params.settings[lr]} --proxy_lr {params.settings[proxy_lr]} --batch_size {params.settings[batch_size]}"
        " --gradient_accumulation {params.settings[gradient_accumulation]} --global_batch {params.settings[global_batch]}"
        " --offload {params.settings[offload]}"
        " --grad_clip {params.settings[grad_clip]} --zero_stage {params.settings[zero_stage]}"
        " --bf16 {params.settings[bf16]} --repeat_train {params.settings[repeat_train]}"
        " --validate {params.settings[validate]} --select {params.settings[select]}"
        " --checkpoint_dir {params.checkpoint_dir} --checkpoint_every {params.settings[checkpoint_every]}"
        " --checkpoint_minutes {params.settings[checkpoint_minutes]} --shuffle_window {params.settings[shuffle_window]}"
        " --data_workers {params.settings[data_workers]} --peak_flops {params.settings[peak_flops]} --tensorboard_dir {params.tensorboard_dir}"
        " --trust_remote_code {params.trust_remote_code} --seed {wildcards.seed}"
        # Each rank's share of the job's threads (not a param: threads change no result).
        " --threads $(( ({threads} + {params.settings[ranks]} - 1) / {params.settings[ranks]} )) > {log} 2>&1"
