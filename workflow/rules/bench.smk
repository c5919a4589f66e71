rule bench_scoring:
    """Benchmark (not part of `all`): letter scoring vs generate-and-parse on the base model,
    same questions, same process; prints agreement and speed ratios."""
    input:
        manifests=expand(SHARDS_MANIFEST, dataset=get_datasets()),
        model=get_base_model_files(),
    output:
        "results/bench/scoring.json",
    params:
        shards=lambda wildcards, input: [os.path.dirname(m) for m in input.manifests],
        model=lambda wildcards, input: os.path.dirname(input.model[0]),
        split=config["evaluate"]["split"],
        batch_size=config["evaluate"]["batch_size"],
        max_new_tokens=config["evaluate"]["max_new_tokens"],
    log:
        "logs/bench_scoring.log",
    threads: config["evaluate"]["threads"]
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python bench/scoring.py --model {params.model} --shards {params.shards}"
        " --split {params.split} --batch_size {params.batch_size}"
        " --max_new_tokens {params.max_new_tokens} --threads {threads} --out {output} 2>&1 | tee {log}"


rule bench_training:
    """Benchmark (not part of `all`): training tokens/s with 1 and 2 ranks, the proxy's
    overhead, the data-wait fraction with and without DataLoader workers, and peak memory at
    2,000 vs 20,000 training images; prints ratios against baselines of the same run."""
    input:
        model=get_base_model_files(),
    output:
        "results/bench/training.json",
    params:
        model=lambda wildcards, input: os.path.dirname(input.model[0]),
    log:
        "logs/bench_training.log",
    threads: 2
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python bench/train_scaling.py --base_model {params.model} --threads {threads}"
        " --out {output} 2>&1 | tee {log}"


rule bench_real_size:
    """Benchmark (not part of `all`): the paper's model at the size users run it (random weights
    from the real Llama-3.2-11B-Vision config; full size where torch sees a GPU, reduced depth
    and tile size on a CPU): host memory at load, training steps per
    checkpointing mode (as shipped / fixed / off) with MFU and HFU, padded vs real-tile vision,
    letter scoring at batch 8 and 32 (bench/real_size.py)."""
    output:
        "results/bench/real_size.json",
    log:
        "logs/bench_real_size.log",
    threads: 2
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python bench/real_size.py --size auto --out {output} > {log} 2>&1"


rule bench_encode_once:
    """Benchmark (not part of `all`): the evaluation with each image encoded once for all its
    prompts (evaluate.encode_once) vs every prompt encoding its image, on the embedded Mllama and
    on the real Llama-3.2-11B-Vision widths at reduced depth (random weights), plain, circular and
    every attribute of each image; seconds, the speed ratio and the agreement (must be 1.0)."""
    output:
        "results/bench/encode_once.json",
    log:
        "logs/bench_encode_once.log",
    threads: config["evaluate"]["threads"]
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "HF_HUB_OFFLINE=1 python bench/encode_once.py --threads {threads} --out {output} > {log} 2>&1"
