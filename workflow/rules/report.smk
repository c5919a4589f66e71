rule make_table:
    """Accuracy table (methods x datasets + average), long table with intervals, per-attribute
    accuracy, and their figures; every output is also a panel of `snakemake --report`."""
    input:
        predictions=get_table_predictions,
        descriptions=get_table_descriptions,
        # What each method used: train summaries and generated data's manifests (results/<table>_data.csv).
        costs=get_table_cost_inputs,
    output:
        table=report(
            TABLE_CSV,
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}", "content": "accuracy"},
        ),
        long=report(
            "results/{table}_long.csv",
            caption="../report/table_long.rst",
            category="Tables",
            labels={"table": "{table}", "content": "intervals"},
        ),
        comparisons=report(
            "results/{table}_comparisons.csv",
            caption="../report/comparisons.rst",
            category="Tables",
            labels={"table": "{table}", "content": "paired comparisons"},
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
        data=report(
            "results/{table}_data.csv",
            caption="../report/data.rst",
            category="Tables",
            labels={"table": "{table}", "content": "training data and compute"},
        ),
        metrics=report(
            "results/{table}_metrics.png",
            caption="../report/metrics.rst",
            category="Figures",
            labels={"table": "{table}", "content": "accuracy, format, descriptions"},
        ),
    params:
        methods=get_table_methods,
        datasets=get_datasets(),
        compare=get_table_comparisons,
        descriptions=lambda wildcards, input: f"--descriptions {' '.join(input.descriptions)}" if input.descriptions else "",
        costs=lambda wildcards, input: f"--costs {' '.join(get_table_costs(wildcards))}" if input.costs else "",
    log:
        "logs/make_table/{table}.log",
    conda:
        "../envs/medift.yaml"
    shell:
        "python -m medift.tables --predictions {input.predictions} --methods {params.methods}"
        " --datasets {params.datasets} --table {output.table} --long {output.long}"
        " --attributes {output.attributes} --figure {output.figure} --heatmap {output.heatmap}"
        " --metrics_figure {output.metrics} {params.descriptions} {params.costs} --data {output.data}"
        " --comparisons {output.comparisons} {params.compare} > {log} 2>&1"
