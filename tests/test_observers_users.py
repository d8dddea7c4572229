"""The user observer: welcome once, address changes, and erasure on deletion."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import manager, signals
from cloudmail.models import Base, Event, Job, Recipient, Suppression
from cloudmail.observers.models import Claim, StoredMessage

ADDRESS = "Erin.Gone@Example.com"


@pytest.fixture
def app_config() -> dict[str, object]:
    return {
        "CLOUDMAIL_OBSERVERS": ("users", "licenses", "interceptor"),
        "CLOUDMAIL_UNSUBSCRIBE_URL": "https://host.example/cloudmail/unsubscribe/{token}",
    }


def _count(db, model, *where) -> int:
    return db.session.execute(
        sa.select(sa.func.count()).select_from(model).where(*where)
    ).scalar()


def test_welcome_once_even_when_the_signal_fires_twice(
    app: Flask, db, outbox: Path
) -> None:
    signals.user_registered.send(app, user_id=1, email="new@example.com", name="Nia")
    signals.user_registered.send(app, user_id=1, email="new@example.com", name="Nia")
    signals.user_registered.send(app, user_id=2, email="two@example.com")

    job = db.session.execute(sa.select(Job)).scalar_one()
    assert (job.kind, job.total, job.sent, job.status) == ("welcome", 2, 2, "done")
    assert _count(db, Claim, Claim.kind == "welcome") == 2
    assert len(list(outbox.glob("job-*/*.eml"))) == 2


def test_welcome_once_under_concurrent_signals(app: Flask, db, outbox: Path) -> None:
    barrier = threading.Barrier(4)

    def fire() -> None:
        barrier.wait()
        signals.user_registered.send(app, user_id=9, email="race@example.com")

    threads = [threading.Thread(target=fire) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert _count(db, Recipient) == 1
    assert _count(db, Job) == 1
    assert len(list(outbox.glob("job-*/*.eml"))) == 1


def test_email_change_moves_unsent_mail_and_suppressions(app: Flask, db) -> None:
    job = manager.create_job(
        [{"email": "old@example.com"}, {"email": "x@example.com"}],
        subject="s",
        html="h",
        category="news",
    )
    sent_job = manager.create_job([{"email": "old@example.com"}], subject="s", html="h")
    manager.start_job(sent_job.id)
    db.session.add_all(
        [
            Suppression(
                email_key="old@example.com", category="news", reason="unsubscribe"
            ),
            Suppression(
                email_key="old@example.com", category="offers", reason="unsubscribe"
            ),
            Suppression(
                email_key="new@example.com", category="offers", reason="unsubscribe"
            ),
        ]
    )
    db.session.commit()

    signals.user_email_changed.send(
        app, user_id=3, old_email="OLD@example.com", new_email="New@Example.com"
    )

    db.session.expire_all()
    pending = (
        db.session.execute(
            sa.select(Recipient.email)
            .where(Recipient.job_id == job.id)
            .order_by(Recipient.id)
        )
        .scalars()
        .all()
    )
    assert pending == ["New@example.com", "x@example.com"]
    sent = db.session.execute(
        sa.select(Recipient.email).where(Recipient.job_id == sent_job.id)
    )
    assert sent.scalars().all() == ["old@example.com"]  # history is not rewritten
    assert sorted(
        db.session.execute(sa.select(Suppression.email_key, Suppression.category)).all()
    ) == [("new@example.com", "news"), ("new@example.com", "offers")]


def test_deleted_user_is_gone_from_every_cloudmail_table(
    app: Flask, db, outbox: Path
) -> None:
    from flask_mailman import EmailMessage, Mail

    # Mail of every kind to the user: a welcome (sent), an intercepted message with
    # them in Cc (sent), a license mail (pending), a suppression and a stored event.
    app.config["MAIL_BACKEND"] = "cloudmail.observers.interceptor.EmailBackend"
    Mail(app)
    signals.user_registered.send(app, user_id=5, email=ADDRESS, name="Erin")
    EmailMessage(
        "Invoice",
        f"Dear Erin ({ADDRESS})",
        "shop@example.com",
        to=["other@example.com"],
        cc=[f"Erin <{ADDRESS}>"],
    ).send()
    pending = manager.create_job(
        [
            {"email": ADDRESS, "name": "Erin", "city": "Oslo"},
            {"email": "stays@example.com"},
        ],
        subject="s",
        html="h",
        category="news",
    )
    db.session.add(
        Suppression(email_key=ADDRESS.lower(), category="news", reason="unsubscribe")
    )
    db.session.add(
        Event(
            source="ses",
            event_id="e1",
            recipient=ADDRESS.lower(),
            kind="Delivery",
            payload=f'{{"mail": {{"destination": ["{ADDRESS}"]}}}}',
        )
    )
    db.session.commit()
    counts_before = db.session.execute(sa.select(Job.id, Job.total)).all()

    signals.user_deleted.send(app, user_id=5, email=ADDRESS)

    db.session.expire_all()
    assert _find_address(db, ADDRESS) == []
    assert db.session.execute(sa.select(Job.id, Job.total)).all() == counts_before
    stopped = db.session.execute(
        sa.select(Recipient.status, Recipient.reason)
        .where(Recipient.job_id == pending.id)
        .order_by(Recipient.id)
    ).all()
    assert stopped == [("suppressed", "user_deleted"), ("pending", None)]
    assert manager.job_summary(pending.id)["counters"]["suppressed"] == 1
    # The other recipient's copy of the intercepted message is intact but for the address.
    raw = db.session.execute(sa.select(StoredMessage.raw)).scalar_one()
    assert b"other@example.com" in raw and b"erased.invalid" in raw


def _find_address(db, address: str) -> list[str]:
    """Every ``table.column`` of cloudmail's tables that still holds the address."""
    found = []
    needle = address.lower()
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, sa.String):
                hit = sa.func.lower(column).contains(needle, autoescape=True)
            elif isinstance(column.type, sa.LargeBinary):
                values = db.session.execute(sa.select(column)).scalars()
                if any(needle.encode() in (v or b"").lower() for v in values):
                    found.append(f"{table.name}.{column.name}")
                continue
            else:
                continue
            if db.session.execute(
                sa.select(sa.func.count()).select_from(table).where(hit)
            ).scalar():
                found.append(f"{table.name}.{column.name}")
    return found
