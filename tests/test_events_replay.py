"""Store first, then apply: a failed apply keeps the event, and a replay applies it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import events, reports, tracking
from cloudmail.extension import get_state
from cloudmail.models import Event
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


def _broken(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("the database went away")


def _stored(source: str = "ses") -> list[tuple[str, int, str | None]]:
    session = get_state().db.session
    session.expire_all()
    rows = session.execute(
        sa.select(Event.status, Event.attempts, Event.error)
        .where(Event.source == source)
        .order_by(Event.id)
    ).all()
    return [tuple(r) for r in rows]


def test_failed_apply_keeps_the_event_and_replay_applies_it(
    app: Flask, client, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, ids, emails = sent_job(client, 1)
    payload = ses_payload("Bounce", f"ses-{ids[0]}", emails, job_id=job_id, rid=ids[0])

    with monkeypatch.context() as patched:
        patched.setattr(tracking, "move_recipient", _broken)
        response = post(client, notification(payload))

    assert response.status_code == 500
    assert _stored() == [("failed", 1, "RuntimeError: the database went away")]
    assert (status_of(ids[0]), suppressed()) == ("sent", [])

    listed = runner.invoke(args=["cloudmail", "events", "list", "--status", "failed"])
    replayed = runner.invoke(args=["cloudmail", "events", "replay"])

    assert "RuntimeError: the database went away" in listed.output
    assert (replayed.exit_code, replayed.output) == (
        0,
        "1 events replayed: 1 applied.\n",
    )
    assert _stored() == [("applied", 2, None)]
    assert status_of(ids[0]) == "bounced"
    assert counters(job_id) == {"bounced": 1}
    assert suppressed() == [(emails[0], "", "bounce")]


def test_sns_retry_after_a_failure_applies_the_stored_event(
    app: Flask, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, ids, emails = sent_job(client, 1)
    message = notification(
        ses_payload("Delivery", f"ses-{ids[0]}", emails, job_id=job_id, rid=ids[0])
    )

    with monkeypatch.context() as patched:
        patched.setattr(tracking, "move_recipient", _broken)
        assert post(client, message).status_code == 500
    retried = post(client, message)
    again = post(client, message)

    assert (retried.status_code, again.status_code) == (200, 200)
    assert _stored() == [("applied", 2, None)]
    assert counters(job_id) == {"delivered": 1}


def test_notification_for_several_recipients_fails_and_replays_as_a_whole(
    app: Flask, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, batch_id, ids = queued_job(2)
    report(client, job_id, batch_id, {rid: "ses-shared" for rid in ids})
    real = tracking.move_recipient

    def fail_second(session: Any, recipient_id: int, *args: Any) -> Any:
        if recipient_id == ids[1]:
            raise RuntimeError("boom")
        return real(session, recipient_id, *args)

    monkeypatch.setattr(tracking, "move_recipient", fail_second)
    payload = ses_payload(
        "Delivery", "ses-shared", ["r0@example.com", "r1@example.com"], job_id=job_id
    )

    assert post(client, notification(payload)).status_code == 500
    # One transaction: the first recipient's move was rolled back with the second's.
    assert _stored() == [("failed", 1, "RuntimeError: boom")] * 2
    assert counters(job_id) == {"sent": 2}
    monkeypatch.setattr(tracking, "move_recipient", real)

    outcome = events.replay()

    assert outcome.counts == {"applied": 2}
    assert counters(job_id) == {"delivered": 2}


def test_failed_report_is_kept_and_replayed(
    app: Flask, client, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, batch_id, ids = queued_job(2)

    with monkeypatch.context() as patched:
        patched.setattr(tracking, "settle_batch", _broken)
        failed = report(
            client, job_id, batch_id, {rid: f"ses-{rid}" for rid in ids}, "rep_a"
        )
    duplicate_while_failed = runner.invoke(args=["cloudmail", "events", "list"])

    assert (failed.status_code, failed.get_json()) == (
        500,
        {"ok": False, "error": "not applied"},
    )
    assert _stored("report") == [("failed", 1, "RuntimeError: the database went away")]
    assert "report" in duplicate_while_failed.output
    assert counters(job_id) == {"queued": 2}

    replayed = runner.invoke(args=["cloudmail", "events", "replay", "--failed"])

    assert replayed.output == "1 events replayed: 1 applied.\n"
    assert _stored("report") == [("applied", 2, None)]
    assert counters(job_id) == {"sent": 2}
    again = report(
        client, job_id, batch_id, {rid: f"ses-{rid}" for rid in ids}, "rep_a"
    )
    assert again.get_json() == {"ok": True, "sent": 0, "failed": 0, "ignored": 2}


def test_replay_all_retries_pending_events_that_still_wait(
    app: Flask, client, runner
) -> None:
    job_id, batch_id, ids = queued_job(1)
    payload = ses_payload(
        "Delivery", f"ses-{ids[0]}", ["r0@example.com"], identity=True
    )
    post(client, notification(payload))

    waiting = runner.invoke(args=["cloudmail", "events", "replay", "--all"])
    nothing = runner.invoke(args=["cloudmail", "events", "replay"])
    both = runner.invoke(args=["cloudmail", "events", "replay", "--all", "--failed"])

    assert waiting.output == "1 events replayed: 1 pending.\n"
    assert nothing.output == "0 events replayed.\n"
    assert both.exit_code == 2
    assert _stored() == [("pending", 2, None)]

    report(client, job_id, batch_id, {ids[0]: f"ses-{ids[0]}"})
    assert _stored() == [("applied", 3, None)]
    assert counters(job_id) == {"delivered": 1}


def test_stored_payload_is_the_body_as_received(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 1)
    message = notification(
        ses_payload("Delivery", f"ses-{ids[0]}", emails, job_id=job_id, rid=ids[0])
    )
    body = json.dumps(message, indent=1)

    post(client, body.encode())

    session = get_state().db.session
    row = session.execute(sa.select(Event).where(Event.source == "ses")).scalar_one()
    assert (row.payload, row.event_id, row.message_id, row.kind, row.recipient_id) == (
        body,
        message["MessageId"],
        f"ses-{ids[0]}",
        "delivery",
        ids[0],
    )


def test_a_report_that_fails_after_the_events_waits_does_not_lose_them(
    app: Flask, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, batch_id, ids = queued_job(1)
    post(
        client,
        notification(
            ses_payload("Complaint", f"ses-{ids[0]}", ["r0@example.com"], identity=True)
        ),
    )

    with monkeypatch.context() as patched:
        patched.setattr(events, "apply_ses", _broken)
        response = report(client, job_id, batch_id, {ids[0]: f"ses-{ids[0]}"})

    # The report itself was applied; the waiting event failed and is kept.
    assert response.status_code == 200
    assert [row[0] for row in _stored()] == ["pending"]
    assert events.replay(events.OPEN).counts == {"applied": 1}
    assert counters(job_id) == {"complained": 1}


def test_reports_module_still_applies_reports_directly(app: Flask) -> None:
    job_id, batch_id, ids = queued_job(1)

    outcome = reports.apply_report(
        {
            "v": 1,
            "id": "outbox-1",
            "job": job_id,
            "batch": batch_id,
            "results": [
                {
                    "rid": ids[0],
                    "key": f"cm-{job_id}-{ids[0]}-1",
                    "status": "sent",
                    "message_id": "m",
                }
            ],
        }
    )

    assert outcome.sent == ids
    assert _stored("report") == []
