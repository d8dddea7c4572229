"""Re-engagement: the host's query, user-seen, cooldown, suppressions, one job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import signals
from cloudmail.models import Job, Recipient, Suppression
from cloudmail.observers.reengagement import reengage

NOW = datetime.now(UTC)
#: The host's users and their last access, as the demo app keeps them.
USERS = {
    i: {
        "id": i,
        "email": f"u{i}@example.com",
        "name": f"User {i}",
        "lastaccess": NOW - timedelta(days=days),
    }
    for i, days in enumerate([200, 120, 95, 30, 1, 400])
}


def inactive_users(cutoff: datetime) -> list[dict[str, object]]:
    return [dict(u) for u in USERS.values() if u["lastaccess"] < cutoff]


@pytest.fixture
def app_config() -> dict[str, object]:
    return {
        "CLOUDMAIL_OBSERVERS": ("reengagement",),
        "CLOUDMAIL_INACTIVE_USERS": inactive_users,
        "CLOUDMAIL_REENGAGE_DAYS": 90,
        "CLOUDMAIL_REENGAGE_COOLDOWN_DAYS": 30,
        "CLOUDMAIL_UNSUBSCRIBE_URL": "https://host.example/cloudmail/unsubscribe/{token}",
    }


def _mailed(db, job_id: int) -> list[str]:
    return (
        db.session.execute(
            sa.select(Recipient.email)
            .where(Recipient.job_id == job_id, Recipient.status == "sent")
            .order_by(Recipient.email)
        )
        .scalars()
        .all()
    )


def test_one_job_for_the_inactive_skipping_seen_suppressed_and_unsubscribed(
    app: Flask, db
) -> None:
    db.session.add_all(
        [
            Suppression(email_key="u1@example.com", category="", reason="bounce"),
            Suppression(
                email_key="u2@example.com",
                category="reengagement",
                reason="unsubscribe",
            ),
        ]
    )
    db.session.commit()
    # User 5 came back yesterday; the host's lastaccess has not caught up yet.
    signals.user_seen.send(app, user_id=5, at=NOW - timedelta(days=1))

    job = reengage(now=NOW)

    assert (job.kind, job.category, job.unsubscribe) == (
        "reengagement",
        "reengagement",
        True,
    )
    assert _mailed(db, job.id) == ["u0@example.com"]


def test_cooldown_and_a_second_run(app: Flask, db) -> None:
    first = reengage(now=NOW)
    assert _mailed(db, first.id) == [
        "u0@example.com",
        "u1@example.com",
        "u2@example.com",
        "u5@example.com",
    ]

    # The same day again, and within the cooldown: nobody.
    assert reengage(now=NOW) is None
    assert reengage(now=NOW + timedelta(days=20)) is None

    # After the cooldown, those still inactive are due again; one came back meanwhile.
    signals.user_seen.send(app, user_id=0, at=NOW + timedelta(days=10))
    later = reengage(now=NOW + timedelta(days=31))
    assert _mailed(db, later.id) == [
        "u1@example.com",
        "u2@example.com",
        "u5@example.com",
    ]
    assert db.session.execute(sa.select(sa.func.count()).select_from(Job)).scalar() == 2


def test_cli_command(app: Flask, runner) -> None:
    result = runner.invoke(args=["cloudmail", "reengage"])
    assert result.exit_code == 0, result.output
    assert "4 users to re-engage" in result.output

    again = runner.invoke(args=["cloudmail", "reengage"])
    assert again.output.strip() == "Nobody is due for re-engagement."
