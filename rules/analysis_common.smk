"""Lookups of rules/analysis.smk: `config` bound to svitt/workflow/analysis.py (result files per
model, sweep points, the control, the ablation, the tables, the targets)."""

ANALYSIS = config["analysis"]
EFFICIENCY_JSON = _analysis.EFFICIENCY_JSON
RETRIEVAL_DATASETS = _evaluation.retrieval_datasets(config)
SWEEP_POINTS = _analysis.all_sweep_points(config)
named = _analysis.named
runs_flags = _analysis.runs_flags
runs_files = _analysis.runs_files


def all_stages():
    return _analysis.all_stages(config)


def seed_files(stage, filename):
    return _analysis.seed_files(config, stage, filename)


def retrieval_runs(dataset_name, stages=None):
    return _analysis.retrieval_runs(config, dataset_name, stages)


def egomcq_runs():
    return _analysis.egomcq_runs(config)


def sweep_dataset(section="sweep"):
    return _analysis.sweep_dataset(config, section)


def sweep_runs(section, kind):
    return _analysis.sweep_runs(config, section, kind)


def sweep_references(section):
    return _analysis.sweep_references(config, section)


def sweep_section(wildcards):
    return "paper_sweep" if wildcards.suffix else "sweep"


def pruning_dataset():
    return _analysis.pruning_dataset(config)


def pruning_settings():
    return _analysis.pruning_settings(config)


def efficiency_flags(wildcards):
    return _analysis.efficiency_flags(config, wildcards.table)


def control_runs(side):
    return _analysis.control_runs(config, side)


def control_inputs():
    return _analysis.control_inputs(config)


def ablation_runs():
    return _analysis.ablation_runs(config)


def table_outputs():
    return _analysis.table_outputs(config)


def table_inputs():
    return _analysis.table_inputs(config)


def table_flags():
    return _analysis.table_flags(config)


def analysis_outputs():
    return _analysis.analysis_outputs(config)


def paper_outputs():
    return _analysis.paper_outputs(config)
