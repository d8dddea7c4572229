"""The suppression list: filled by bounces and complaints, used by new jobs, managed
by admins through functions and ``flask cloudmail suppressions ...``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import manager, suppressions
from cloudmail.errors import RecipientImportError
from cloudmail.extension import get_state
from cloudmail.models import Event, Recipient, Suppression
from test_ses_callback import (  # noqa: F401  (fixtures)
    app_config,
    fetch,
    notification,
    post,
    sent_job,
    ses_payload,
    suppressed,
)


def test_permanent_bounce_and_complaint_are_suppressed_with_reason_and_event(
    app: Flask, client
) -> None:
    job_id, ids, emails = sent_job(client, 3)
    for rid, email, event_type, options in (
        (ids[0], emails[0], "Bounce", {}),
        (
            ids[1],
            emails[1],
            "Bounce",
            {"bounce_type": "Transient", "bounce_subtype": "General"},
        ),
        (ids[2], emails[2], "Complaint", {}),
    ):
        payload = ses_payload(
            event_type, f"ses-{rid}", [email], job_id=job_id, rid=rid, **options
        )
        assert post(client, notification(payload)).status_code == 200

    session = get_state().db.session
    events = dict(
        session.execute(
            sa.select(Event.recipient, Event.id).where(Event.source == "ses")
        ).all()
    )
    rows = session.execute(
        sa.select(
            Suppression.email_key,
            Suppression.category,
            Suppression.reason,
            Suppression.detail,
            Suppression.source,
        ).order_by(Suppression.email_key)
    ).all()
    assert [tuple(r) for r in rows] == [
        (
            emails[0],
            "",
            "bounce",
            "Permanent General smtp; 550 5.1.1 user unknown",
            f"event:{events[emails[0]]}",
        ),
        (emails[2], "", "complaint", "abuse", f"event:{events[emails[2]]}"),
    ]


def test_new_jobs_skip_suppressed_addresses(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 2)
    payload = ses_payload(
        "Bounce", f"ses-{ids[0]}", emails[:1], job_id=job_id, rid=ids[0]
    )
    post(client, notification(payload))

    job = manager.create_job(
        [{"email": "R0@example.com"}, {"email": "r1@example.com"}],
        subject="x",
        html="x",
    )

    session = get_state().db.session
    rows = session.execute(
        sa.select(Recipient.email_key, Recipient.status, Recipient.reason)
        .where(Recipient.job_id == job.id)
        .order_by(Recipient.id)
    ).all()
    assert [tuple(r) for r in rows] == [
        ("r0@example.com", "suppressed", "suppressed"),
        ("r1@example.com", "pending", None),
    ]
    assert (job.suppressed, job.pending) == (1, 1)


def test_add_list_remove(app: Flask) -> None:
    assert suppressions.add_suppression(
        " Someone@Example.com ", detail="asked by phone"
    )
    assert not suppressions.add_suppression("someone@example.com")
    assert suppressions.add_suppression(
        "someone@example.com", category="newsletter", reason="unsubscribe"
    )

    listed = [
        (s.email_key, s.category, s.reason, s.detail, s.source)
        for s in suppressions.list_suppressions()
    ]
    assert listed == [
        ("someone@example.com", "newsletter", "unsubscribe", None, "admin"),
        ("someone@example.com", "", "admin", "asked by phone", "admin"),
    ]
    assert [s.category for s in suppressions.list_suppressions(category="")] == [""]

    assert suppressions.remove_suppression("SOMEONE@example.com") == 1
    assert suppressions.remove_suppression("someone@example.com") == 0
    assert suppressions.remove_suppression("someone@example.com", category=None) == 1
    assert suppressed() == []


def test_add_refuses_an_unusable_address(app: Flask) -> None:
    with pytest.raises(RecipientImportError) as excinfo:
        suppressions.add_suppression("not an address")

    assert str(excinfo.value) == (
        "The address 'not an address' cannot be suppressed: An email address must have an "
        "@-sign."
    )
    assert isinstance(excinfo.value, ValueError)


def test_unicode_domain_is_keyed_in_punycode(app: Flask) -> None:
    suppressions.add_suppression("anna@bücher.example")

    assert suppressed() == [("anna@xn--bcher-kva.example", "", "admin")]


def test_import_and_export_round_trip(app: Flask) -> None:
    source = io.StringIO(
        "email\na@example.com\nB@example.com\nnot-an-address\na@example.com\n"
    )

    outcome = suppressions.import_suppressions(source)
    again = suppressions.import_suppressions(
        io.StringIO("c@example.com\nb@example.com\n")
    )
    out = io.StringIO()
    count = suppressions.export_suppressions(out)

    assert (outcome.added, outcome.existing, outcome.invalid) == (2, 1, 1)
    assert (again.added, again.existing, again.invalid) == (1, 1, 0)
    assert count == 3
    lines = out.getvalue().splitlines()
    assert lines[0] == "email,category,reason,detail,source,created_at"
    assert [line.split(",")[:5] for line in lines[1:]] == [
        ["a@example.com", "", "import", "", "import"],
        ["b@example.com", "", "import", "", "import"],
        ["c@example.com", "", "import", "", "import"],
    ]

    # An export imports into another database as it was.
    session = get_state().db.session
    session.execute(sa.delete(Suppression))
    session.commit()
    restored = suppressions.import_suppressions(io.StringIO(out.getvalue()))
    assert (restored.added, restored.existing, restored.invalid) == (3, 0, 0)
    assert len(suppressed()) == 3


def test_cli_commands(app: Flask, runner, tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(
        "\ufeffemail;x\nx@example.com\ny@example.com\nbad\n", encoding="utf-8"
    )

    added = runner.invoke(
        args=["cloudmail", "suppressions", "add", "a@example.com", "--detail", "asked"]
    )
    twice = runner.invoke(args=["cloudmail", "suppressions", "add", "a@example.com"])
    bad = runner.invoke(args=["cloudmail", "suppressions", "add", "nobody"])
    imported = runner.invoke(args=["cloudmail", "suppressions", "import", str(listing)])
    listed = runner.invoke(args=["cloudmail", "suppressions", "list"])
    exported = runner.invoke(args=["cloudmail", "suppressions", "export"])
    removed = runner.invoke(
        args=["cloudmail", "suppressions", "remove", "a@example.com"]
    )
    missing = runner.invoke(
        args=["cloudmail", "suppressions", "remove", "a@example.com"]
    )

    assert (added.exit_code, added.output) == (0, "a@example.com suppressed.\n")
    assert twice.output == "a@example.com was already suppressed.\n"
    assert bad.exit_code == 1
    assert bad.output == (
        "Error: The address 'nobody' cannot be suppressed: An email address must have an "
        "@-sign.\n"
    )
    # A header without an 'email' column is one address a line: "email;x" is invalid.
    assert imported.output == "2 added, 0 already listed, 2 invalid.\n"
    assert [line.split()[0] for line in listed.output.splitlines()] == [
        "y@example.com",
        "x@example.com",
        "a@example.com",
    ]
    assert (
        exported.output.splitlines()[0]
        == "email,category,reason,detail,source,created_at"
    )
    assert exported.output.splitlines()[1].startswith(
        "a@example.com,,admin,asked,admin,"
    )
    assert (removed.exit_code, removed.output) == (
        0,
        "a@example.com: 1 entries removed.\n",
    )
    assert (missing.exit_code, missing.output) == (
        1,
        "Error: a@example.com is not on the suppression list.\n",
    )
