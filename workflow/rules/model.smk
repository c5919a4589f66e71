rule distill_base_model:
    """The embedded default base model (base_model.path `embedded`): a tiny Mllama, the
    paper's architecture, built in two stages. Distillation: its text layers are the
    embedded LLaVA's (copied, frozen) and its vision tower, projector and cross-attention
    layers are distilled from it (saved in resources/embedded-mllama-distilled, and reused
    while its recorded settings match). Language stage: its text layers learn to write
    medical descriptions from text alone (no medical image).

    Committed to git like its teacher, so on a fresh clone it does not run; the teacher is
    `ancient` so that checkout times never make it look out of date.
    `--forcerun distill_base_model` rebuilds it from the committed teacher. To rebuild both,
    first `snakemake --forcerun pretrain_base_model models/embedded-base/model.safetensors`,
    then `snakemake --forcerun distill_base_model results/base_model.json` (as the teacher
    is ancient, forcing both in one call runs the teacher only).
    """
    input:
        teacher_config=ancient("models/embedded-base/config.json"),
        teacher_weights=ancient("models/embedded-base/model.safetensors"),
    output:
        config="models/embedded-mllama/config.json",
        weights="models/embedded-mllama/model.safetensors",
    params:
        teacher=subpath(input.teacher_config, parent=True),
        out_dir=subpath(output.config, parent=True),
        first_stage_dir="resources/embedded-mllama-distilled",
        seed=config["base_model"]["seed"],
    log:
        "logs/distill_base_model.log",
    threads: config["threads"]["pretrain"]
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python -m medift.embedded distill --teacher {params.teacher} --out_dir {params.out_dir}"
        " --first_stage_dir {params.first_stage_dir} --seed {params.seed} --threads {threads} > {log} 2>&1"


rule pretrain_base_model:
    """Pre-train the embedded LLaVA (base_model.path `embedded_llava`, and the teacher of the
    default embedded Mllama).

    Its output is committed to git and the rule has no inputs, so on a fresh clone it does
    not run; `--forcerun pretrain_base_model` rebuilds it in two stages (101 minutes on
    2 CPU cores): a run of `python -m medift.embedded pretrain`'s defaults (86 minutes),
    saved in resources/, then 1,500 refining steps from it (15 minutes). The first stage is
    reused, not retrained, while its recorded settings match the recipe's; delete its
    directory to retrain it. The defaults of `python -m medift.embedded recipe` are the shipped run's.
    Only the files later jobs depend on are declared; the command also writes the
    tokenizer and processor files and pretrain_history.json into the same directory.
    """
    output:
        config="models/embedded-base/config.json",
        weights="models/embedded-base/model.safetensors",
    params:
        out_dir=subpath(output.config, parent=True),
        first_stage_dir="resources/base_model_first_stage",
        seed=config["base_model"]["seed"],
        image_size=get_image_size(),
    log:
        "logs/pretrain_base_model.log",
    threads: config["threads"]["pretrain"]
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python -m medift.embedded recipe --out_dir {params.out_dir}"
        " --first_stage_dir {params.first_stage_dir} --seed {params.seed} --image_size {params.image_size} --threads {threads}"
        " > {log} 2>&1"


rule evaluate_base_model:
    """General-domain multiple-choice accuracy of the base model (instruction following)."""
    input:
        get_base_model_files(),
    output:
        BASE_MODEL_RESULT,
    params:
        model=lambda wildcards, input: os.path.dirname(input[0]),
        n=config["base_model"]["eval_questions"],
        seed=config["base_model"]["seed"],
        image_size=get_image_size(),
    log:
        "logs/evaluate_base_model.log",
    threads: config["evaluate"]["threads"]
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python -m medift.embedded evaluate --model {params.model}"
        " --out {output} --n {params.n} --seed {params.seed}"
        " --image_size {params.image_size} --threads {threads} > {log} 2>&1"
