"""The interceptor: the host's own mail calls, sent through the cloud unchanged.

Three ways in, no change to the host's mail code:

- Flask-Mailman: ``MAIL_BACKEND = "cloudmail.observers.interceptor.EmailBackend"``.
- Flask-Mail: ``hook_flask_mail(mail)`` once at start-up; ``mail.send`` and
  ``mail.send_message`` then hand over instead of speaking SMTP.
- Explicitly: ``signals.mail_outgoing.send(app, message=msg, recipients=[...])``
  (with ``"interceptor"`` in ``CLOUDMAIL_OBSERVERS``).

The message is kept exactly as the host composed it (To, Cc, Reply-To, custom
headers, HTML alternative, attachments); Bcc addresses travel only in the envelope.
Each envelope address becomes a recipient of today's transactional job of the
message's category (``X-Cloudmail-Category`` header, ``"transactional"`` by default).

The request pays for one Redis round trip: the message is pushed onto a list and, when
no drain is scheduled yet, one RQ job is enqueued to drain the list into the database
and send. A Flask-Mailman message travels as the object and is composed by the drain
(its Date stays the time of the hand-off), so the request does not build MIME either. When Redis is unreachable the message is recorded in the database right away
(recipient rows and a pending batch) and sent by the next drain or by
:func:`~cloudmail.observers.base.flush_pending`; the host's call succeeds. Without
``CLOUDMAIL_REDIS_URL`` the message is recorded and sent in the request.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import formatdate, getaddresses, parseaddr
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import Flask, current_app, has_app_context
from redis.exceptions import RedisError

from .. import signals
from ..connectors import OutgoingMessage
from ..extension import get_state
from ..models import Job, Recipient
from .base import (
    append,
    claim,
    flush_pending,
    guarded,
    hand_over,
    open_rolling_job,
    session,
)
from .models import StoredMessage

if TYPE_CHECKING:
    from flask_mail import Mail

# Flask-Mailman is optional: the backend needs it, nothing else does.
try:
    from flask_mailman.backends.base import BaseEmailBackend
except ImportError:
    BaseEmailBackend = object  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

KIND = "transactional"
CATEGORY_HEADER = "X-Cloudmail-Category"
DEFAULT_CATEGORY = "transactional"
DRAIN_TASK = "cloudmail.observers.interceptor.drain"
#: How long a scheduled drain stays the only one; it is cleared when the drain starts.
_GUARD_SECONDS = 60
_HEADERS = BytesHeaderParser()


def connect(app: Flask) -> None:
    signals.mail_outgoing.connect(on_mail_outgoing, sender=app, weak=False)


@guarded("interceptor")
def on_mail_outgoing(
    app: Flask,
    *,
    message: Message | bytes,
    recipients: Sequence[str],
    sender: str | None = None,
    category: str | None = None,
    **_: Any,
) -> None:
    hand_off(message, recipients, sender=sender, category=category)


@dataclass(frozen=True, slots=True)
class HandOff:
    """One message on its way from the host to a transactional job.

    ``raw`` is the message as bytes; a Flask-Mailman message handed over through Redis
    travels as the object instead (``message``) and is composed by the drain, so the
    request does not pay for building the MIME tree.
    """

    id: str
    sender: str
    recipients: tuple[str, ...]
    category: str | None
    raw: bytes | None = None
    message: Any = None
    at: float = 0.0

    def composed(self) -> HandOff:
        """This hand-off with its bytes (composing a Flask-Mailman message)."""
        if self.raw is not None:
            return self

        mime = self.message.message()
        category = self.category or mime.get(CATEGORY_HEADER)
        del mime[CATEGORY_HEADER]
        if not any(k.lower() == "date" for k in self.message.extra_headers):
            # The time the host sent it, not the time the drain got to it.
            del mime["Date"]
            localtime = current_app.extensions["mailman"].use_localtime
            mime["Date"] = formatdate(self.at, localtime=localtime)
        raw = mime.as_bytes(linesep="\r\n")
        return replace(self, raw=raw, message=None, category=category)


# -- the ways in -----------------------------------------------------------------------


class EmailBackend(BaseEmailBackend):  # type: ignore[misc,valid-type]
    """A Flask-Mailman backend that hands every message to cloudmail."""

    def send_messages(self, email_messages: Iterable[Any]) -> int:
        handed = 0
        for message in email_messages:
            recipients = message.recipients()
            if not recipients:
                continue

            try:
                # A copy without its connection: that holds the app, which must not
                # travel through Redis.
                message = copy.copy(message)
                message.connection = None
                item = HandOff(
                    uuid.uuid4().hex,
                    parseaddr(message.from_email)[1],
                    _addresses(recipients),
                    None,
                    message=message,
                    at=time.time(),
                )
                _queue_or_keep(current_app._get_current_object(), item)  # type: ignore[attr-defined]
            except Exception:
                if not self.fail_silently:
                    raise
                logger.exception("Intercepted mail could not be handed over")
                continue
            handed += 1
        return handed


def hook_flask_mail(mail: Mail) -> None:
    """Make ``mail.send`` (and so ``mail.send_message``) hand messages to cloudmail.

    Known limitation: a connection the host opens itself (``mail.connect()``) still
    speaks SMTP.
    """
    from flask_mail import email_dispatched

    def send(message: Any) -> None:
        if message.date is None:
            message.date = time.time()
        headers = message.extra_headers or {}
        category = headers.pop(CATEGORY_HEADER, None)
        try:
            raw = message.as_bytes()
        finally:
            if category is not None:
                headers[CATEGORY_HEADER] = category
        recipients = [r if isinstance(r, str) else r[1] for r in message.send_to]
        sender = (
            message.sender if isinstance(message.sender, str) else message.sender[1]
        )
        hand_off(raw, recipients, sender=sender, category=category)
        email_dispatched.send(current_app._get_current_object(), message=message)  # type: ignore[attr-defined]

    mail.send = send  # type: ignore[method-assign]


def hand_off(
    message: Message | bytes,
    recipients: Sequence[str],
    *,
    sender: str | None = None,
    category: str | None = None,
) -> str:
    """Hand one composed message over; return ``"queued"``, ``"stored"`` (Redis was
    unreachable: kept in the database) or ``"sent"`` (no Redis configured)."""
    if isinstance(message, Message):
        category = category or message.get(CATEGORY_HEADER)
        del message[CATEGORY_HEADER]
        raw = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    else:
        raw = message
    if not sender:
        sender = _HEADERS.parsebytes(raw).get("From", "")
    item = HandOff(
        uuid.uuid4().hex,
        parseaddr(sender or "")[1],
        _addresses(recipients),
        category,
        raw=raw,
    )
    return _queue_or_keep(current_app._get_current_object(), item)  # type: ignore[attr-defined]


def _addresses(recipients: Sequence[str]) -> tuple[str, ...]:
    addresses = tuple(
        address for _, address in getaddresses(list(recipients)) if address
    )
    if not addresses:
        raise ValueError("The message has no recipients; give at least one address.")
    return addresses


def _queue_or_keep(app: Flask, item: HandOff) -> str:
    connection = get_state(app).redis(app)
    if connection is None:
        _record_in_own_context(app, item, send=True)
        return "sent"

    inbox, _, guard = _keys(app)
    try:
        data = _pickled(item)
        with connection.pipeline(transaction=False) as pipe:
            pipe.lpush(inbox, data)
            pipe.set(guard, b"1", nx=True, ex=_GUARD_SECONDS)
            scheduled = pipe.execute()[1]
        if scheduled:
            _schedule_drain(app)
    except RedisError as err:
        # Recorded under its hand-off id: if the push did land, the drain skips it.
        logger.warning(
            "Hand-off %s: Redis unreachable (%s); kept in the database", item.id, err
        )
        _record_in_own_context(app, item, send=False)
        return "stored"
    return "queued"


def _pickled(item: HandOff) -> bytes:
    # Redis is trusted as RQ trusts it: its items are pickles.
    try:
        return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        # A message carrying something that does not pickle travels as its bytes.
        return pickle.dumps(item.composed(), protocol=pickle.HIGHEST_PROTOCOL)


def _keys(app: Flask) -> tuple[str, str, str]:
    base = f"cloudmail:handoff:{app.config['CLOUDMAIL_QUEUE_NAME']}"
    return base, f"{base}:processing", f"{base}:drain-scheduled"


def _schedule_drain(app: Flask) -> None:
    queue = get_state(app).queue(app)
    if queue is not None:
        queue.enqueue_call(
            DRAIN_TASK, result_ttl=0, description="cloudmail hand-off drain"
        )


# -- recording -------------------------------------------------------------------------


def _record_in_own_context(app: Flask, item: HandOff, *, send: bool) -> None:
    # Its own app context, so its own session: the host's transaction is not touched.
    with app.app_context():
        job_id = record(item)
        if send and job_id is not None:
            hand_over(job_id)


def record(item: HandOff) -> int | None:
    """Append a hand-off to today's transactional job; return the job id, or None
    when this hand-off was recorded before."""
    item = item.composed()
    db_session = session()
    rolling = open_rolling_job(
        KIND, item.category or DEFAULT_CATEGORY, sender=item.sender
    )
    if not claim(db_session, "handoff", [item.id]):
        db_session.rollback()
        logger.info("Hand-off %s: already recorded", item.id)
        return None

    stored = StoredMessage(
        job_id=rolling.job_id, sender=item.sender, raw=item.raw or b""
    )
    db_session.add(stored)
    db_session.flush()
    rows = [
        {"email": address, "stored_message": stored.id} for address in item.recipients
    ]
    batch_id = append(db_session, rolling, rows)
    db_session.commit()
    logger.info(
        "Hand-off %s: job %s, batch %s, %d addresses",
        item.id,
        rolling.job_id,
        batch_id,
        len(rows),
    )
    return rolling.job_id


def drain() -> int:
    """RQ job: record every queued hand-off, then enqueue the jobs' batches."""
    app = _worker_app()
    with app.app_context():
        connection = get_state(app).redis(app)
        if connection is None:
            return 0

        inbox, processing, guard = _keys(app)
        # Cleared first: a message pushed from now on schedules a new drain, and one
        # pushed before is still read by the loop below.
        connection.delete(guard)
        recorded = 0
        while (
            data := connection.lmove(inbox, processing, "RIGHT", "LEFT")
        ) is not None:
            record(pickle.loads(data))
            connection.lrem(processing, 1, data)
            recorded += 1
        flush_pending(recover=False)
        logger.info("Drained %d hand-offs", recorded)
        return recorded


def recover_handoffs(app: Flask) -> int:
    """Put back hand-offs a killed drain left half-read, and schedule a drain."""
    connection = get_state(app).redis(app)
    if connection is None:
        return 0

    inbox, processing, _ = _keys(app)
    try:
        moved = 0
        while connection.lmove(processing, inbox, "RIGHT", "RIGHT") is not None:
            moved += 1
        if connection.llen(inbox):
            _schedule_drain(app)
    except RedisError as err:
        logger.warning("Hand-offs not recovered: Redis unreachable (%s)", err)
        return 0
    return moved


def _worker_app() -> Flask:
    if has_app_context():
        return current_app._get_current_object()  # type: ignore[attr-defined]

    from .. import tasks

    if tasks.worker_app is None:
        raise RuntimeError(
            "cloudmail's RQ jobs need the Flask app; run the worker with "
            "'flask cloudmail worker', or set cloudmail.tasks.worker_app."
        )
    return tasks.worker_app


# -- sending ---------------------------------------------------------------------------


def stored_messages(
    job: Job, ids: list[int], broken: dict[int, str]
) -> Iterator[OutgoingMessage]:
    """The claimed recipients' mail, each the stored bytes sent as they are."""
    db_session = session()
    cache: dict[int, tuple[StoredMessage, str]] = {}
    for start in range(0, len(ids), 500):
        rows = db_session.execute(
            sa.select(
                Recipient.id, Recipient.email, Recipient.variables, Recipient.attempts
            )
            .where(Recipient.id.in_(ids[start : start + 500]))
            .order_by(Recipient.id)
        ).all()
        for row in rows:
            stored_id = json.loads(row.variables or "{}").get("stored_message")
            if stored_id not in cache:
                stored = db_session.get(StoredMessage, stored_id) if stored_id else None
                if stored is None:
                    broken[row.id] = "The stored message of this recipient is missing."
                    continue
                cache[stored_id] = (
                    stored,
                    _HEADERS.parsebytes(stored.raw).get("Message-ID", ""),
                )
            stored, message_id = cache[stored_id]
            yield OutgoingMessage(
                recipient_id=row.id,
                key=f"cm-{job.id}-{row.id}-{row.attempts}",
                to=(row.email,),
                sender=stored.sender or job.sender,
                message_id=message_id,
                raw=stored.raw,
            )
