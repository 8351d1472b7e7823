#!/usr/bin/env python
"""The rehearsal: the paper configuration executed on miniatures of every dataset, on this machine.

    python workflow_scripts/rehearsal.py                 # full size: BEiT-B + BERT-base (make rehearsal)
    python workflow_scripts/rehearsal.py --size ci       # the tiny widths at the paper's depths (make test)

In its own working folder (--dir, default rehearsal/ or rehearsal_ci/; the workflow's files are
linked there, never copied):
1. writes the miniatures of every dataset configs/paper.yaml reads into data/, in the published
   layouts (svitt.data.miniatures), random weights in timm's BEiT layout (full) or Hugging Face's
   (ci) and a bert-base-uncased folder (svitt.models.published); once, kept for later runs;
2. serves WebVid's contentUrl files on a loopback HTTP server while Snakemake runs;
3. plans `all` and `paper_figures` under configs/paper.yaml alone and with the rehearsal overlays
   (configs/rehearsal.yaml [+ tests/configs/rehearsal_ci.yaml]): the job count of every rule must be the
   paper's, apart from the download and extraction shards;
4. runs them, then checks that nothing is left to do, writes the Snakemake report
   (results/report.html) and results/rehearsal.json (planned and executed jobs per rule, time).

Exit status 0 when every job ran and the counts agree, 1 otherwise (the Snakemake log says which
job failed: .snakemake/log/ in the working folder).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # svitt from this repository
from svitt.workflow import WORKFLOW_FILES  # noqa: E402

TARGETS = ("all", "paper_figures")
SHARDED_RULES = ("download", "extract_frames")  # their counts follow the overlay's shards
OVERLAYS = {"full": ("configs/rehearsal.yaml",), "ci": ("configs/rehearsal.yaml", "tests/configs/rehearsal_ci.yaml")}
DATA_VERSION = 3  # bump when svitt.data.miniatures changes what it writes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(OVERLAYS), default="full")
    p.add_argument("--dir", type=Path, help="working folder (default rehearsal/ or rehearsal_ci/)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--port", type=int, default=0, help="loopback port of the WebVid server (default: a free one)")
    p.add_argument("--seed", type=int, default=0, help="of the miniatures and weights")
    p.add_argument("--snakemake-args", default="", help="further Snakemake flags, e.g. '--keep-going'")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Working folder and data
# ----------------------------------------------------------------------------------------------
def link_workflow(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        link = workdir / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(REPO / name)


def prepare_data(workdir: Path, size: str, seed: int, port: int) -> dict:
    """The miniatures and weights, written once: data/.miniatures.json records what was written
    and the server port in WebVid's URLs (the CSV is rewritten only when the port changes)."""
    from svitt.data.miniatures import make_miniatures

    marker = workdir / "data" / ".miniatures.json"
    wanted = {"version": DATA_VERSION, "size": size, "seed": seed}
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if {k: done.get(k) for k in wanted} == wanted and (port == 0 or done.get("port") == port):
        return done
    port = port or free_port()
    started = time.time()
    texts = make_miniatures(workdir, f"http://127.0.0.1:{port}", seed=seed)
    write_weights(workdir / "data", size, texts, seed)
    record = {**wanted, "port": port, "seconds": round(time.time() - started, 1)}
    marker.write_text(json.dumps(record, indent=2) + "\n")
    print(f"rehearsal: miniatures and weights written in {record['seconds']} s", flush=True)
    return record


def write_weights(data: Path, size: str, texts: list[str], seed: int) -> None:
    """The tokenizer and text weights of data/bert-base-uncased (full) or data/bert_tiny (ci), and
    BEiT weights: timm's .pth at BEiT-B (full) or an HF folder at the tiny widths (ci)."""
    from svitt.models import published

    if size == "full":
        published.write_bert_folder(data / "bert-base-uncased", texts, seed=seed)
        published.write_timm_beit(data / "weights/beit_base_patch16_224.in22k_ft_in22k.pth", seed=seed)
        return
    from svitt.models.text_encoder import TEXT_PRESETS
    from svitt.models.video_encoder import VIDEO_PRESETS

    published.write_bert_folder(data / "bert-base-uncased", texts, weights=False)  # the tokenizer
    text = TEXT_PRESETS["tiny"]
    published.write_bert_folder(
        data / "bert_tiny",
        texts,
        seed=seed,
        hidden_size=text["width"],
        num_hidden_layers=12,
        num_attention_heads=text["heads"],
        intermediate_size=text["intermediate_size"],
        max_position_embeddings=text["max_position_embeddings"],
    )
    video = VIDEO_PRESETS["tiny"]
    published.write_hf_beit(
        data / "weights/beit_tiny_hf",
        seed=seed,
        image_size=video["image_size"],
        patch_size=video["patch_size"],
        num_hidden_layers=12,
        hidden_size=video["width"],
        num_attention_heads=video["heads"],
        intermediate_size=int(video["width"] * video["mlp_ratio"]),
    )


def weight_paths(workdir: Path, size: str) -> list[str]:
    """At CI size the paper's own weight files are not written: its plan is made with the CI
    weights' paths (an overlay of those two paths alone; paths decide no job count)."""
    if size == "full":
        return []
    import yaml

    model = yaml.safe_load((REPO / "tests/configs/rehearsal_ci.yaml").read_text())["model"]
    overlay = workdir / "plan_weights.yaml"
    overlay.write_text(yaml.safe_dump({"model": {k: model[k] for k in ("video_weights", "text_weights")}}))
    return [overlay.name]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the download log records every fetch
        pass


def serve(folder: Path, port: int) -> http.server.ThreadingHTTPServer:
    """WebVid's files on 127.0.0.1:port, in a daemon thread (stopped with .shutdown())."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as error:
        raise SystemExit(
            f"rehearsal: cannot serve WebVid's URLs on 127.0.0.1:{port} ({error}); the URLs in "
            "data/webvid/results_2M_train.csv name that port: free it, or pass --port to rewrite them"
        )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ----------------------------------------------------------------------------------------------
# Snakemake
# ----------------------------------------------------------------------------------------------
def snakemake(workdir: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env, text=True, capture_output=capture
    )


def planned_jobs(workdir: Path, configfiles: list[str]) -> dict[str, int]:
    """Jobs per rule of `all` and `paper_figures` from scratch (--forceall: whatever exists)."""
    result = snakemake(workdir, *TARGETS, "-n", "--forceall", "--quiet", "rules", "--configfile", *configfiles)
    if result.returncode:
        raise SystemExit(
            f"rehearsal: planning with {configfiles} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return job_counts(result.stdout + result.stderr)


def job_counts(text: str) -> dict[str, int]:
    """The 'Job stats' table of Snakemake's output -> {rule: count} (without the total)."""
    table = text.split("Job stats:", 1)[-1]
    counts = {}
    for name, count in re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s+(\d+)\s*$", table, flags=re.M):
        if name != "total":
            counts.setdefault(name, int(count))
    return counts


def finished_jobs(log: str) -> dict[str, int]:
    """Jobs per rule that finished in a run, from Snakemake's log ('Finished jobid: N (Rule: r)')."""
    counts: dict[str, int] = {}
    for rule in re.findall(r"Finished jobid: \d+ \(Rule: ([A-Za-z0-9_]+)\)", log):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def compare(paper: dict[str, int], rehearsal: dict[str, int]) -> list[str]:
    """Rules whose job count differs between the paper's plan and the rehearsal's (shards aside)."""
    rules = sorted((set(paper) | set(rehearsal)) - set(SHARDED_RULES))
    return [
        f"{r}: paper {paper.get(r, 0)}, rehearsal {rehearsal.get(r, 0)}"
        for r in rules
        if paper.get(r, 0) != rehearsal.get(r, 0)
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = (args.dir or REPO / f"rehearsal{'' if args.size == 'full' else '_' + args.size}").resolve()
    started = time.time()
    link_workflow(workdir)
    record = prepare_data(workdir, args.size, args.seed, args.port)
    configfiles = ["configs/paper.yaml", *OVERLAYS[args.size]]
    paper_plan = planned_jobs(workdir, ["configs/paper.yaml", *weight_paths(workdir, args.size)])
    plan = planned_jobs(workdir, configfiles)
    differences = compare(paper_plan, plan)
    server = serve(workdir / "webvid_server", record["port"])
    try:
        run = snakemake(
            workdir, "--cores", str(args.cores), *TARGETS, "--configfile", *configfiles, *args.snakemake_args.split()
        )
    finally:
        server.shutdown()
    log = run.stdout + run.stderr
    (workdir / "rehearsal.log").write_text(log)
    executed = finished_jobs(log)
    left = snakemake(workdir, *TARGETS, "-n", "--configfile", *configfiles)
    complete = left.returncode == 0 and "Nothing to be done" in left.stdout + left.stderr
    report = snakemake(workdir, *TARGETS, "--report", "results/report.html", "--configfile", *configfiles)
    summary = {
        "size": args.size,
        "wall_s": round(time.time() - started, 1),
        "cores": args.cores,
        "snakemake_exit": run.returncode,
        "complete": complete,
        "report": report.returncode == 0,
        "planned_paper": paper_plan,
        "planned_rehearsal": plan,
        "executed": executed,
        "count_differences": differences,
        "data": record,
    }
    (workdir / "results").mkdir(exist_ok=True)
    (workdir / "results/rehearsal.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    ok = run.returncode == 0 and complete and not differences and summary["report"]
    print(
        f"rehearsal ({args.size}): {'passed' if ok else 'FAILED'} in {summary['wall_s']:.0f} s; "
        f"{sum(executed.values())} jobs run of {sum(plan.values())} planned; "
        f"{'counts as the paper' if not differences else 'count differences: ' + '; '.join(differences)}; "
        f"report {workdir / 'results/report.html'}; summary {workdir / 'results/rehearsal.json'}"
    )
    if run.returncode:
        print(log[-6000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
