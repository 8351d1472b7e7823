"""Downstream: zero-shot retrieval of every stage, EgoMCQ of the EgoClip model, finetuning
(retrieval, video QA) from pretraining stages and its evaluation, NLQ features.

    results/eval/retrieval/<dataset>/<stage>.json              zero-shot
    results/finetune/<task>/<dataset>/<stage>/                 finetuned model (task: retrieval, qa)
    results/eval/retrieval_finetuned/<dataset>/<stage>.json    its retrieval evaluation
    results/eval/qa/<dataset>/<stage>.json                     its QA evaluation
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
    threads: 2
    resources:
        gpu=config["evaluation"]["gpus"],
        mem_mb=config["evaluation"]["mem_mb"],
        runtime=config["evaluation"]["runtime"],
    params:
        settings=lambda w: canonical(retrieval_eval_settings(w.dataset)),
        launch=launch("evaluation"),
    shell:
        "{params.launch} workflow_scripts/evaluate.py retrieval --model {input.model} "
        "--shards {input.shards} --annotations {input.annotations} "
        "--tokenizer $(dirname {input.tokenizer}) --config-json {params.settings:q} "
        "--out {output} > {log} 2>&1"


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model="results/finetune/{task}/{dataset}/{stage}/model.safetensors",
        info="results/finetune/{task}/{dataset}/{stage}/model.json",
        metrics="results/finetune/{task}/{dataset}/{stage}/metrics.jsonl",
    log:
        "logs/finetune/{task}/{dataset}/{stage}.log",
    benchmark:
        "logs/finetune/{task}/{dataset}/{stage}.benchmark.tsv"
    wildcard_constraints:
        task="retrieval|qa",
    conda:
        "../envs/svitt.yaml"
    threads: 2
    resources:
        gpu=config["finetune"]["gpus"],
        mem_mb=config["finetune"]["mem_mb"],
        runtime=config["finetune"]["runtime"],
    params:
        settings=lambda w: canonical(finetune_settings(w.task, w.dataset, w.stage)),
        overlap=overlap_mode(),
        io=finetune_io,
        launch=launch("finetune"),
    shell:
        "{params.launch} workflow_scripts/finetune.py --config-json {params.settings:q} --init {input.init} "
        "--shards {input.shards} --annotations {input.train} --test-annotations {input.test} "
        "--overlap {params.overlap} --tokenizer $(dirname {input.tokenizer}) {params.io} "
        "--out results/finetune/{wildcards.task}/{wildcards.dataset}/{wildcards.stage} --no-progress > {log} 2>&1"


rule eval_finetuned_retrieval:
    input:
        model="results/finetune/retrieval/{dataset}/{stage}/model.safetensors",
        shards=lambda w: shard_paths(w.dataset),
        annotations=lambda w: dataset(w.dataset)["annotations"],
        tokenizer=f"{config['tokenizer']}/vocab.txt",
    output:
        "results/eval/retrieval_finetuned/{dataset}/{stage}.json",
    log:
        "logs/eval/retrieval_finetuned/{dataset}/{stage}.log",
    benchmark:
        "logs/eval/retrieval_finetuned/{dataset}/{stage}.benchmark.tsv"
    conda:
        "../envs/svitt.yaml"
    threads: 2
    resources:
        gpu=config["evaluation"]["gpus"],
        mem_mb=config["evaluation"]["mem_mb"],
        runtime=config["evaluation"]["runtime"],
    params:
        settings=lambda w: canonical(retrieval_eval_settings(w.dataset)),
        launch=launch("evaluation"),
    shell:
        "{params.launch} workflow_scripts/evaluate.py retrieval --model {input.model} "
        "--shards {input.shards} --annotations {input.annotations} "
        "--tokenizer $(dirname {input.tokenizer}) --config-json {params.settings:q} "
        "--out {output} --no-progress > {log} 2>&1"


rule eval_qa:
    input:
        model="results/finetune/qa/{dataset}/{stage}/model.safetensors",
        shards=lambda w: shard_paths(w.dataset),
        annotations=lambda w: dataset(w.dataset)["annotations"],
        answer_list=lambda w: dataset(w.dataset)["answer_list"],
        tokenizer=f"{config['tokenizer']}/vocab.txt",
    output:
        "results/eval/qa/{dataset}/{stage}.json",
    log:
        "logs/eval/qa/{dataset}/{stage}.log",
    benchmark:
        "logs/eval/qa/{dataset}/{stage}.benchmark.tsv"
    conda:
        "../envs/svitt.yaml"
    threads: 2
    resources:
        gpu=config["evaluation"]["gpus"],
        mem_mb=config["evaluation"]["mem_mb"],
        runtime=config["evaluation"]["runtime"],
    params:
        settings=eval_settings("qa"),
        launch=launch("evaluation"),
    shell:
        "{params.launch} workflow_scripts/evaluate.py qa --model {input.model} "
        "--shards {input.shards} --annotations {input.annotations} --answer-list {input.answer_list} "
        "--tokenizer $(dirname {input.tokenizer}) --config-json {params.settings:q} "
        "--out {output} --no-progress > {log} 2>&1"


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
    threads: 2
    resources:
        gpu=config["evaluation"]["gpus"],
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
    threads: 2
    resources:
        gpu=config["evaluation"]["gpus"],
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
