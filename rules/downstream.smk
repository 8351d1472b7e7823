"""Downstream evaluation: zero-shot retrieval of every stage, EgoMCQ of the EgoClip model.

Finetuning and QA rules slot in beside these, writing results/eval/<task>/<dataset>/<model>.json.
"""


rule eval_retrieval:
    input:
        model="results/pretrain/{stage}/model.safetensors",
        shards=lambda w: shard_paths(w.dataset),
        annotations=lambda w: dataset(w.dataset)["annotations"],
        tokenizer=f"{config['tokenizer']}/vocab.txt",
    output:
        "results/eval/retrieval/{dataset}/{stage}.json",
    log:
        "logs/eval/retrieval/{dataset}/{stage}.log",
    benchmark:
        "logs/eval/retrieval/{dataset}/{stage}.benchmark.tsv"
    conda:
        "../envs/svitt.yaml"
    threads: job_threads("evaluation")
    resources:
        gpu=job_gpus("evaluation"),
        mem_mb=config["evaluation"]["mem_mb"],
        runtime=config["evaluation"]["runtime"],
    params:
        settings=eval_settings("retrieval"),
        launch=launch("evaluation"),
    shell:
        "{params.launch} workflow_scripts/evaluate.py retrieval --model {input.model} "
        "--shards {input.shards} --annotations {input.annotations} "
        "--tokenizer $(dirname {input.tokenizer}) --config-json {params.settings:q} "
        "--out {output} > {log} 2>&1"


rule eval_egomcq:
    input:
        model="results/pretrain/{stage}/model.safetensors",
        shards=lambda w: shard_paths(config["evaluation"]["egomcq"]["dataset"]),
        annotations=lambda w: dataset(config["evaluation"]["egomcq"]["dataset"])[
            "annotations"
        ],
        tokenizer=f"{config['tokenizer']}/vocab.txt",
    output:
        "results/eval/egomcq/{stage}.json",
    log:
        "logs/eval/egomcq/{stage}.log",
    benchmark:
        "logs/eval/egomcq/{stage}.benchmark.tsv"
    conda:
        "../envs/svitt.yaml"
    threads: job_threads("evaluation")
    resources:
        gpu=job_gpus("evaluation"),
        mem_mb=config["evaluation"]["mem_mb"],
        runtime=config["evaluation"]["runtime"],
    params:
        settings=eval_settings("egomcq"),
        launch=launch("evaluation"),
    shell:
        "{params.launch} workflow_scripts/evaluate.py egomcq --model {input.model} "
        "--shards {input.shards} --annotations {input.annotations} "
        "--tokenizer $(dirname {input.tokenizer}) --config-json {params.settings:q} "
        "--out {output} > {log} 2>&1"


rule nlq_features:
    input:
        model="results/pretrain/{stage}/model.safetensors",
        shards=lambda w: shard_paths(config["evaluation"]["nlq"]["dataset"]),
    output:
        "results/nlq_features/{stage}.h5",
    log:
        "logs/nlq_features/{stage}.log",
    benchmark:
        "logs/nlq_features/{stage}.benchmark.tsv"
    conda:
        "../envs/svitt.yaml"
    threads: job_threads("evaluation")
    resources:
        gpu=job_gpus("evaluation"),
        mem_mb=config["evaluation"]["mem_mb"],
        runtime=config["evaluation"]["runtime"],
    params:
        flags=lambda w: cli_flags(
            {
                k: v
                for k, v in config["evaluation"]["nlq"].items()
                if k in ("window", "stride")
            }
        ),
        launch=launch("evaluation"),
    shell:
        "{params.launch} workflow_scripts/nlq_features.py --model {input.model} --shards {input.shards} "
        "{params.flags} --out {output} --no-progress > {log} 2>&1"
