"""Batches left 'dispatched' by a killed worker are handed over again, same keys."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import dispatch, manager
from cloudmail.models import Batch, Recipient, utcnow


class WorkerKilled(BaseException):
    """Stands for SIGKILL: nothing in cloudmail catches it."""


def _kill_first_hand_over(monkeypatch: pytest.MonkeyPatch) -> None:
    real = dispatch._hand_over
    calls = []

    def hand_over(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise WorkerKilled
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "_hand_over", hand_over)


def _age_dispatched_batches(db, minutes: int) -> None:  # noqa: ANN001
    db.session.execute(
        sa.update(Batch)
        .where(Batch.status == "dispatched")
        .values(dispatched_at=utcnow() - timedelta(minutes=minutes))
    )
    db.session.commit()


def test_a_killed_worker_batch_is_recovered_once(
    app: Flask, db, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    people = ({"email": f"p{i}@example.com"} for i in range(250))
    job = manager.create_job(people, subject="Hi", html="x", batch_size=100)
    _kill_first_hand_over(monkeypatch)

    with pytest.raises(WorkerKilled):
        manager.start_job(job.id)
    db.session.rollback()
    manager.resume_job(job.id)

    stuck = manager.job_summary(job.id)
    assert (stuck["status"], stuck["counters"]["queued"]) == ("sending", 100)
    assert dispatch.recover_stale() == []  # dispatched only moments ago

    _age_dispatched_batches(db, 45)
    recovered = dispatch.recover_stale()

    summary = manager.job_summary(job.id)
    assert len(recovered) == 1
    assert (summary["status"], summary["counters"]["sent"]) == ("done", 250)
    assert len(list((outbox / f"job-{job.id}").glob("*.eml"))) == 250
    attempts = db.session.execute(
        sa.select(sa.func.max(Recipient.attempts)).where(Recipient.job_id == job.id)
    ).scalar()
    assert attempts == 1  # the same keys as the lost hand-over
    assert dispatch.recover_stale() == []


def test_recovery_refuses_a_short_window(app: Flask) -> None:
    with pytest.raises(ValueError, match="recover only batches dispatched at least"):
        dispatch.recover_stale(timedelta(minutes=2))


def test_recover_command(
    app: Flask, runner, db, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = manager.create_job(
        ({"email": f"q{i}@example.com"} for i in range(10)), subject="Hi", html="x"
    )
    _kill_first_hand_over(monkeypatch)
    with pytest.raises(WorkerKilled):
        manager.start_job(job.id)
    db.session.rollback()
    _age_dispatched_batches(db, 90)

    too_soon = runner.invoke(args=["cloudmail", "recover", "--older-than", "5"])
    result = runner.invoke(args=["cloudmail", "recover", "--older-than", "60"])

    assert too_soon.exit_code == 2
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "1 stuck batches handed over again."
    assert manager.job_summary(job.id)["counters"]["sent"] == 10
