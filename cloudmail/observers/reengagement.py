"""The re-engagement observer: one job for the users who stopped coming.

``reengage()`` (also ``flask cloudmail reengage``; schedule either with cron or
rq-scheduler) asks the host's ``CLOUDMAIL_INACTIVE_USERS`` callable for the users
inactive since a cut-off, and mails them, except:

- users ``user-seen`` reported since the cut-off (the signal resets the clock);
- users re-engaged within ``CLOUDMAIL_REENGAGE_COOLDOWN_DAYS``;
- suppressed addresses and users who unsubscribed from re-engagement mail.

Each user is claimed with a conditional update of their activity row, in the
transaction that creates the job, so two runs at once mail nobody twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import click
import sqlalchemy as sa
from flask import Flask, current_app
from flask.cli import with_appcontext

from .. import manager, signals
from ..addresses import AddressChecker
from ..errors import ConfigurationError
from ..models import Job, Suppression, utcnow
from .base import (
    guarded,
    insert_ignoring_duplicates,
    load_template,
    recipient_rows,
    session,
)
from .licenses import start_with_unsubscribe
from .models import UserActivity

logger = logging.getLogger(__name__)

KIND = "reengagement"
CATEGORY = "reengagement"
_CHUNK = 500


def connect(app: Flask) -> None:
    signals.user_seen.connect(on_user_seen, sender=app, weak=False)


@guarded("reengagement")
def on_user_seen(
    app: Flask, *, user_id: Any, at: datetime | None = None, **_: Any
) -> None:
    record_seen(user_id, at)


def record_seen(user_id: Any, at: datetime | None = None) -> None:
    """Remember that a user was active at ``at`` (now by default)."""
    at = at or utcnow()
    db_session = session()
    insert = insert_ignoring_duplicates(db_session, UserActivity.__table__)
    db_session.execute(insert.values(user_id=str(user_id), last_seen_at=at))
    db_session.execute(
        sa.update(UserActivity)
        .where(UserActivity.user_id == str(user_id))
        .where(
            sa.or_(UserActivity.last_seen_at.is_(None), UserActivity.last_seen_at < at)
        )
        .values(last_seen_at=at)
        .execution_options(synchronize_session=False)
    )
    db_session.commit()


def reengage(now: datetime | None = None) -> Job | None:
    """Create and start today's re-engagement job; None when nobody is due."""
    config = current_app.config
    query = config["CLOUDMAIL_INACTIVE_USERS"]
    if query is None:
        raise ConfigurationError(
            "CLOUDMAIL_INACTIVE_USERS is not set; give it a callable that takes a "
            "cut-off datetime and returns the users inactive since then."
        )

    now = now or utcnow()
    cutoff = now - timedelta(days=config["CLOUDMAIL_REENGAGE_DAYS"])
    cooldown = now - timedelta(days=config["CLOUDMAIL_REENGAGE_COOLDOWN_DAYS"])
    users = _not_suppressed(list(query(cutoff)))
    db_session = session()
    claimed = _claim(
        db_session, [str(user["id"]) for user in users], now, cutoff, cooldown
    )
    rows = [row for row in recipient_rows(users) if row["user_id"] in claimed]
    if not rows:
        db_session.rollback()
        logger.info("Re-engagement: nobody is due")
        return None

    # create_job commits the claims with the job, or rolls both back.
    subject, html, text = load_template(KIND)
    job = manager.create_job(
        rows,
        subject=subject,
        html=html,
        text=text,
        name=f"Re-engagement {now.date().isoformat()}",
        kind=KIND,
        category=CATEGORY,
    )
    start_with_unsubscribe(job)
    return job


def _not_suppressed(users: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    checker = AddressChecker()
    keys = {id(user): checker.check(str(user.get("email") or "")).key for user in users}
    listed: set[str] = set()
    values = sorted(set(keys.values()))
    for start in range(0, len(values), _CHUNK):
        listed.update(
            session()
            .execute(
                sa.select(Suppression.email_key).where(
                    Suppression.email_key.in_(values[start : start + _CHUNK]),
                    Suppression.category.in_(("", CATEGORY)),
                )
            )
            .scalars()
        )
    return [user for user in users if keys[id(user)] not in listed]


def _claim(
    db_session: Any, ids: list[str], now: datetime, cutoff: datetime, cooldown: datetime
) -> set[str]:
    """Mark as re-engaged now the users not seen since ``cutoff`` nor re-engaged since
    ``cooldown``; return their ids. The caller's commit makes it count."""
    insert = insert_ignoring_duplicates(db_session, UserActivity.__table__)
    claimed: set[str] = set()
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), _CHUNK):
        chunk = ordered[start : start + _CHUNK]
        db_session.execute(insert.values([{"user_id": user_id} for user_id in chunk]))
        claimed.update(
            db_session.execute(
                sa.update(UserActivity)
                .where(UserActivity.user_id.in_(chunk))
                .where(
                    sa.or_(
                        UserActivity.last_seen_at.is_(None),
                        UserActivity.last_seen_at < cutoff,
                    )
                )
                .where(
                    sa.or_(
                        UserActivity.reengaged_at.is_(None),
                        UserActivity.reengaged_at < cooldown,
                    )
                )
                .values(reengaged_at=now)
                .returning(UserActivity.user_id)
                .execution_options(synchronize_session=False)
            ).scalars()
        )
    return claimed


@click.command("reengage")
@with_appcontext
def reengage_command() -> None:
    """Mail the users inactive for CLOUDMAIL_REENGAGE_DAYS days (one job)."""
    try:
        job = reengage()
    except ConfigurationError as err:
        raise click.ClickException(str(err)) from None
    if job is None:
        click.echo("Nobody is due for re-engagement.")
        return
    click.echo(f"Job {job.id}: {job.total} users to re-engage.")
