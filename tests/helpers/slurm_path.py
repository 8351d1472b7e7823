"""PATH without the test session's fast-failing `scontrol` stub (tests/conftest.py): the Slurm
tests talk to the real cluster."""

import os


def real_path(path: str) -> str:
    stub = os.environ.get("SVITT_TEST_NO_SCONTROL")
    return os.pathsep.join(
        p
        for p in path.split(os.pathsep)
        if p and p != stub and not os.path.basename(p).startswith("svitt-no-scontrol-")
    )
