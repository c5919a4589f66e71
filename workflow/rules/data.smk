rule synthesize_raw_data:
    """Small synthetic raw release of one dataset, in the real on-disk format."""
    output:
        marker=touch(SYNTHETIC_MARKER),
    params:
        raw_dir=RAW_DIR,
        adapter=get_adapter,
        seed=config["seed"],
        n_train=lambda wildcards: get_synthetic_settings(wildcards)["n_train"],
        n_val=lambda wildcards: get_synthetic_settings(wildcards)["n_val"],
        n_test=lambda wildcards: get_synthetic_settings(wildcards)["n_test"],
        image_size=lambda wildcards: get_synthetic_settings(wildcards)["image_size"],
    log:
        "logs/synthesize_raw_data/{dataset}.log",
    threads: 1
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        # The directory is cleared first so that a smaller rerun leaves no stale images.
        "(rm -rf {params.raw_dir} && python -m medift.prepare synthesize"
        " --dataset {params.adapter} --out_dir {params.raw_dir} --seed {params.seed}"
        " --n_train {params.n_train} --n_val {params.n_val} --n_test {params.n_test}"
        " --image_size {params.image_size}) > {log} 2>&1"


rule make_shards:
    """Records -> descriptions and questions -> Parquet shards, and the data report."""
    input:
        get_raw_input,
    output:
        manifest=SHARDS_MANIFEST,
        report=DATA_REPORT,
    params:
        raw_dir=get_raw_dir,
        out_dir=subpath(output.manifest, parent=True),
        adapter=get_adapter,
        image_size=get_image_size(),
        seed=config["seed"],
        strict=lambda wildcards: get_dataset_config(wildcards)["strict"],
        options=get_adapter_options,
    log:
        "logs/make_shards/{dataset}.log",
    # First when two slots are free: it takes `threads.prepare` CPU slots, and one-slot jobs of
    # another dataset would otherwise keep taking them (every later job of this dataset waits).
    priority: 10
    threads: config["threads"]["prepare"]
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "python -m medift.prepare shards --dataset {params.adapter}"
        " --raw_dir {params.raw_dir} --out_dir {params.out_dir} --report {output.report}"
        " --image_size {params.image_size} --seed {params.seed} --strict {params.strict} {params.options}"
        " --threads {threads} > {log} 2>&1"


rule make_benchmark_shards:
    """An evaluation-only benchmark (`benchmarks:`) -> question shards: every image letterboxed
    once, unlabelled questions kept (asked, not scored), quarantines counted in the report."""
    input:
        # The release's file: a missing one stops the workflow before any job.
        file=lambda wildcards: config["benchmarks"][wildcards.benchmark]["file"],
    output:
        manifest=generated_manifest(BENCHMARK_DIR),
        report=BENCHMARK_REPORT,
    params:
        out_dir=subpath(output.manifest, parent=True),
        args=get_benchmark_args,
    log:
        "logs/make_benchmark_shards/{benchmark}.log",
    threads: 1
    resources:
        cpu_slots=get_cpu_slots,
    conda:
        "../envs/medift.yaml"
    shell:
        "python -m medift.benchmarks {params.args} --out_dir {params.out_dir} --report {output.report} > {log} 2>&1"
