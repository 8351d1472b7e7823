# `make demo` and `make test` are the two entry points the README promises.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: install demo demo-seeds demo-figures test clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES) all

demo-seeds: install  # the demo over seeds 0 and 1 (configs/demo_seeds.yaml)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES) all --configfile configs/demo_seeds.yaml

demo-figures: install  # + the late-fusion control, the full sweep grid, training memory
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES) all paper_figures

test: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

clean-demo:
	rm -rf results resources logs .snakemake
