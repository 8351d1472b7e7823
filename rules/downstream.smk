"""Downstream evaluation: zero-shot retrieval of every stage, EgoMCQ of the EgoClip model, and
Ego4D NLQ (window features -> a grounder trained on the train split -> recall on val).

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
            stage="|".join(STAGES),
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
            stage="|".join(STAGES),
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
