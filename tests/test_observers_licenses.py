"""The license observer, through the real licenses-allocated signal."""

from __future__ import annotations

import threading
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import signals
from cloudmail.models import Job, Recipient

LICENSE = {
    "id": "LIC-42",
    "product": "Atlas Pro",
    "seats": 5000,
    "expires": "2027-12-31",
}


@pytest.fixture
def app_config() -> dict[str, object]:
    return {
        "CLOUDMAIL_OBSERVERS": ("licenses",),
        "CLOUDMAIL_UNSUBSCRIBE_URL": "https://host.example/cloudmail/unsubscribe/{token}",
    }


def _users(start: int, stop: int) -> list[dict[str, object]]:
    return [
        {"id": i, "email": f"seat{i}@example.com", "name": f"Seat Holder {i}"}
        for i in range(start, stop)
    ]


def _jobs(db) -> list[tuple[int, int, int]]:
    db.session.expire_all()
    return db.session.execute(
        sa.select(Job.id, Job.total, Job.sent).order_by(Job.id)
    ).all()


def test_5000_seats_are_one_job_and_a_second_signal_mails_nobody(
    app: Flask, db, outbox: Path
) -> None:
    signals.licenses_allocated.send(app, users=_users(0, 5000), license=LICENSE)
    signals.licenses_allocated.send(app, users=_users(0, 5000), license=LICENSE)

    [(job_id, total, sent)] = _jobs(db)
    assert (total, sent) == (5000, 5000)
    job = db.session.get(Job, job_id)
    assert (job.kind, job.category, job.status, job.unsubscribe) == (
        "license",
        "license",
        "done",
        True,
    )
    files = sorted((outbox / f"job-{job_id}").glob("*.eml"))
    assert len(files) == 5000
    mail = BytesParser(policy=policy.default).parsebytes(files[0].read_bytes())
    assert mail["Subject"] == "Your Atlas Pro seat is ready"
    text = mail.get_body(("plain",)).get_content()
    assert "License: LIC-42" in text and "Valid until: 2027-12-31" in text
    assert (
        mail["List-Unsubscribe"]
        .strip()
        .startswith("<https://host.example/cloudmail/unsubscribe/")
    )
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_a_later_allocation_mails_only_the_new_users(
    app: Flask, db, outbox: Path
) -> None:
    signals.licenses_allocated.send(app, users=_users(0, 10), license=LICENSE)
    signals.licenses_allocated.send(app, users=_users(5, 15), license=LICENSE)
    signals.licenses_allocated.send(
        app, users=_users(0, 3), license={**LICENSE, "id": "LIC-43"}
    )

    assert [(total, sent) for _, total, sent in _jobs(db)] == [(10, 10), (5, 5), (3, 3)]
    mailed = (
        db.session.execute(sa.select(Recipient.email).where(Recipient.status == "sent"))
        .scalars()
        .all()
    )
    assert len(mailed) == 18


def test_concurrent_double_signal_mails_each_user_once(
    app: Flask, db, outbox: Path
) -> None:
    users = _users(0, 300)
    barrier = threading.Barrier(2)

    def fire() -> None:
        barrier.wait()
        signals.licenses_allocated.send(app, users=users, license=LICENSE)

    threads = [threading.Thread(target=fire) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [(total, sent) for _, total, sent in _jobs(db)] == [(300, 300)]
    assert len(list(outbox.glob("job-*/*.eml"))) == 300


def test_a_broken_observer_does_not_break_the_host(app: Flask, db, caplog) -> None:
    signals.licenses_allocated.send(
        app, users=_users(0, 2), license={"product": "no id"}
    )

    assert _jobs(db) == []
    assert "Observer licenses failed on on_licenses_allocated" in caplog.text
    assert "The license has no 'id'" in caplog.text
