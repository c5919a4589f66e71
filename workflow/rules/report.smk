rule make_table:
    """Accuracy table (methods x datasets + average), long table with intervals, per-attribute
    accuracy, and their figures; every output is also a panel of `snakemake --report`."""
    input:
        get_table_predictions,
    output:
        table=report(
            "results/{table}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "content": "accuracy"},
        ),
        long=report(
            "results/{table}_long.csv",
            caption="../report/table_long.rst",
            category="Tables",
            labels={"table": "{table}", "content": "intervals and comparisons"},
        ),
        attributes=report(
            "results/{table}_attributes.csv",
            caption="../report/attributes.rst",
            category="Per attribute",
            labels={"table": "{table}", "content": "table"},
        ),
        figure=report(
            "results/{table}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"table": "{table}", "content": "bar chart"},
        ),
        heatmap=report(
            "results/{table}_attributes.png",
            caption="../report/heatmap.rst",
            category="Per attribute",
            labels={"table": "{table}", "content": "heat map"},
        ),
    params:
        methods=get_table_methods,
        datasets=get_datasets(),
        compare=get_table_comparisons,
    log:
        "logs/make_table/{table}.log",
    conda:
        "../envs/medift.yaml"
    shell:
        "python -m medift.tables --predictions {input} --methods {params.methods}"
        " --datasets {params.datasets} --table {output.table} --long {output.long}"
        " --attributes {output.attributes} --figure {output.figure} --heatmap {output.heatmap}"
        " {params.compare} > {log} 2>&1"
