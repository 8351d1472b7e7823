"""Downstream: zero-shot retrieval of every stage, EgoMCQ of the EgoClip model, finetuning
(retrieval, video QA) from pretraining stages and its evaluation, and Ego4D NLQ (window features ->
a grounder trained on the train split -> recall on val).

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
    threads: job_threads("evaluation")
    resources:
        gpu=job_gpus("evaluation"),
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
    priority: 50  # training before evaluations, after pretraining stages
    retries: job_retries("finetune")
    conda:
        "../envs/svitt.yaml"
    threads: job_threads("finetune")
    resources:
        **gpu_resources("finetune"),
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
    threads: job_threads("evaluation")
    resources:
        gpu=job_gpus("evaluation"),
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
    threads: job_threads("evaluation")
    resources:
        gpu=job_gpus("evaluation"),
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


# ---- NLQ
# Ego4D NLQ: the videos of nlq_train.json / nlq_val.json, whole, at a fixed fps -> window features
# of one stage's model ({video_uid}.pt per video, the layout VSLNet / GroundNLQ read) -> a span
# grounder trained on train, evaluated on val next to the most-frequent-window baseline.

if config["evaluation"].get("nlq"):
    NLQ = config["evaluation"]["nlq"]

    # Seconds of work (two annotation files -> a video table): on Slurm it runs beside Snakemake.
    localrules:
        nlq_videos,

    rule nlq_videos:
        input:
            train=NLQ["train"],
            val=NLQ["val"],
        output:
            dataset(NLQ["dataset"])["annotations"],
        log:
            "logs/nlq/videos.log",
        conda:
            "../envs/svitt.yaml"
        threads: 1
        resources:
            gpu=0,
            mem_mb=2000,
            runtime=10,
        shell:
            "python workflow_scripts/ground.py videos --train {input.train} --val {input.val} "
            "--out {output} > {log} 2>&1"

    rule nlq_features:
        input:
            model="results/pretrain/{stage}/model.safetensors",
            shards=lambda w: shard_paths(NLQ["dataset"]),
        output:
            h5="results/nlq_features/{stage}.h5",
            pt=directory("results/nlq_features/{stage}"),
        log:
            "logs/nlq_features/{stage}.log",
        benchmark:
            "logs/nlq_features/{stage}.benchmark.tsv"
        wildcard_constraints:
            stage="|".join(ALL_STAGE_NAMES),
        conda:
            "../envs/svitt.yaml"
        threads: job_threads("evaluation")
        resources:
            gpu=job_gpus("evaluation"),
            mem_mb=config["evaluation"]["mem_mb"],
            runtime=config["evaluation"]["runtime"],
        params:
            flags=cli_flags({k: NLQ[k] for k in ("window", "stride", "kind")}),
            launch=launch("evaluation"),
        shell:
            "{params.launch} workflow_scripts/nlq_features.py --model {input.model} --shards {input.shards} "
            "{params.flags} --out {output.h5} --pt-dir {output.pt} --no-progress > {log} 2>&1"

    rule ground:
        input:
            features="results/nlq_features/{stage}",
            train=NLQ["train"],
            val=NLQ["val"],
            model="results/pretrain/{stage}/model.safetensors",
            tokenizer=f"{config['tokenizer']}/vocab.txt",
        output:
            result="results/eval/nlq/{stage}.json",
            predictions="results/nlq/{stage}/predictions_val.json",
            metrics="results/nlq/{stage}/metrics.jsonl",
            grounder="results/nlq/{stage}/grounder.safetensors",
        log:
            "logs/nlq/{stage}.log",
        benchmark:
            "logs/nlq/{stage}.benchmark.tsv"
        wildcard_constraints:
            stage="|".join(ALL_STAGE_NAMES),
        conda:
            "../envs/svitt.yaml"
        # One CPU thread: the grounder's matrices are small (ground.py --threads); its GPU, when
        # evaluation.gpus (or auto) gives one, is leased like every other GPU job's (launch).
        threads: 1
        resources:
            gpu=job_gpus("evaluation"),
            mem_mb=config["evaluation"]["mem_mb"],
            runtime=config["evaluation"]["runtime"],
        params:
            settings=canonical(NLQ["grounder"]),
            launch=launch("evaluation"),
        shell:
            "{params.launch} workflow_scripts/ground.py train --features {input.features} "
            "--train {input.train} --val {input.val} --model {input.model} "
            "--tokenizer $(dirname {input.tokenizer}) --config-json {params.settings:q} "
            "--out {output.result} --out-dir $(dirname {output.grounder}) --threads {threads} "
            "--no-progress > {log} 2>&1"
