"""The interceptor: Flask-Mailman, Flask-Mail and the mail-outgoing signal."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REDIS_URL
from flask import Flask
from flask_mailman import EmailMultiAlternatives
from flask_mailman import Mail as Mailman
from rq import SimpleWorker

from cloudmail import signals, tasks
from cloudmail.extension import get_state
from cloudmail.models import Batch, Job, Recipient
from cloudmail.observers.base import flush_pending
from cloudmail.observers.models import RollingJob, StoredMessage

PDF = b"%PDF-1.4 fake \x00\x01\x02 binary"


@pytest.fixture
def app_config() -> dict[str, object]:
    return {
        "MAIL_BACKEND": "cloudmail.observers.interceptor.EmailBackend",
        "MAIL_DEFAULT_SENDER": "Shop <shop@example.com>",
        "CLOUDMAIL_OBSERVERS": ("interceptor",),
    }


@pytest.fixture
def mailman(app: Flask) -> Mailman:
    return Mailman(app)


def _parse(path: Path) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(path.read_bytes())  # type: ignore[return-value]


def _mails(outbox: Path) -> dict[int, EmailMessage]:
    return {int(p.stem): _parse(p) for p in outbox.glob("job-*/*.eml")}


def _rich_message() -> EmailMultiAlternatives:
    message = EmailMultiAlternatives(
        subject="Ihre Rechnung für März – Ünïcödé ✓",
        body="Grüße,\nanbei die Rechnung.\n",
        from_email="Buchhaltung Müller <billing@example.com>",
        to=["Zoë Ångström <zoe@example.com>"],
        cc=["Søren Kierkegård <soren@example.org>"],
        bcc=["audit@example.net"],
        reply_to=["Support Çelik <support@example.com>"],
        headers={"X-Order-Id": "A-1001", "X-Cloudmail-Category": "billing"},
    )
    message.attach_alternative("<p>Grüße, <b>anbei</b> die Rechnung.</p>", "text/html")
    message.attach("Rechnung März №7.pdf", PDF, "application/pdf")
    message.attach("notes-ü.txt", "Zeile äöü\n", "text/plain")
    return message


def test_mailman_message_keeps_every_part(
    app: Flask, db, mailman: Mailman, outbox: Path
) -> None:
    assert _rich_message().send() == 1

    _check_rich_message(db, outbox)


@pytest.mark.redis
def test_mailman_message_through_redis_keeps_every_part(
    app: Flask, db, mailman: Mailman, outbox: Path
) -> None:
    app.config["CLOUDMAIL_REDIS_URL"] = REDIS_URL
    queue = get_state(app).queue(app)
    try:
        assert _rich_message().send() == 1
        assert not list(outbox.glob("job-*/*.eml"))  # the request only handed it over
        tasks.worker_app = app
        SimpleWorker([queue], connection=queue.connection).work(burst=True)
    finally:
        queue.empty()
        queue.delete(delete_jobs=True)

    _check_rich_message(db, outbox)


def _check_rich_message(db, outbox: Path) -> None:
    db.session.expire_all()
    job = db.session.execute(sa.select(Job)).scalar_one()
    assert (job.kind, job.category, job.status, job.sent, job.total) == (
        "transactional",
        "billing",
        "done",
        3,
        3,
    )
    mails = _mails(outbox)
    rows = dict(db.session.execute(sa.select(Recipient.id, Recipient.email)).all())
    assert sorted(rows.values()) == [
        "audit@example.net",
        "soren@example.org",
        "zoe@example.com",
    ]
    assert set(mails) == set(rows)
    for mail in mails.values():
        # Flask-Mailman folds a long encoded subject onto its own line; unfolding
        # leaves a space before it, as it would over SMTP.
        assert mail["Subject"].strip() == "Ihre Rechnung für März – Ünïcödé ✓"
        assert mail["From"].addresses[0].display_name == "Buchhaltung Müller"
        assert str(mail["To"].addresses[0]) == "Zoë Ångström <zoe@example.com>"
        assert str(mail["Cc"].addresses[0]) == "Søren Kierkegård <soren@example.org>"
        assert (
            str(mail["Reply-To"].addresses[0]) == "Support Çelik <support@example.com>"
        )
        assert mail["Bcc"] is None  # Bcc travels in the envelope only
        assert mail["X-Cloudmail-Category"] is None
        assert mail["X-Order-Id"] == "A-1001"
        assert "anbei die Rechnung" in mail.get_body(("plain",)).get_content()
        assert "<b>anbei</b>" in mail.get_body(("html",)).get_content()
        attachments = {
            a.get_filename(): a.get_content() for a in mail.iter_attachments()
        }
        # Text travels with CRLF line ends, as over SMTP.
        assert attachments == {
            "Rechnung März №7.pdf": PDF,
            "notes-ü.txt": "Zeile äöü\r\n",
        }
    # Each envelope address got the same message, sent as the host composed it.
    assert len({m["Message-ID"] for m in mails.values()}) == 1


def test_transactional_mail_rolls_into_one_job_per_day_and_category(
    app: Flask, db, mailman: Mailman, outbox: Path
) -> None:
    for i in range(3):
        mailman.send_mail("Reset", f"Code {i}", None, [f"user{i}@example.com"])
    _rich_message().send()

    jobs = db.session.execute(sa.select(Job.category, Job.sent).order_by(Job.id)).all()
    assert jobs == [("transactional", 3), ("billing", 3)]
    assert (
        db.session.execute(sa.select(sa.func.count()).select_from(RollingJob)).scalar()
        == 2
    )
    numbers = (
        db.session.execute(
            sa.select(Batch.number)
            .join(Job)
            .where(Job.category == "transactional")
            .order_by(Batch.number)
        )
        .scalars()
        .all()
    )
    assert numbers == [1, 2, 3]


def test_flask_mail_hook_and_signal(app: Flask, db, outbox: Path) -> None:
    from flask_mail import Mail, Message

    from cloudmail.observers.interceptor import hook_flask_mail

    app.config["MAIL_DEFAULT_SENDER"] = "Shop <shop@example.com>"
    mail = Mail(app)
    hook_flask_mail(mail)
    message = Message(
        "Bestätigung",
        recipients=["ana@example.com"],
        bcc=["log@example.com"],
        body="Danke",
        html="<p>Danke</p>",
    )
    message.attach("Beleg ä.txt", "text/plain", b"x")
    mail.send(message)

    composed = EmailMessage()
    composed["From"] = "Shop <shop@example.com>"
    composed["To"] = "bo@example.com"
    composed["Subject"] = "Direct"
    composed.set_content("Sent through the signal")
    signals.mail_outgoing.send(
        app, message=composed, recipients=["bo@example.com"], category="direct"
    )

    sent = db.session.execute(
        sa.select(Recipient.email, Job.category)
        .join(Job)
        .where(Recipient.status == "sent")
        .order_by(Recipient.email)
    ).all()
    assert sent == [
        ("ana@example.com", "transactional"),
        ("bo@example.com", "direct"),
        ("log@example.com", "transactional"),
    ]
    subjects = sorted(m["Subject"] for m in _mails(outbox).values())
    assert subjects == ["Bestätigung", "Bestätigung", "Direct"]
    hooked = next(m for m in _mails(outbox).values() if m["Subject"] == "Bestätigung")
    assert [a.get_filename() for a in hooked.iter_attachments()] == ["Beleg ä.txt"]


@pytest.mark.redis
def test_redis_down_keeps_the_mail_and_sends_it_when_back(
    app: Flask, db, mailman: Mailman, outbox: Path
) -> None:
    state = get_state(app)
    app.config["CLOUDMAIL_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens there

    assert mailman.send_mail("Reset", "Your code", None, ["kept@example.com"]) == 1

    # Kept in the database: the recipient and a pending batch; nothing sent.
    row = db.session.execute(sa.select(Recipient.status, Recipient.batch_no)).one()
    assert row.status == "pending"
    assert db.session.execute(sa.select(Batch.status)).scalars().all() == ["pending"]
    assert (
        db.session.execute(
            sa.select(sa.func.count()).select_from(StoredMessage)
        ).scalar()
        == 1
    )
    assert not list(outbox.glob("job-*/*.eml"))

    # Redis is back; the next intercepted mail's drain sends both.
    app.config["CLOUDMAIL_REDIS_URL"] = REDIS_URL
    state._redis = None
    queue = state.queue(app)
    try:
        assert (
            mailman.send_mail("Reset", "Another code", None, ["later@example.com"]) == 1
        )
        tasks.worker_app = app
        SimpleWorker([queue], connection=queue.connection).work(burst=True)
    finally:
        queue.empty()
        queue.delete(delete_jobs=True)

    sent = sorted(m["To"] for m in _mails(outbox).values())
    assert sent == ["kept@example.com", "later@example.com"]
    db.session.expire_all()
    assert db.session.execute(sa.select(Job.status, Job.sent)).one() == ("done", 2)


@pytest.mark.redis
def test_flush_sends_what_was_kept_while_redis_was_down(
    app: Flask, db, mailman: Mailman, outbox: Path
) -> None:
    state = get_state(app)
    app.config["CLOUDMAIL_REDIS_URL"] = "redis://127.0.0.1:1/0"
    mailman.send_mail("Reset", "Your code", None, ["kept@example.com"])
    app.config["CLOUDMAIL_REDIS_URL"] = REDIS_URL
    state._redis = None
    queue = state.queue(app)
    try:
        assert flush_pending() == 1
        tasks.worker_app = app
        SimpleWorker([queue], connection=queue.connection).work(burst=True)
    finally:
        queue.empty()
        queue.delete(delete_jobs=True)

    assert [m["To"] for m in _mails(outbox).values()] == ["kept@example.com"]


@pytest.mark.redis
def test_a_hand_off_read_twice_is_recorded_once(
    app: Flask, db, mailman: Mailman
) -> None:
    from cloudmail.observers.interceptor import HandOff, record

    item = HandOff(
        "h1",
        "a@example.com",
        ("x@example.com",),
        "transactional",
        raw=b"From: a@example.com\r\nSubject: x\r\n\r\nx",
    )

    assert record(item) is not None
    assert record(item) is None
    assert (
        db.session.execute(sa.select(sa.func.count()).select_from(Recipient)).scalar()
        == 1
    )
