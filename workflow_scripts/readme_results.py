#!/usr/bin/env python
"""Write results/tables/results.md into README.md between its demo-results markers.

    python workflow_scripts/readme_results.py --results results/tables/results.md --readme README.md

The README's results section is then the DAG's result files, never typed by hand (rule `readme`,
`snakemake --cores 1 readme` after `make demo`). The section between the markers is replaced;
the rest of the README is kept byte for byte; the write is atomic. --section names the markers
(<!-- SECTION:start --> ... <!-- SECTION:end -->); --results may name several table files (the
DAG's results/tables/<table>.md), written one after the other: `make readme-temporal` writes the
retrieval and twins tables of `make demo-temporal` (demo_temporal/results/tables/) into
demo-temporal-results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # svitt from this repository

SECTION = "demo-results"


def markers(section: str = SECTION) -> tuple[str, str]:
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


def spliced(readme: str, results: str, section: str = SECTION) -> str:
    """readme with the text between the section's start and end markers replaced by results (its
    header comment dropped)."""
    START, END = markers(section)
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValueError(f"README must hold one {START} line before one {END} line")
    body = "\n".join(line for line in results.strip().splitlines() if not line.startswith("<!--"))
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{START}\n{body.strip()}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, type=Path, nargs="+")
    p.add_argument("--readme", required=True, type=Path)
    p.add_argument("--section", default=SECTION, help=f"the markers' name (default {SECTION})")
    args = p.parse_args(argv)
    from svitt.io import atomic_write_bytes

    results = "\n".join(path.read_text().strip() + "\n" for path in args.results)
    text = spliced(args.readme.read_text(), results, args.section)
    atomic_write_bytes(args.readme, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
