"""Analysis: figures, result tables and the report; test-time sparsity sweeps, efficiency at full
size, pruning maps; the order-blind late-fusion control (second target `paper_figures`).

    snakemake --cores 2 all              figures, tables (results/tables/results.md), sweep, efficiency
    snakemake --cores 2 paper_figures    + the late-fusion control, the full sweep grid, memory, ablation
    snakemake --report report.html       every figure and table with its caption
"""


include: "analysis_common.smk"


report: "../report/workflow.rst"


rule paper_figures:
    input:
        analysis_outputs(),
        paper_outputs(),


# ---------------------------------------------------------------------------------- figures


# Seconds of work each (and the targets all / seeds / ablation, which only gather files): on Slurm
# they run beside Snakemake instead of waiting in the queue. (nlq_videos: rules/downstream.smk.)
localrules:
    all,
    seeds,
    ablation,
    readme,
    plot_training,
    plot_sparsity,
    plot_retrieval,
    plot_egomcq,


rule plot_training:
    input:
        [f for s in all_stages() for f in seed_files(s, "metrics.jsonl")],
    output:
        report(
            "results/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Pretraining",
        ),
    log:
        "logs/figures/training_curves.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        pairs=runs_flags({s: seed_files(s, "metrics.jsonl") for s in all_stages()}),
    shell:
        "python workflow_scripts/plot.py training {params.pairs} --out {output} > {log} 2>&1"


rule plot_sparsity:
    input:
        [f"results/pretrain/{s}/model.json" for s in all_stages()],
    output:
        report(
            "results/figures/sparsity.png",
            caption="../report/sparsity.rst",
            category="Pretraining",
        ),
    log:
        "logs/figures/sparsity.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        pairs=named({s: f"results/pretrain/{s}/model.json" for s in all_stages()}),
    shell:
        "python workflow_scripts/plot.py sparsity {params.pairs} --out {output} > {log} 2>&1"


rule plot_retrieval:
    input:
        lambda w: runs_files(retrieval_runs(w.dataset)),
    output:
        report(
            "results/figures/retrieval_{dataset}.png",
            caption="../report/retrieval.rst",
            category="Evaluation",
            subcategory="{dataset}",
        ),
    log:
        "logs/figures/retrieval_{dataset}.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        pairs=lambda w: runs_flags(retrieval_runs(w.dataset)),
    shell:
        "python workflow_scripts/plot.py retrieval {params.pairs} --out {output} > {log} 2>&1"


rule plot_probing:
    input:
        lambda w: runs_files(retrieval_runs(w.dataset)),
    output:
        report(
            "results/figures/probing_{dataset}.png",
            caption="../report/probing.rst",
            category="Temporal probing",
            subcategory="{dataset}",
        ),
    log:
        "logs/figures/probing_{dataset}.log",
    wildcard_constraints:
        dataset="|".join(RETRIEVAL_DATASETS) or "^$",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        pairs=lambda w: runs_flags(retrieval_runs(w.dataset)),
    shell:
        "python workflow_scripts/plot.py probing --task retrieval {params.pairs} --out {output} "
        "> {log} 2>&1"


rule plot_egomcq:
    input:
        runs_files(egomcq_runs()),
    output:
        report(
            "results/figures/egomcq.png",
            caption="../report/egomcq.rst",
            category="Evaluation",
            subcategory="EgoMCQ",
        ),
    log:
        "logs/figures/egomcq.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        pairs=runs_flags(egomcq_runs()),
    shell:
        "python workflow_scripts/plot.py egomcq {params.pairs} --out {output} > {log} 2>&1"


rule plot_probing_egomcq:
    input:
        runs_files(egomcq_runs()),
    output:
        report(
            "results/figures/probing_egomcq.png",
            caption="../report/probing.rst",
            category="Temporal probing",
            subcategory="EgoMCQ",
        ),
    log:
        "logs/figures/probing_egomcq.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        pairs=runs_flags(egomcq_runs()),
    shell:
        "python workflow_scripts/plot.py probing --task egomcq {params.pairs} --out {output} > {log} 2>&1"


# ------------------------------------------------------------------------------- sweeps


rule sweep_point:
    input:
        model="results/pretrain/{stage}/model.safetensors",
        shards=lambda w: shard_paths(sweep_dataset()),
        annotations=lambda w: dataset(sweep_dataset())["annotations"],
        tokenizer=f"{config['tokenizer']}/vocab.txt",
    output:
        "results/analysis/sweep/{stage}/{point}.json",
    log:
        "logs/analysis/sweep/{stage}/{point}.log",
    benchmark:
        "logs/analysis/sweep/{stage}/{point}.benchmark.tsv"
    wildcard_constraints:
        point="|".join(re.escape(p) for p in SWEEP_POINTS) or "^$",
    conda:
        "../envs/svitt.yaml"
    threads: job_threads("evaluation")
    resources:
        gpu=job_gpus("evaluation"),
        mem_mb=config["evaluation"]["mem_mb"],
        runtime=config["evaluation"]["runtime"],
    params:
        point=lambda w: cli_flags(SWEEP_POINTS[w.point]),
        settings=lambda w: canonical(retrieval_eval_settings(sweep_dataset())),
        launch=launch("evaluation"),
    shell:
        "{params.launch} workflow_scripts/sweep.py --model {input.model} --shards {input.shards} "
        "--annotations {input.annotations} --tokenizer $(dirname {input.tokenizer}) "
        "--point {wildcards.point} {params.point} --config-json {params.settings:q} --out {output} "
        "--no-progress > {log} 2>&1"


rule plot_sweep:
    input:
        points=lambda w: runs_files(sweep_runs(sweep_section(w), w.kind)),
        references=lambda w: runs_files(sweep_references(sweep_section(w))),
    output:
        report(
            "results/figures/sweep_{kind}{suffix}.png",
            caption="../report/sweep.rst",
            category="Sparsity sweeps",
        ),
    log:
        "logs/figures/sweep_{kind}{suffix}.log",
    wildcard_constraints:
        kind="edge|keep",
        suffix="|_full",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        points=lambda w: runs_flags(sweep_runs(sweep_section(w), w.kind)),
        references=lambda w: runs_flags(sweep_references(sweep_section(w))),
    shell:
        "python workflow_scripts/plot.py sweep --kind {wildcards.kind} {params.points} "
        "--reference {params.references} --out {output} > {log} 2>&1"


# --------------------------------------------------------------------------- efficiency


rule efficiency:
    output:
        json="results/analysis/{table}.json",
        csv="results/analysis/{table}.csv",
    log:
        "logs/analysis/{table}.log",
    benchmark:
        "logs/analysis/{table}.benchmark.tsv"
    wildcard_constraints:
        table="efficiency|efficiency_full",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        gpu=lambda w: (job_gpus("evaluation") if w.table == "efficiency_full" else 0),
        mem_mb=4000,
        runtime=60,
    params:
        flags=efficiency_flags,
    shell:
        "python workflow_scripts/efficiency.py {params.flags} --out-json {output.json} "
        "--out-csv {output.csv} --no-progress > {log} 2>&1"


rule plot_efficiency:
    input:
        "results/analysis/{table}.json",
    output:
        report(
            "results/figures/{table}.png",
            caption="../report/efficiency.rst",
            category="Efficiency",
        ),
    log:
        "logs/figures/{table}.log",
    wildcard_constraints:
        table="efficiency|efficiency_full",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    shell:
        "python workflow_scripts/plot.py efficiency report={input} --out {output} > {log} 2>&1"


# ---------------------------------------------------------------------------- pruning maps


rule pruning_maps:
    input:
        model=lambda w: f"results/pretrain/{ANALYSIS['pruning_maps']['stage']}/model.safetensors",
        shards=lambda w: shard_paths(pruning_dataset()),
        annotations=lambda w: dataset(pruning_dataset())["annotations"],
        tokenizer=f"{config['tokenizer']}/vocab.txt",
        videos=lambda w: ANALYSIS["pruning_maps"].get("videos", []),
    output:
        figure=report(
            "results/figures/pruning_maps.png",
            caption="../report/pruning_maps.rst",
            category="Pruning maps",
        ),
        json="results/analysis/pruning_maps.json",
    log:
        "logs/analysis/pruning_maps.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    params:
        flags=lambda w: pruning_settings(),
    shell:
        "python workflow_scripts/pruning_maps.py --model {input.model} --shards {input.shards} "
        "--annotations {input.annotations} --tokenizer $(dirname {input.tokenizer}) {params.flags} "
        "--out-figure {output.figure} --out-json {output.json} > {log} 2>&1"


# ----------------------------------------------------------------------- the control, Table 3


rule plot_control:
    input:
        lambda w: control_inputs(),
    output:
        report(
            "results/figures/control.png",
            caption="../report/control.rst",
            category="Temporal probing",
            subcategory="late-fusion control",
        ),
    log:
        "logs/figures/control.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        joint=lambda w: runs_flags(control_runs("joint")),
        late=lambda w: runs_flags(control_runs("late")),
    shell:
        "python workflow_scripts/plot.py control {params.joint} --late {params.late} --out {output} "
        "> {log} 2>&1"


rule plot_ablation:
    input:
        lambda w: runs_files(ablation_runs()),
    output:
        report(
            "results/figures/ablation.png",
            caption="../report/ablation.rst",
            category="Curriculum ablation",
        ),
    log:
        "logs/figures/ablation.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        pairs=lambda w: runs_flags(ablation_runs()),
    shell:
        "python workflow_scripts/plot.py ablation {params.pairs} --out {output} > {log} 2>&1"


# ---------------------------------------------------------------------------------- tables


rule tables:
    input:
        table_inputs(),
    output:
        markdown="results/tables/results.md",
        tables=[
            report(
                f"results/tables/{t}.html",
                caption="../report/tables.rst",
                category="Tables",
            )
            for t in table_outputs()
        ],
        files=[
            f"results/tables/{t}.{ext}"
            for t in table_outputs()
            for ext in ("md", "csv")
        ],
    log:
        "logs/analysis/tables.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        **SMALL_JOB,
    params:
        flags=table_flags(),
    shell:
        "python workflow_scripts/tables.py --out-dir results/tables {params.flags} > {log} 2>&1"


# The README's demo-results section from results.md (a target of its own: `all` never edits a
# tracked file). README.md is not an input: the rule reruns when the results change.
rule readme:
    input:
        "results/tables/results.md",
    output:
        touch("results/tables/readme.done"),
    log:
        "logs/analysis/readme.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=500,
        runtime=5,
    shell:
        "python workflow_scripts/readme_results.py --results {input} --readme README.md > {log} 2>&1"
