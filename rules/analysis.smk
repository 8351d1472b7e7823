"""Figures of the training curves, of the evaluation per stage, and of sparsity."""

# Seconds of work each (and the targets all / seeds / ablation, which only gather files): on Slurm
# they run beside Snakemake instead of waiting in the queue. (nlq_videos: rules/downstream.smk.)
localrules:
    all,
    seeds,
    ablation,
    plot_training,
    plot_sparsity,
    plot_retrieval,
    plot_egomcq,



rule plot_training:
    input:
        [f"results/pretrain/{s}/metrics.jsonl" for s in all_stages()],
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
        gpu=0,
        mem_mb=1000,
        runtime=10,
    params:
        pairs=named({s: f"results/pretrain/{s}/metrics.jsonl" for s in all_stages()}),
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
        gpu=0,
        mem_mb=1000,
        runtime=10,
    params:
        pairs=named({s: f"results/pretrain/{s}/model.json" for s in all_stages()}),
    shell:
        "python workflow_scripts/plot.py sparsity {params.pairs} --out {output} > {log} 2>&1"


rule plot_retrieval:
    input:
        lambda w: list(retrieval_results(w.dataset).values()),
    output:
        report(
            "results/figures/retrieval_{dataset}.png",
            caption="../report/retrieval.rst",
            category="Evaluation",
        ),
    log:
        "logs/figures/retrieval_{dataset}.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=1000,
        runtime=10,
    params:
        pairs=lambda w: named(retrieval_results(w.dataset)),
    shell:
        "python workflow_scripts/plot.py retrieval {params.pairs} --out {output} > {log} 2>&1"


rule plot_egomcq:
    input:
        list(egomcq_results().values()),
    output:
        report(
            "results/figures/egomcq.png",
            caption="../report/egomcq.rst",
            category="Evaluation",
        ),
    log:
        "logs/figures/egomcq.log",
    conda:
        "../envs/svitt.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=1000,
        runtime=10,
    params:
        pairs=named(egomcq_results()),
    shell:
        "python workflow_scripts/plot.py egomcq {params.pairs} --out {output} > {log} 2>&1"
