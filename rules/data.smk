"""Data stages: the demo corpus, video download, frame extraction to HDF5."""

if config.get("demo_corpus"):

    rule demo_corpus:
        output:
            webvid="resources/demo/webvid_train.csv",
            downstream="resources/demo/downstream_videos.csv",
            retrieval="resources/demo/retrieval_test.json",
            retrieval_train="resources/demo/retrieval_train.json",
            qa_videos="resources/demo/qa_videos.csv",
            qa_train="resources/demo/qa_train.json",
            qa_test="resources/demo/qa_test.json",
            qa_answers="resources/demo/qa_answers.json",
            egoclip="resources/demo/egoclip.csv",
            egomcq="resources/demo/egomcq.json",
            vocab="resources/demo/tokenizer/vocab.txt",
        log:
            "logs/demo_corpus.log",
        conda:
            "../envs/svitt.yaml"
        threads: 2
        resources:
            gpu=0,
            mem_mb=2000,
            runtime=30,
        params:
            flags=cli_flags(config["demo_corpus"]),
        shell:
            "python workflow_scripts/make_demo_corpus.py --out resources/demo {params.flags} "
            "--workers {threads} --no-progress > {log} 2>&1"


rule download:
    input:
        videos=download_input,
        annotations=lambda w: dataset(w.dataset)["annotations"],
    output:
        manifest="resources/videos/{dataset}/manifest.csv",
        videos=downloaded_videos("resources/videos/{dataset}/files"),
    log:
        "logs/download/{dataset}.log",
    benchmark:
        "logs/download/{dataset}.benchmark.tsv"
    conda:
        "../envs/svitt.yaml"
    threads: config["download"]["workers"]
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=24 * 60,
    params:
        source=download_source,
        flags=cli_flags(config["download"], skip=("workers", "keep_videos")),
    shell:
        "python workflow_scripts/download.py {params.source} --out {output.videos} "
        "--manifest {output.manifest} --workers {threads} {params.flags} --no-progress > {log} 2>&1"


rule extract_frames:
    input:
        manifest="resources/videos/{dataset}/manifest.csv",
        annotations=lambda w: dataset(w.dataset)["annotations"],
    output:
        shard="resources/frames/{dataset}/shard-{index}-of-{shards}.h5",
        failures="resources/frames/{dataset}/failures-{index}-of-{shards}.csv",
    log:
        "logs/extract_frames/{dataset}-{index}-of-{shards}.log",
    benchmark:
        "logs/extract_frames/{dataset}-{index}-of-{shards}.benchmark.tsv"
    conda:
        "../envs/svitt.yaml"
    threads: config["frames"]["workers"]
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=12 * 60,
    params:
        clips=clip_flag,
        flags=extraction_flags,
    shell:
        "python workflow_scripts/extract_frames.py --videos {input.manifest} {params.clips} "
        "--out {output.shard} --failures {output.failures} {params.flags} --workers {threads} "
        "--num-shards {wildcards.shards} --shard-index {wildcards.index} --no-progress > {log} 2>&1"
