"""The ``flask cloudmail`` commands, run through Flask's CLI runner."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from conftest import SHARED
from flask import Flask


def _send(runner, html_file: Path, recipients: Path, *extra: str):  # noqa: ANN001, ANN202
    return runner.invoke(
        args=[
            "cloudmail",
            "send",
            "--recipients",
            str(recipients),
            "--subject",
            "Hello {{ name }}",
            "--html",
            str(html_file),
            *extra,
        ]
    )


def test_send_moodle_sample_summary_adds_up(
    app: Flask, runner, html_file: Path, outbox: Path
) -> None:
    result = _send(runner, html_file, SHARED / "moodle_users_5k.csv")

    assert result.exit_code == 0, result.output
    assert "Job 1 done: 5000 rows" in result.output
    assert re.search(r"^  sent +4,906$", result.output, re.M)
    assert re.search(r"^  rejected +94$", result.output, re.M)
    assert re.search(r"^    duplicate +60$", result.output, re.M)
    assert re.search(r"^    malformed +27$", result.output, re.M)
    assert "(7 blank lines skipped; not rows)" in result.output
    assert len(list((outbox / "job-1").glob("*.eml"))) == 4906

    status = runner.invoke(args=["cloudmail", "status", "1", "--json"])
    summary = json.loads(status.output)
    counters = summary["counters"]
    assert summary["status"] == "done"
    assert (
        counters["sent"]
        + counters["rejected"]
        + counters["suppressed"]
        + counters["failed"]
        == 5000
    )


def test_send_excel_sample_with_encoding_and_rejects_csv(
    app: Flask, runner, html_file: Path, outbox: Path
) -> None:
    result = _send(
        runner, html_file, SHARED / "contacts_excel_cp1252.csv", "--encoding", "cp1252"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(
        runner.invoke(args=["cloudmail", "status", "1", "--json"]).output
    )

    rejects = runner.invoke(args=["cloudmail", "rejects", "1"])

    rows = list(csv.DictReader(io.StringIO(rejects.output)))
    assert rejects.exit_code == 0
    assert len(rows) == summary["counters"]["rejected"] > 0
    assert {r["reason"] for r in rows} <= {
        "duplicate",
        "malformed",
        "empty",
        "non_ascii_local_part",
    }
    assert all(r["line"].isdigit() and r["detail"] for r in rows)
    sent = summary["counters"]["sent"]
    assert sent + len(rows) == 800
    assert len(list((outbox / "job-1").glob("*.eml"))) == sent


def test_user_mistakes_are_one_line_without_traceback(
    app: Flask, runner, html_file: Path, tmp_path: Path
) -> None:
    missing = _send(runner, html_file, tmp_path / "nope.csv")
    wrong_encoding = _send(runner, html_file, SHARED / "contacts_excel_cp1252.csv")
    no_job = runner.invoke(args=["cloudmail", "status", "42"])

    assert missing.exit_code == 1
    assert missing.output.strip().endswith("nope.csv' does not exist.")
    assert wrong_encoding.exit_code == 1
    assert (
        "Line 3 holds bytes" in wrong_encoding.output
        and "--encoding" in wrong_encoding.output
    )
    assert no_job.exit_code == 1
    assert no_job.output.strip() == "Error: There is no job 42."
    for result in (missing, wrong_encoding, no_job):
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_jobs_pause_retry_cancel_commands(app: Flask, runner, html_file: Path) -> None:
    _send(
        runner, html_file, SHARED / "contacts_excel_cp1252.csv", "--encoding", "cp1252"
    )

    listing = runner.invoke(args=["cloudmail", "jobs"])
    refused = runner.invoke(args=["cloudmail", "pause", "1"])
    retry = runner.invoke(args=["cloudmail", "retry", "1"])

    assert "done" in listing.output.splitlines()[1]
    assert refused.exit_code == 1
    assert refused.output.strip() == (
        "Error: A job cannot move from 'done' to 'paused'; from 'done' it may move to queued."
    )
    assert retry.output.strip() == "Job 1: 0 failed recipients sent again."


def test_worker_without_redis_explains(app: Flask, runner) -> None:
    result = runner.invoke(args=["cloudmail", "worker", "--burst"])

    assert result.exit_code == 1
    assert "CLOUDMAIL_REDIS_URL is not set" in result.output
