"""Data stages: the demo corpus, video download, frame extraction to HDF5.

Both are sharded by one hash of the video id: download shard i -> extract shard i -> shard i's
videos dropped (download.keep_videos: false), so disk holds only the shards in flight and a
cluster spreads the shards over its nodes. Videos already on disk (a folder) are read in place.
"""

if config.get("demo_corpus"):

    rule demo_corpus:
        output:
            webvid="resources/demo/webvid_train.csv",
            downstream="resources/demo/downstream_videos.csv",
            retrieval="resources/demo/retrieval_test.json",
            egoclip="resources/demo/egoclip.csv",
            egomcq="resources/demo/egomcq.json",
            nlq_train="resources/demo/nlq_train.json",
            nlq_val="resources/demo/nlq_val.json",
            vocab="resources/demo/tokenizer/vocab.txt",
            ego_videos=directory("resources/demo/ego_videos"),
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
        videos=download_list,
    output:
        manifest="resources/videos/{dataset}/shard-{index}-of-{shards}/manifest.csv",
        videos=downloaded_videos(
            "resources/videos/{dataset}/shard-{index}-of-{shards}/files"
        ),
    log:
        "logs/download/{dataset}-{index}-of-{shards}.log",
    benchmark:
        "logs/download/{dataset}-{index}-of-{shards}.benchmark.tsv"
    conda:
        "../envs/svitt.yaml"
    threads: config["download"]["workers"]
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=24 * 60,
    params:
        source=download_source,
        flags=cli_flags({"max_bytes": config["download"]["max_bytes"]}),
        run=download_run,
    shell:
        "python workflow_scripts/download.py {params.source} --out {output.videos} "
        "--manifest {output.manifest} --num-shards {wildcards.shards} --shard-index {wildcards.index} "
        "{params.flags} {params.run} --workers {threads} --no-progress > {log} 2>&1"


rule extract_frames:
    input:
        unpack(extraction_inputs),
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
        source=extraction_source,
        clips=clip_flag,
        flags=extraction_flags,
        run=extraction_run,
    shell:
        "python workflow_scripts/extract_frames.py {params.source} {params.clips} "
        "--out {output.shard} --failures {output.failures} {params.flags} {params.run} "
        "--workers {threads} --num-shards {wildcards.shards} --shard-index {wildcards.index} "
        "--no-progress > {log} 2>&1"
