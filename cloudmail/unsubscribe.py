"""One-click unsubscribe (RFC 8058), scoped by the mail's category.

Mail that offers it carries ``List-Unsubscribe: <https://.../unsubscribe/TOKEN>`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``. The token is the recipient's id
and the job's category, signed with the app's ``SECRET_KEY`` (itsdangerous): it names
no address, needs no login, and cannot be forged or altered. A GET shows a
confirmation page and changes nothing (link scanners follow links); a POST, from the
page's button or from the mailbox provider's one-click request, puts the address on
the suppression list for that category only: unsubscribing from re-engagement mail
does not stop a password reset. The signed token is the POST's protection, so these
routes are exempt from CSRF tokens (endpoint names start with ``public_``).
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, current_app, render_template, request, url_for
from flask.typing import ResponseReturnValue
from itsdangerous import BadSignature, URLSafeSerializer

from .errors import ConfigurationError
from .extension import get_state
from .models import Job, Recipient
from .suppressions import suppress

logger = logging.getLogger(__name__)

_SALT = "cloudmail-unsubscribe"


def register(bp: Blueprint) -> None:
    """Add the unsubscribe route to cloudmail's blueprint."""
    bp.add_url_rule(
        "/unsubscribe/<token>",
        "public_unsubscribe",
        unsubscribe_page,
        methods=["GET", "POST"],
    )


def scope(job: Job) -> str:
    """The category an unsubscribe from this job's mail applies to."""
    return job.category or job.kind


def make_token(recipient_id: int, category: str) -> str:
    return _serializer().dumps([recipient_id, category])


def read_token(token: str) -> tuple[int, str] | None:
    """The recipient id and category of a token, or None when it is not genuine."""
    try:
        recipient_id, category = _serializer().loads(token)
    except (BadSignature, TypeError, ValueError):
        return None
    if not isinstance(recipient_id, int) or not isinstance(category, str):
        return None
    return recipient_id, category


def recipient_url(job: Job, recipient_id: int) -> str:
    """The https unsubscribe URL for one recipient of ``job``."""
    token = make_token(recipient_id, scope(job))
    template = current_app.config["CLOUDMAIL_UNSUBSCRIBE_URL"]
    if template:
        return template.replace("{token}", token)

    if not current_app.config.get("SERVER_NAME"):
        raise ConfigurationError(
            f"Job {job.id} offers unsubscribe but CLOUDMAIL_UNSUBSCRIBE_URL is not set; "
            "set it to 'https://<host>/cloudmail/unsubscribe/{token}' (or set SERVER_NAME).",
            job_id=job.id,
        )
    return url_for(
        "cloudmail.public_unsubscribe", token=token, _external=True, _scheme="https"
    )


def _serializer() -> URLSafeSerializer:
    secret = current_app.secret_key
    if not secret:
        raise ConfigurationError(
            "Unsubscribe links are signed with SECRET_KEY, which is not set; set it "
            "to a long random value."
        )
    return URLSafeSerializer(secret, salt=_SALT)


def unsubscribe_page(token: str) -> ResponseReturnValue:
    found = read_token(token)
    recipient = _recipient(found[0]) if found else None
    if found is None or recipient is None:
        logger.info(
            "Unsubscribe refused: the token is not genuine or its recipient is gone"
        )
        return render_template("cloudmail/unsubscribe_invalid.html"), 400

    category = found[1]
    context: dict[str, Any] = {
        "category": category,
        "address": _masked(recipient.email),
    }
    if request.method == "GET":
        return render_template("cloudmail/unsubscribe.html", **context)

    session = get_state().db.session
    suppress(
        session,
        recipient.email_key,
        reason="unsubscribe",
        category=category,
        detail=f"One-click unsubscribe, recipient {recipient.id}",
        source="unsubscribe",
    )
    session.commit()
    logger.info("Recipient %s unsubscribed from %r", recipient.id, category)
    return render_template("cloudmail/unsubscribe_done.html", **context)


def _recipient(recipient_id: int) -> Recipient | None:
    session = get_state().db.session
    return session.execute(
        sa.select(Recipient).where(Recipient.id == recipient_id)
    ).scalar_one_or_none()


def _masked(address: str) -> str:
    """``j•••@example.com``: enough for people to recognise their address."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}\u2022\u2022\u2022@{domain}"
