# The baselines' data-making jobs (docs/baselines.md): each writes shards with a manifest in
# its GENERATED_DIR, which train_model reads as --train_data. Inference runs like an
# evaluation (the evaluate block's device, dtype, batch size and threads; a card of its own).


rule make_instructions:
    """Questions about each training image's attributes in three phrasings, answered from the
    ground truth, as conversation shards (inst_ft; st_dpo's first stage)."""
    input:
        manifest=SHARDS_MANIFEST,
    output:
        manifest=generated_manifest(INSTRUCTIONS_DIR),
    params:
        shards=subpath(input.manifest, parent=True),
        out_dir=subpath(output.manifest, parent=True),
        seed=config["seed"],
        settings=get_baseline_settings("instructions"),
        args=lambda wildcards, input: get_baseline_args("instructions"),
    log:
        "logs/make_instructions/{dataset}.log",
    threads: 1
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "python -m medift.instructions --shards {params.shards} --out_dir {params.out_dir}"
        " --seed {params.seed} {params.args} > {log} 2>&1"


rule make_candidates:
    """vital_select's candidates: template questions answered from the ground truth and by the
    base model (sampled), each rated 0-10 by the judge."""
    input:
        manifest=SHARDS_MANIFEST,
        base_model=get_base_model_files(),
        cards_check=check_evaluate_cards,
    output:
        manifest=generated_manifest(CANDIDATES_DIR),
    params:
        shards=subpath(input.manifest, parent=True),
        base_model=lambda wildcards, input: os.path.dirname(input.base_model[0]),
        out_dir=subpath(output.manifest, parent=True),
        seed=config["seed"],
        settings=get_baseline_settings("candidates"),
        judge=config["judge"],
        inference=lambda wildcards, input: get_inference_args(),
        args=lambda wildcards, input: get_baseline_args("candidates"),
        judge_args=lambda wildcards, input: get_judge_args(),
        trust_remote_code=config["base_model"]["trust_remote_code"],
    log:
        "logs/make_candidates/{dataset}.log",
    threads: config["evaluate"]["threads"]
    resources:
        cpu_slots=get_cpu_slots,
        mem_mb=get_evaluate_mem_mb,
        gpu=get_evaluate_gpus,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python -m medift.gpus --take {resources.gpu} -- python -m medift.vital candidates"
        " --shards {params.shards} --base_model {params.base_model} --out_dir {params.out_dir}"
        " --seed {params.seed} {params.args} {params.judge_args} {params.inference}"
        " --trust_remote_code {params.trust_remote_code} --threads {threads} > {log} 2>&1"


rule select_candidates:
    """vital_select's selection: a selection model trained on the judge's ratings and clinician
    pairs scores every candidate; the top keep_fraction is kept as conversation shards."""
    input:
        manifest=SHARDS_MANIFEST,
        candidates=generated_manifest(CANDIDATES_DIR),
        base_model=get_base_model_files(),
        cards_check=check_evaluate_cards,
    output:
        manifest=generated_manifest(SELECTED_DIR),
    params:
        shards=subpath(input.manifest, parent=True),
        candidates=subpath(input.candidates, parent=True),
        base_model=lambda wildcards, input: os.path.dirname(input.base_model[0]),
        out_dir=subpath(output.manifest, parent=True),
        seed=config["seed"],
        settings=get_baseline_settings("selection"),
        keep=get_keep_fraction,
        inference=lambda wildcards, input: get_inference_args(),
        args=lambda wildcards, input: get_baseline_args("selection", get_keep_fraction(wildcards)),
        trust_remote_code=config["base_model"]["trust_remote_code"],
    wildcard_constraints:
        method=_alternatives(get_methods_with_data("vital_select")) or "^$",
    log:
        "logs/select_candidates/{dataset}/{method}.log",
    threads: config["evaluate"]["threads"]
    resources:
        cpu_slots=get_cpu_slots,
        mem_mb=get_evaluate_mem_mb,
        gpu=get_evaluate_gpus,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python -m medift.gpus --take {resources.gpu} -- python -m medift.vital select"
        " --shards {params.shards} --candidates {params.candidates} --base_model {params.base_model}"
        " --out_dir {params.out_dir} --seed {params.seed} {params.args} {params.inference}"
        " --trust_remote_code {params.trust_remote_code} --threads {threads} > {log} 2>&1"


rule make_preferences:
    """st_dpo's pairs: the first-stage model describes each training image, asks about it,
    answers twice; the judge ranks the answers; the model's log-probabilities are DPO's reference."""
    input:
        manifest=SHARDS_MANIFEST,
        model=get_start_model_files,
        cards_check=check_evaluate_cards,
    output:
        manifest=generated_manifest(PREFERENCES_DIR),
    params:
        shards=subpath(input.manifest, parent=True),
        model=lambda wildcards, input: os.path.dirname(input.model[0]),
        out_dir=subpath(output.manifest, parent=True),
        settings=get_baseline_settings("preferences"),
        judge=config["judge"],
        inference=lambda wildcards, input: get_inference_args(),
        args=lambda wildcards, input: get_baseline_args("preferences"),
        judge_args=lambda wildcards, input: get_judge_args(),
        trust_remote_code=config["base_model"]["trust_remote_code"],
    wildcard_constraints:
        method=_alternatives(get_methods_with_data("preferences")) or "^$",
    log:
        "logs/make_preferences/{dataset}/{method}/seed-{seed}.log",
    threads: config["evaluate"]["threads"]
    resources:
        cpu_slots=get_cpu_slots,
        mem_mb=get_evaluate_mem_mb,
        gpu=get_evaluate_gpus,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python -m medift.gpus --take {resources.gpu} -- python -m medift.self_training"
        " --shards {params.shards} --model {params.model} --out_dir {params.out_dir}"
        " --seed {wildcards.seed} {params.args} {params.judge_args} {params.inference}"
        " --trust_remote_code {params.trust_remote_code} --threads {threads} > {log} 2>&1"
