"""Tracking: precedence, out-of-order events and reports, exact counters, signals."""

from __future__ import annotations

import itertools
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import signals, tracking
from cloudmail.extension import get_state
from cloudmail.models import Event, Job, Recipient, Suppression
from test_ses_callback import (  # noqa: F401  (fixtures)
    app_config,
    counters,
    event_rows,
    fetch,
    notification,
    post,
    queued_job,
    report,
    sent_job,
    ses_payload,
    status_of,
    suppressed,
)


def deliver(
    client,
    job_id: int,
    rid: int,
    email: str,
    event_type: str = "Delivery",
    *,  # noqa: ANN001, ANN201
    identity: bool = False,
    message_id: str | None = None,
    **options: Any,
):
    payload = ses_payload(
        event_type,
        message_id or f"ses-{rid}",
        [email],
        identity=identity,
        job_id=job_id,
        rid=rid,
        **options,
    )
    return post(client, notification(payload))


def recount_matches(job_id: int) -> bool:
    """The job's counters equal a fresh count of its recipients."""
    session = get_state().db.session
    session.expire_all()
    kept = session.get(Job, job_id).counters()
    fresh = tracking.recount(session, job_id)
    session.rollback()
    return kept == fresh


# --- Precedence ---


def test_late_delivery_does_not_undo_a_bounce(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 1)

    assert deliver(client, job_id, ids[0], emails[0], "Bounce").status_code == 200
    assert deliver(client, job_id, ids[0], emails[0], "Delivery").status_code == 200

    assert status_of(ids[0]) == "bounced"
    assert counters(job_id) == {"bounced": 1}
    assert event_rows() == [
        ("bounce", emails[0], "applied"),
        ("delivery", emails[0], "applied"),
    ]


def test_complaint_after_delivery_is_recorded(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 2)

    deliver(client, job_id, ids[0], emails[0], "Delivery")
    deliver(client, job_id, ids[0], emails[0], "Complaint")

    assert status_of(ids[0]) == "complained"
    assert counters(job_id) == {"complained": 1, "sent": 1}
    assert suppressed() == [(emails[0], "", "complaint")]


def test_bounce_after_delivery_is_recorded(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 1)

    deliver(client, job_id, ids[0], emails[0], "Delivery")
    deliver(client, job_id, ids[0], emails[0], "Bounce")

    assert (status_of(ids[0]), counters(job_id)) == ("bounced", {"bounced": 1})


def test_nothing_moves_a_complained_recipient(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 1)

    for event_type in ("Complaint", "Bounce", "Delivery", "Reject"):
        deliver(client, job_id, ids[0], emails[0], event_type)

    assert (status_of(ids[0]), counters(job_id)) == ("complained", {"complained": 1})


# --- Out of order: events before the report ---


@pytest.mark.parametrize("identity", [False, True], ids=["tagged", "identity"])
def test_event_before_its_report_waits_and_is_applied_by_the_report(
    app: Flask, client, identity: bool
) -> None:
    job_id, batch_id, ids = queued_job(2)

    early = deliver(client, job_id, ids[0], "r0@example.com", identity=identity)

    assert early.status_code == 200
    assert event_rows() == [("delivery", "r0@example.com", "pending")]
    assert status_of(ids[0]) == "queued"

    assert report(
        client, job_id, batch_id, {ids[0]: f"ses-{ids[0]}", ids[1]: f"ses-{ids[1]}"}
    ).get_json() == {"ok": True, "sent": 2, "failed": 0, "ignored": 0}

    assert event_rows() == [("delivery", "r0@example.com", "applied")]
    assert [status_of(rid) for rid in ids] == ["delivered", "sent"]
    assert counters(job_id) == {"delivered": 1, "sent": 1}
    assert get_state().db.session.get(Job, job_id).status == "done"


def test_permanent_bounce_before_the_report_suppresses_at_once(
    app: Flask, client
) -> None:
    job_id, batch_id, ids = queued_job(1)

    deliver(client, job_id, ids[0], "r0@example.com", "Bounce", identity=True)

    assert suppressed() == [("r0@example.com", "", "bounce")]
    assert status_of(ids[0]) == "queued"
    report(client, job_id, batch_id, {ids[0]: f"ses-{ids[0]}"})
    assert (status_of(ids[0]), counters(job_id)) == ("bounced", {"bounced": 1})


STEPS = ("report", "delivery", "bounce", "complaint", "delivery-again")


def _play(
    client,
    job_id: int,
    batch_id: int,
    rid: int,
    email: str,
    step: str,  # noqa: ANN001
    identity: bool,
) -> None:
    if step == "report":
        response = report(client, job_id, batch_id, {rid: f"ses-{rid}"})
    else:
        event_type = {
            "delivery": "Delivery",
            "bounce": "Bounce",
            "complaint": "Complaint",
            "delivery-again": "Delivery",
        }[step]
        response = deliver(client, job_id, rid, email, event_type, identity=identity)
    assert response.status_code == 200


@pytest.mark.parametrize("identity", [False, True], ids=["tagged", "identity"])
def test_any_order_of_report_and_events_gives_exact_counters(
    app: Flask, client, identity: bool
) -> None:
    # One recipient per order: 120 orders of a report, a Delivery, a permanent Bounce, a
    # Complaint and the Delivery again (as SES may publish it twice).
    orders = list(itertools.permutations(STEPS))
    job_id, batch_id, ids = queued_job(len(orders))

    for order, rid, n in zip(orders, ids, itertools.count()):
        for step in order:
            _play(client, job_id, batch_id, rid, f"r{n}@example.com", step, identity)

    assert counters(job_id) == {"complained": len(orders)}
    assert {status_of(rid) for rid in ids} == {"complained"}
    assert recount_matches(job_id)
    expected = sorted(
        (
            f"r{n}@example.com",
            "",
            "bounce" if o.index("bounce") < o.index("complaint") else "complaint",
        )
        for n, o in enumerate(orders)
    )
    assert suppressed() == expected
    assert {row[2] for row in event_rows()} == {"applied"}
    assert get_state().db.session.get(Job, job_id).status == "done"


def test_any_order_without_complaint_ends_bounced(app: Flask, client) -> None:
    orders = list(
        itertools.permutations(("report", "delivery", "bounce", "delivery-again"))
    )
    job_id, batch_id, ids = queued_job(len(orders))

    for order, rid, n in zip(orders, ids, itertools.count()):
        for step in order:
            _play(
                client, job_id, batch_id, rid, f"r{n}@example.com", step, identity=True
            )

    assert counters(job_id) == {"bounced": len(orders)}
    assert recount_matches(job_id)


def test_concurrent_duplicates_count_once(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 20)
    messages = []
    for rid, email in zip(ids, emails):
        for event_type in ("Delivery", "Bounce", "Complaint"):
            message = notification(
                ses_payload(event_type, f"ses-{rid}", [email], job_id=job_id, rid=rid)
            )
            messages += [message, message]  # SNS redelivers

    errors: list[BaseException] = []

    def worker(chunk: list[dict[str, Any]]) -> None:
        own = app.test_client()
        try:
            for message in chunk:
                # Like SNS: retry a 500 until the endpoint takes the message.
                for _ in range(20):
                    if post(own, message).status_code == 200:
                        break
                else:
                    raise AssertionError("a message was never accepted")
        except BaseException as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [
        threading.Thread(target=worker, args=(messages[i::4],)) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert counters(job_id) == {"complained": 20}
    assert recount_matches(job_id)
    session = get_state().db.session
    assert (
        session.execute(
            sa.select(sa.func.count()).select_from(Event).where(Event.source == "ses")
        ).scalar_one()
        == 60
    )
    assert (
        session.execute(
            sa.select(sa.func.count()).select_from(Suppression)
        ).scalar_one()
        == 20
    )


# --- Correlation ---


def test_tags_find_a_recipient_whose_report_had_no_message_id(
    app: Flask, client
) -> None:
    job_id, batch_id, ids = queued_job(1)
    report(client, job_id, batch_id, {ids[0]: None})

    deliver(client, job_id, ids[0], "r0@example.com", message_id="ses-from-event")

    session = get_state().db.session
    row = session.execute(
        sa.select(Recipient.status, Recipient.provider_message_id)
    ).one()
    assert tuple(row) == ("delivered", "ses-from-event")


def test_event_about_an_earlier_message_is_ignored(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 1)

    deliver(client, job_id, ids[0], emails[0], "Bounce", message_id="ses-old-attempt")

    assert status_of(ids[0]) == "sent"
    assert event_rows() == [("bounce", emails[0], "ignored")]
    session = get_state().db.session
    assert session.execute(
        sa.select(Event.error).where(Event.source == "ses")
    ).scalar_one() == ("The event is about an earlier attempt.")


def test_address_is_matched_without_case_or_display_name(app: Flask, client) -> None:
    job_id, ids, _ = sent_job(client, 1)

    deliver(client, job_id, ids[0], "Reader <R0@Example.COM>", identity=True)

    assert status_of(ids[0]) == "delivered"
    assert event_rows() == [("delivery", "r0@example.com", "applied")]


# --- Signals ---


def test_signals_name_the_recipient_and_the_event(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 3)
    heard: list[tuple[str, dict[str, Any]]] = []

    def listener(name: str):  # noqa: ANN202
        def receive(sender: Flask, **kwargs: Any) -> None:
            assert sender is app
            heard.append((name, kwargs))

        return receive

    receivers = {
        name: listener(name) for name in ("delivered", "bounced", "complained")
    }
    signals.recipient_delivered.connect(receivers["delivered"], app)
    signals.recipient_bounced.connect(receivers["bounced"], app)
    signals.recipient_complained.connect(receivers["complained"], app)
    try:
        deliver(client, job_id, ids[0], emails[0], "Delivery")
        deliver(client, job_id, ids[0], emails[0], "Delivery")  # no move, no signal
        deliver(
            client,
            job_id,
            ids[1],
            emails[1],
            "Bounce",
            bounce_type="Transient",
            bounce_subtype="MailboxFull",
        )
        deliver(client, job_id, ids[2], emails[2], "Complaint")
    finally:
        signals.recipient_delivered.disconnect(receivers["delivered"], app)
        signals.recipient_bounced.disconnect(receivers["bounced"], app)
        signals.recipient_complained.disconnect(receivers["complained"], app)

    session = get_state().db.session
    event_ids = list(
        session.execute(
            sa.select(Event.id).where(Event.source == "ses").order_by(Event.id)
        ).scalars()
    )
    assert heard == [
        (
            "delivered",
            {"job_id": job_id, "recipient_ids": [ids[0]], "event_id": event_ids[0]},
        ),
        (
            "bounced",
            {
                "job_id": job_id,
                "recipient_ids": [ids[1]],
                "event_id": event_ids[2],
                "permanent": False,
                "bounce_type": "Transient",
                "bounce_subtype": "MailboxFull",
            },
        ),
        (
            "complained",
            {
                "job_id": job_id,
                "recipient_ids": [ids[2]],
                "event_id": event_ids[3],
                "feedback_type": "abuse",
            },
        ),
    ]


def test_new_sns_message_ids_are_distinct_events(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 1)
    payload = ses_payload("Open", f"ses-{ids[0]}", emails, job_id=job_id, rid=ids[0])

    post(client, notification(payload, sns_id=str(uuid.uuid4())))
    post(client, notification(payload, sns_id=str(uuid.uuid4())))

    assert event_rows() == [
        ("open", emails[0], "applied"),
        ("open", emails[0], "applied"),
    ]
    assert counters(job_id) == {"sent": 1}
