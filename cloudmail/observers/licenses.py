"""The license observer: one allocation of N seats is one job of N recipients.

A user allocated the same license twice is mailed once: each ``(license, user)`` pair
is claimed in the transaction that creates the job, so a signal fired twice, even by
two processes at once, mails nobody twice. The template sees the license as
``license`` (``{{ license.product }}``) and offers a one-click unsubscribe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from flask import Flask

from .. import manager, signals
from ..errors import DispatchError
from ..models import Job
from .base import claim, guarded, load_template, recipient_rows, session

logger = logging.getLogger(__name__)

KIND = "license"
CATEGORY = "license"


def connect(app: Flask) -> None:
    signals.licenses_allocated.connect(on_licenses_allocated, sender=app, weak=False)


@guarded("licenses")
def on_licenses_allocated(
    app: Flask,
    *,
    users: Iterable[Mapping[str, Any]],
    license: Mapping[str, Any],
    **_: Any,
) -> None:
    mail_allocation(users, license)


def mail_allocation(
    users: Iterable[Mapping[str, Any]], license: Mapping[str, Any]
) -> Job | None:
    """Create and start the job for one allocation; None when every user already
    had this license's mail."""
    if license.get("id") in (None, ""):
        raise ValueError("The license has no 'id'; pass license={'id': ..., ...}.")

    license_id = str(license["id"])
    rows = recipient_rows(users, license=dict(license))
    db_session = session()
    won = claim(db_session, KIND, (f"{license_id}:{row['user_id']}" for row in rows))
    rows = [row for row in rows if f"{license_id}:{row['user_id']}" in won]
    if not rows:
        db_session.rollback()
        logger.info("License %s: every user was mailed before", license_id)
        return None

    # create_job commits the claims with the job, or rolls both back.
    subject, html, text = load_template(KIND)
    product = license.get("product") or license.get("name") or license_id
    job = manager.create_job(
        rows,
        subject=subject,
        html=html,
        text=text,
        name=f"License {product}: {len(rows)} seat{'' if len(rows) == 1 else 's'}",
        kind=KIND,
        category=CATEGORY,
    )
    start_with_unsubscribe(job)
    return job


def start_with_unsubscribe(job: Job) -> None:
    """Offer unsubscribe, then send; with Redis down the batches wait for a flush."""
    job.unsubscribe = True
    session().commit()
    try:
        manager.start_job(job.id)
    except DispatchError as err:
        logger.warning(
            "Job %s: batches kept pending until the queue is back: %s", job.id, err
        )
