# SViTT / SViTT-Ego: video download -> frames (HDF5) -> curriculum pretraining (4 -> 8 -> 16 frames,
# sparser each stage) -> EgoClip/EgoNCE -> evaluation -> figures. See README.md.
#   snakemake --cores 8 --resources gpu=8 all                 (GPU server)
#   snakemake --profile profiles/slurm all                    (Slurm)
#   snakemake --cores 2 all                                   (the demo default, CPU)


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/downstream.smk"
include: "rules/analysis.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
