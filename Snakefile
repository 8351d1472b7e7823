# SViTT / SViTT-Ego: video download -> frames (HDF5) -> curriculum pretraining (4 -> 8 -> 16 frames,
# sparser each stage) -> EgoClip/EgoNCE -> evaluation -> figures. See README.md.
#   snakemake --cores 8 --resources gpu=8 all                 (GPU server)
#   snakemake --profile profiles/slurm all                    (Slurm)
#   snakemake --cores 2 all                                   (the demo default, CPU)
#   snakemake --cores 2 seeds | ablation                      (more seeds, Table 3's single stages)

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"


# Every rule's wildcards: a configured dataset, a pretraining stage (or seed variant), shard numbers.
wildcard_constraints:
    dataset="|".join(re.escape(d) for d in DATASETS),
    stage="|".join(re.escape(s) for s in ALL_STAGE_NAMES),
    index=r"\d+",
    shards=r"\d+",


include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/downstream.smk"
include: "rules/analysis.smk"


rule all:
    default_target: True
    input:
        final_outputs(),


rule seeds:
    input:
        seed_outputs(),


rule ablation:
    input:
        ablation_outputs(),
