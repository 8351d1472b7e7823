"""Pretraining: the curriculum stages (T = 4 dense -> 8 -> 16 sparser) and EgoClip/EgoNCE.

One rule over {stage}: a stage appended to pretrain.curriculum in the config is scheduled as is.
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
        stage="|".join(STAGES),
    conda:
        "../envs/svitt.yaml"
    threads: 2
    resources:
        gpu=config["pretrain"]["gpus"],
        mem_mb=config["pretrain"]["mem_mb"],
        runtime=config["pretrain"]["runtime"],
    params:
        stage=lambda w: canonical(stage_config(w.stage)),
        init=init_flag,
        io=pretrain_io,
        launch=launch("pretrain"),
    shell:
        "{params.launch} workflow_scripts/train.py --config-json {params.stage:q} "
        "--shards {input.shards} --annotations {input.annotations} "
        "--tokenizer $(dirname {input.tokenizer}) {params.init} {params.io} "
        "--out results/pretrain/{wildcards.stage} --no-progress > {log} 2>&1"
