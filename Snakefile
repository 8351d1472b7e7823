# The SViTT workflow. Rules live in rules/*.smk; see README.md.
