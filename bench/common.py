"""Helpers the benchmarks share: the input file and peak memory."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The generator of realistic recipient lists, beside the repository.
MAKE_RECIPIENTS = ROOT.parent / "shared" / "tools" / "make_recipients.py"


def make_csv(rows: int) -> Path:
    """A clean recipient CSV of ``rows`` rows in bench/data/, generated once."""
    path = HERE / "data" / f"recipients_{rows}.csv"
    if path.exists():
        return path

    if not MAKE_RECIPIENTS.exists():
        raise SystemExit(
            f"{MAKE_RECIPIENTS} is missing: the benchmarks generate their input with "
            "the shared make_recipients.py tool next to the repository."
        )
    path.parent.mkdir(exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as out:
        subprocess.run(
            [sys.executable, str(MAKE_RECIPIENTS), "--rows", str(rows), "--clean"],
            stdout=out,
            check=True,
        )
    partial.rename(path)
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
