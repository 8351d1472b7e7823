"""Torch-free settings resolution for the Snakemake rules: what rules/*.smk computes from the config,
as functions of the config dict. Importable with the standard library and PyYAML only, and never
importing Snakemake, so rules/*.smk bind `config` to it and tests call it directly.

    config      config layering (`standalone:` overlays), YAML numbers, canonical params, CLI flags
    datasets    dataset lookups, download and frame-extraction flags
    stages      pretraining stages resolved into training configs (`like:`, controls, seed variants)
    evaluation  retrieval evaluation and finetuning settings
    uses        what each dataset is used for, and the check of its files' layouts
    analysis    result files per seed, sweep points, control, ablation, the list of result tables
    targets     the files of the `all`, `seeds` and `ablation` targets
"""

# What a copy of the workflow needs to run Snakemake in another folder (the rehearsal's working
# folder, the tests' copies): the paths relative to the repository.
WORKFLOW_FILES = (
    "Snakefile",
    "config.yaml",
    "configs",
    "rules",
    "schemas",
    "workflow_scripts",
    "svitt",
    "profiles",
    "envs",
    "report",
    "tests/configs",
)
