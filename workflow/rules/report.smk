rule make_table:
    """Accuracy table (methods x datasets + average), long table with intervals, bar chart."""
    input:
        get_table_predictions,
    output:
        table="results/{table}.csv",
        long="results/{table}_long.csv",
        figure="results/{table}.png",
    params:
        methods=get_table_methods,
        datasets=get_datasets(),
    log:
        "logs/make_table/{table}.log",
    conda:
        "../envs/medift.yaml"
    shell:
        "python -m medift.tables --predictions {input} --methods {params.methods}"
        " --datasets {params.datasets} --table {output.table} --long {output.long}"
        " --figure {output.figure} > {log} 2>&1"
