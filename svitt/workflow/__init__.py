"""Torch-free settings resolution for the Snakemake rules: stage resolution (stages). Importable
with the standard library and PyYAML only, so rules/*.smk may import it and tests call it directly."""
