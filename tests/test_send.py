"""A whole job through the outbox connector, in-process (no Redis)."""

from __future__ import annotations

import email
import io
import json
from email import policy
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import SHARED
from flask import Flask

from cloudmail import manager, signals
from cloudmail.errors import InvalidTransition
from cloudmail.models import Batch, Job, Recipient


def _eml(
    outbox: Path, job_id: int, headers_only: bool = False
) -> dict[int, email.message.EmailMessage]:
    parser = BytesHeaderParser if headers_only else BytesParser
    return {
        int(p.stem): parser(policy=policy.default).parsebytes(p.read_bytes())  # type: ignore[misc]
        for p in (outbox / f"job-{job_id}").glob("*.eml")
    }


def test_moodle_sample_end_to_end(app: Flask, db, outbox: Path) -> None:
    finished = []
    signals.job_finished.connect(lambda sender, **kw: finished.append(kw), weak=False)
    job = manager.create_job(
        SHARED / "moodle_users_5k.csv",
        subject="Welcome, {{ firstname }}",
        html="<p>Hi {{ name }} ({{ username }})</p>",
    )

    handed = manager.start_job(job.id)

    summary = manager.job_summary(job.id)
    counters = summary["counters"]
    assert handed == 10  # 4,906 valid rows in batches of 500
    assert summary["status"] == "done"
    assert counters["sent"] == 4906
    assert counters["sent"] + counters["rejected"] == counters["total"] == 5000
    assert {"job_id": job.id, "status": "done"} in finished

    mails = _eml(outbox, job.id, headers_only=True)
    assert len(mails) == 4906
    rows = db.session.execute(
        sa.select(
            Recipient.id,
            Recipient.email,
            Recipient.name,
            Recipient.variables,
            Recipient.provider_message_id,
        ).where(Recipient.job_id == job.id, Recipient.status == "sent")
    ).all()
    for row in rows:
        mail = mails[row.id]
        variables = json.loads(row.variables)
        assert mail["To"].addresses[0].addr_spec == row.email
        assert mail["To"].addresses[0].display_name == row.name
        assert mail["Subject"] == f"Welcome, {variables['firstname']}"
        assert mail["Message-ID"] == row.provider_message_id
        if row.id % 25 == 0:  # full parses are slow; a sample of bodies is enough
            full = BytesParser(policy=policy.default).parsebytes(
                (outbox / f"job-{job.id}" / f"{row.id}.eml").read_bytes()
            )
            assert (
                f"({variables['username']})" in full.get_body(("html",)).get_content()
            )
    assert (
        db.session.execute(
            sa.select(sa.func.count())
            .select_from(Batch)
            .where(Batch.job_id == job.id, Batch.status == "done")
        ).scalar()
        == 10
    )


def test_excel_sample_end_to_end(app: Flask, outbox: Path) -> None:
    job = manager.create_job(
        SHARED / "contacts_excel_cp1252.csv",
        subject="Hallo {{ Vorname }}",
        html="<p>{{ Firma }}</p>",
        encoding="cp1252",
    )
    to_send = job.pending
    manager.start_job(job.id)

    counters = manager.job_summary(job.id)["counters"]
    mails = _eml(outbox, job.id)
    assert len(mails) == counters["sent"] == to_send
    assert counters["sent"] + counters["rejected"] == 800
    subjects = {m["Subject"] for m in mails.values()}
    assert "Hallo Søren" in subjects or "Hallo Zoë" in subjects


def test_render_failure_fails_only_that_recipient_and_retry(
    app: Flask, db, outbox: Path
) -> None:
    data = b'email,name,code\r\na@example.com,Ann,1\r\nb@example.com,"Bob",2\r\n'
    job = manager.create_job(
        io.BytesIO(data), subject="{{ 10 // (code | int - 2) }}", html="x"
    )

    manager.start_job(job.id)

    summary = manager.job_summary(job.id)
    assert summary["status"] == "done"
    assert summary["counters"]["sent"] == 1
    assert summary["counters"]["failed"] == 1
    assert summary["failed_by_reason"] == {"render_error": 1}

    # The admin fixes nothing and retries: only the failed recipient is attempted again.
    assert manager.retry_failed(job.id) == 1
    assert manager.job_summary(job.id)["counters"]["failed"] == 1
    assert len(_eml(outbox, job.id)) == 1


def test_retry_sends_failed_recipients_only(app: Flask, db, outbox: Path) -> None:
    job = manager.create_job(
        ({"email": f"u{i}@example.com"} for i in range(30)), subject="x", html="x"
    )
    manager.start_job(job.id)
    ids = (
        db.session.execute(
            sa.select(Recipient.id)
            .where(Recipient.job_id == job.id)
            .order_by(Recipient.id)
            .limit(3)
        )
        .scalars()
        .all()
    )
    db.session.execute(
        sa.update(Recipient)
        .where(Recipient.id.in_(ids))
        .values(status="failed", reason="Throttling")
    )
    db.session.execute(sa.update(Job).where(Job.id == job.id).values(sent=27, failed=3))
    db.session.commit()
    for path in (outbox / f"job-{job.id}").glob("*.eml"):
        path.unlink()

    assert manager.retry_failed(job.id) == 3

    assert sorted(_eml(outbox, job.id)) == sorted(ids)
    summary = manager.job_summary(job.id)
    assert (
        summary["status"],
        summary["counters"]["sent"],
        summary["counters"]["failed"],
    ) == ("done", 30, 0)
    attempts = (
        db.session.execute(sa.select(Recipient.attempts).where(Recipient.id.in_(ids)))
        .scalars()
        .all()
    )
    assert attempts == [2, 2, 2]


def test_pause_resume_cancel_and_refused_transitions(
    app: Flask, db, outbox: Path
) -> None:
    job = manager.create_job(
        ({"email": f"u{i}@example.com"} for i in range(10)), subject="x", html="x"
    )
    manager.plan_batches(job.id)
    db.session.execute(sa.update(Job).where(Job.id == job.id).values(status="queued"))
    db.session.commit()

    manager.pause_job(job.id)
    assert manager.job_summary(job.id)["status"] == "paused"
    with pytest.raises(
        InvalidTransition, match="A job cannot move from 'paused' to 'paused'"
    ):
        manager.pause_job(job.id)

    manager.resume_job(job.id)
    assert manager.job_summary(job.id)["status"] == "done"
    assert len(_eml(outbox, job.id)) == 10

    with pytest.raises(
        InvalidTransition, match="A job cannot move from 'done' to 'paused'"
    ):
        manager.pause_job(job.id)
    with pytest.raises(
        InvalidTransition, match="A job cannot move from 'done' to 'cancelled'"
    ):
        manager.cancel_job(job.id)


def test_cancelled_job_sends_nothing(app: Flask, outbox: Path) -> None:
    job = manager.create_job(
        ({"email": f"u{i}@example.com"} for i in range(10)), subject="x", html="x"
    )

    manager.cancel_job(job.id)

    assert manager.job_summary(job.id)["status"] == "cancelled"
    with pytest.raises(
        InvalidTransition, match="A job cannot move from 'cancelled' to 'queued'"
    ):
        manager.start_job(job.id)
    assert not (outbox / f"job-{job.id}").exists()
