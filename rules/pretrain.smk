"""Pretraining: the curriculum stages (dense, then 4 -> 8 -> 16 frames sparser), EgoClip/EgoNCE,
the extra and ablation stages, and their seed variants (<stage>-seed<k>).

One rule over {stage}: a stage appended to pretrain.curriculum in the config is scheduled as is;
svitt/workflow/stages.py resolves what each stage trains with.
"""


rule pretrain:
    input:
        unpack(stage_inputs),
    output:
        model=stage_model("results/pretrain/{stage}/model.safetensors"),
        info="results/pretrain/{stage}/model.json",
        metrics="results/pretrain/{stage}/metrics.jsonl",
    log:
        "logs/pretrain/{stage}.log",
    benchmark:
        "logs/pretrain/{stage}.benchmark.tsv"
    wildcard_constraints:
        stage="|".join(ALL_STAGE_NAMES),
    # Training first: a stage takes the GPUs before evaluations and NLQ features that became
    # ready at the same time (100 outweighs any number of priority-0 jobs, also for --scheduler ilp).
    priority: 100
    # A stage longer than `runtime` is a chain of jobs: each saves before its time limit
    # (launch.py --save-before) and fails with 75, Snakemake submits the next, which resumes.
    retries: job_retries("pretrain")
    conda:
        "../envs/svitt.yaml"
    threads: job_threads("pretrain")
    resources:
        **gpu_resources("pretrain"),
        mem_mb=config["pretrain"]["mem_mb"],
        runtime=config["pretrain"]["runtime"],
    params:
        stage=stage_params,
        init=init_flag,
        io=pretrain_io,
        launch=launch("pretrain"),
    shell:
        "{params.launch} workflow_scripts/train.py --config-json {params.stage:q} "
        "--shards {input.shards} --annotations {input.annotations} "
        "--tokenizer $(dirname {input.tokenizer}) {params.init} {params.io} "
        "--out results/pretrain/{wildcards.stage} --no-progress > {log} 2>&1"
