"""The Lambda's infrastructure template lints clean and its build script makes the zip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_template_passes_cfn_lint() -> None:
    cfn_lint = Path(sys.executable).with_name("cfn-lint")

    done = subprocess.run(
        [str(cfn_lint), str(ROOT / "lambda" / "template.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_build_script_makes_a_deterministic_zip(tmp_path: Path) -> None:
    work = tmp_path / "lambda"
    shutil.copytree(
        ROOT / "lambda", work, ignore=shutil.ignore_patterns("node_modules", "dist")
    )
    env = {**os.environ, "PYTHON": sys.executable}

    first = subprocess.run(
        ["bash", "build.sh"], cwd=work, env=env, capture_output=True, timeout=120
    )
    zip_path = work / "dist" / "cloudmail-lambda.zip"
    digest = zip_path.read_bytes()
    second = subprocess.run(
        ["bash", "build.sh"], cwd=work, env=env, capture_output=True, timeout=120
    )

    assert first.returncode == second.returncode == 0, first.stderr
    assert zipfile.ZipFile(zip_path).namelist() == ["lambda_handler.py"]
    assert zip_path.read_bytes() == digest
