# `make demo` and `make test` are the two entry points the README promises.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: install demo demo-seeds demo-figures demo-temporal rehearsal readme readme-seeds readme-temporal lint test \
	gpu-check gpu-check-dry \
	clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

SNAKEMAKE = PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake
# Every run ends with its Snakemake report (every figure and table with its caption).
REPORT = --report results/report.html

demo: install
	$(SNAKEMAKE) --cores $(CORES) all
	$(SNAKEMAKE) all $(REPORT)

demo-seeds: install  # the demo over seeds 0 and 1 (configs/demo_seeds.yaml)
	$(SNAKEMAKE) --cores $(CORES) all --configfile configs/demo_seeds.yaml
	$(SNAKEMAKE) all $(REPORT) --configfile configs/demo_seeds.yaml

demo-figures: install  # + the late-fusion control, Table 3's single stages, the full sweep grid, training memory
	$(SNAKEMAKE) --cores $(CORES) all paper_figures
	$(SNAKEMAKE) all paper_figures $(REPORT)

# The demo that learns order (configs/demo_temporal.yaml: 4x the clips, position embedding, longer
# stage1; seeds 0 and 1, each stage beside its order-blind late-fusion control). It regenerates the
# corpus, so it runs in a checkout of its own: demo_temporal/ (a clone of this repository's last
# commit); report in demo_temporal/results/report.html.
demo-temporal: install
	test -d demo_temporal || git clone -q . demo_temporal
	cd demo_temporal && PATH=$(abspath $(BIN)):$$PATH $(abspath $(BIN))/snakemake --cores $(CORES) all \
		--configfile configs/demo_temporal.yaml
	cd demo_temporal && PATH=$(abspath $(BIN)):$$PATH $(abspath $(BIN))/snakemake all $(REPORT) \
		--configfile configs/demo_temporal.yaml

# The paper configuration executed on miniatures of every dataset in its published layout, at
# full model size on the CPU (workflow_scripts/rehearsal.py; working folder rehearsal/, report in
# rehearsal/results/report.html).
rehearsal: install
	$(BIN)/python workflow_scripts/rehearsal.py --cores $(CORES)

readme: install  # the README's demo-results section from results/tables/results.md
	$(SNAKEMAKE) --cores 1 readme

readme-seeds: install  # the same after `make demo-seeds`: the tables show the mean and both seeds
	$(SNAKEMAKE) --cores 1 readme --configfile configs/demo_seeds.yaml

# The README's temporal-demo section: the retrieval and twins tables the DAG of `make demo-temporal`
# wrote (demo_temporal/results/tables/), by the script rule `readme` runs, between other markers.
TEMPORAL_TABLES = $(foreach t,retrieval twins,demo_temporal/results/tables/$(t)_demo_retrieval.md)
readme-temporal: install
	$(BIN)/python workflow_scripts/readme_results.py --results $(TEMPORAL_TABLES) \
		--readme README.md --section demo-temporal-results

# The habits that keep the code readable: ruff (lint and layout, pyproject.toml) over every Python
# file, snakefmt's layout and Snakemake's own linter over the workflow.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules
	$(SNAKEMAKE) --lint

test: install lint
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

# The prepared GPU check (benchmarks/gpu_check.py, docs/attention.md): under 8 minutes on one H100.
# It needs no venv: a GPU machine's own Python with torch runs it (no Snakemake, decord or network).
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

gpu-check-dry: install  # the same code on the CPU at a tiny size (also run by `make test`)
	PYTHONPATH=. $(BIN)/python benchmarks/gpu_check.py --dry

clean-demo:
	rm -rf results resources logs .snakemake
