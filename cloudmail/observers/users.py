"""The user observer: a welcome on sign-up, address changes and deletions.

- ``user-registered``: one welcome mail per user, ever (a claim on the user id), in
  today's welcome job.
- ``user-email-changed``: mail not yet sent and suppressions follow the new address.
- ``user-deleted``: mail not yet sent is stopped, and the address is erased from every
  cloudmail table, counts kept.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from flask import Flask

from .. import signals, tracking
from ..addresses import AddressChecker
from ..models import Base, Recipient, Suppression
from .base import (
    append,
    claim,
    guarded,
    hand_over,
    load_template,
    open_rolling_job,
    session,
)
from .models import StoredMessage, UserActivity

logger = logging.getLogger(__name__)

WELCOME = "welcome"
ERASED_DOMAIN = "erased.invalid"


def connect(app: Flask) -> None:
    signals.user_registered.connect(on_user_registered, sender=app, weak=False)
    signals.user_email_changed.connect(on_user_email_changed, sender=app, weak=False)
    signals.user_deleted.connect(on_user_deleted, sender=app, weak=False)


@guarded("users")
def on_user_registered(
    app: Flask,
    *,
    user_id: Any,
    email: str,
    name: str | None = None,
    variables: Mapping[str, Any] | None = None,
    **_: Any,
) -> None:
    send_welcome(user_id, email, name=name, variables=variables)


@guarded("users")
def on_user_email_changed(
    app: Flask, *, user_id: Any, old_email: str, new_email: str, **_: Any
) -> None:
    change_address(old_email, new_email)


@guarded("users")
def on_user_deleted(app: Flask, *, user_id: Any, email: str, **_: Any) -> None:
    erase_user(user_id, email)


def send_welcome(
    user_id: Any,
    email: str,
    *,
    name: str | None = None,
    variables: Mapping[str, Any] | None = None,
) -> int | None:
    """Append a user's welcome mail to today's welcome job, once per user ever;
    return the batch id, or None when the user was welcomed before."""
    db_session = session()
    rolling = open_rolling_job(WELCOME, WELCOME, template=load_template(WELCOME))
    if not claim(db_session, WELCOME, [str(user_id)]):
        db_session.rollback()
        logger.info("User %s: welcome already sent", user_id)
        return None

    row = {**(variables or {}), "email": email, "name": name, "user_id": str(user_id)}
    batch_id = append(db_session, rolling, [row])
    db_session.commit()
    hand_over(rolling.job_id)
    return batch_id


def change_address(old_email: str, new_email: str) -> int:
    """Move unsent mail and suppressions to the new address; return how many
    recipients moved."""
    checker = AddressChecker()
    new = checker.check(new_email)
    if not new.ok:
        raise ValueError(f"The new address {new_email!r} is not valid: {new.detail}")

    old_key = _key(checker, old_email)
    db_session = session()
    moved = db_session.execute(
        sa.update(Recipient)
        .where(Recipient.email_key == old_key, Recipient.status == "pending")
        .values(email=new.email, email_display=new.display, email_key=new.key)
        .execution_options(synchronize_session=False)
    ).rowcount

    # A suppression the new address already has in a category wins over the old one.
    taken = sa.select(Suppression.category).where(Suppression.email_key == new.key)
    db_session.execute(
        sa.delete(Suppression)
        .where(Suppression.email_key == old_key, Suppression.category.in_(taken))
        .execution_options(synchronize_session=False)
    )
    db_session.execute(
        sa.update(Suppression)
        .where(Suppression.email_key == old_key)
        .values(email_key=new.key)
        .execution_options(synchronize_session=False)
    )
    db_session.commit()
    logger.info("Address change: %d unsent recipients moved", moved)
    return moved


def erase_user(user_id: Any, email: str) -> int:
    """Stop a deleted user's unsent mail and erase their address everywhere.

    Unsent recipients become ``suppressed`` (reason ``user_deleted``): a final state,
    so retrying a job's failed recipients never mails them. Every row that held the
    address keeps its place in the counts with a placeholder address and no name or
    variables. Returns how many recipient rows were erased.
    """
    checker = AddressChecker()
    key = _key(checker, email)
    placeholder = f"erased-{uuid.uuid4().hex[:16]}@{ERASED_DOMAIN}"
    db_session = session()
    mine = Recipient.email_key == key

    # 1. Stop what has not been sent, job by job so each job's counters stay exact.
    jobs = db_session.execute(
        sa.select(Recipient.job_id)
        .distinct()
        .where(mine, Recipient.status == "pending")
    ).scalars()
    for job_id in list(jobs):
        tracking.move_recipients(
            db_session,
            job_id,
            "pending",
            "suppressed",
            mine,
            values={
                "reason": "user_deleted",
                "batch_no": None,
                "error": "The user was deleted.",
            },
        )

    # 2. Erase the address from the messages the host composed for them.
    stored_ids = {
        _stored_id(variables)
        for variables in db_session.execute(
            sa.select(Recipient.variables).where(mine)
        ).scalars()
    } - {None}
    _scrub_stored(stored_ids, email, key, placeholder)

    # 3. Erase the recipient rows, the suppressions and the activity record.
    erased = db_session.execute(
        sa.update(Recipient)
        .where(mine)
        .values(
            email=placeholder,
            email_display=None,
            email_key=placeholder,
            name=None,
            variables=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    db_session.execute(sa.delete(Suppression).where(Suppression.email_key == key))
    db_session.execute(
        sa.delete(UserActivity).where(UserActivity.user_id == str(user_id))
    )

    # 4. Any other cloudmail table (events, batch errors...) that quotes the address.
    _scrub_other_tables({email, key}, placeholder)
    db_session.commit()
    logger.info("User %s erased: %d recipient rows", user_id, erased)
    return erased


def _key(checker: AddressChecker, email: str) -> str:
    verdict = checker.check(email)
    return verdict.key if verdict.ok else email.strip().lower()


def _stored_id(variables: str | None) -> int | None:
    match = re.search(r'"stored_message":\s*(\d+)', variables or "")
    return int(match.group(1)) if match else None


def _scrub_stored(ids: set[int], email: str, key: str, placeholder: str) -> None:
    # Known limitation: an address inside a base64-encoded part (an attachment, a
    # base64 body) is not found; headers and plain or quoted-printable text are.
    pattern = re.compile(
        b"|".join(re.escape(a.encode("utf-8")) for a in {email.strip(), key}),
        re.IGNORECASE,
    )
    db_session = session()
    for stored_id in sorted(ids):
        stored = db_session.get(StoredMessage, stored_id)
        if stored is not None:
            stored.raw = pattern.sub(placeholder.encode("ascii"), stored.raw)
            stored.sender = pattern.sub(
                placeholder.encode(), stored.sender.encode()
            ).decode()


_HANDLED = {
    "cloudmail_recipients",
    "cloudmail_suppressions",
    "cloudmail_stored_messages",
    "cloudmail_user_activity",
}


def _scrub_other_tables(addresses: set[str], placeholder: str) -> None:
    """Replace the address in every text column of the other cloudmail tables.

    This scans those tables (an index cannot find a substring); deletions are rare.
    """
    pattern = re.compile(
        "|".join(re.escape(a.strip()) for a in addresses), re.IGNORECASE
    )
    db_session = session()
    for table in Base.metadata.sorted_tables:
        keys = list(table.primary_key.columns)
        if table.name in _HANDLED or len(keys) != 1:
            continue

        for column in table.columns:
            if not isinstance(column.type, sa.String) or column.primary_key:
                continue
            condition = sa.or_(
                *(
                    sa.func.lower(column).contains(a.strip().lower(), autoescape=True)
                    for a in addresses
                )
            )
            rows = db_session.execute(sa.select(keys[0], column).where(condition)).all()
            for pk, value in rows:
                db_session.execute(
                    sa.update(table)
                    .where(keys[0] == pk)
                    .values({column.name: pattern.sub(placeholder, value)})
                )
