"""A plain (non-editable) install carries the templates, static files and migrations."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPT = r"""
import sys, tempfile
import cloudmail
from flask import Flask
from cloudmail import CloudMail
from cloudmail.migrate import upgrade

assert cloudmail.__file__.startswith(sys.argv[1]), cloudmail.__file__
tmp = tempfile.mkdtemp()
app = Flask("installed", instance_path=tmp)
app.config.update(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp}/x.db", CLOUDMAIL_ADMIN_CHECK=lambda: True)
CloudMail(app)
with app.app_context():
    upgrade()
client = app.test_client()
page = client.get("/cloudmail/jobs")
css = client.get("/cloudmail/static/cloudmail.css")
print(page.status_code, css.status_code, "No jobs yet" in page.get_data(as_text=True))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = out.glob("cloudmail-*.whl")
    return found


def test_wheel_contains_templates_static_and_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())

    for expected in (
        "cloudmail/templates/cloudmail/base.html",
        "cloudmail/templates/cloudmail/jobs.html",
        "cloudmail/static/cloudmail/cloudmail.css",
        "cloudmail/migrations/env.py",
        "cloudmail/migrations/script.py.mako",
        "cloudmail/migrations/versions/0001_create_cloudmail_tables.py",
        "cloudmail/connectors/outbox.py",
    ):
        assert expected in names
    assert not any(n.startswith(("tests/", "lambda/", "bench/")) for n in names)


def test_installed_wheel_renders_a_page_and_migrates(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}

    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(target)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "200", "True"]
