"""Events from the callback routes: stored first, then applied, replayable.

Every accepted event is written to ``cloudmail_events`` with its raw payload before it
is applied. An SES notification's rows are inserted and applied in one transaction (one
commit, and the route answers 200 only after it); if applying raises, the rows are
stored again on their own as ``failed`` with the error, the route answers 500 so SNS
retries, and ``flask cloudmail events replay`` can apply them too. A report is stored
and committed, then applied. ``(source, event_id, recipient)`` is unique: a redelivered
event finds its row and changes nothing once applied.

Applying an SES event finds the recipient by the SES message id the worker's report
recorded (and by the ``cloudmail-recipient`` tag when the report recorded none), then
moves it by the recipient machine, which only moves forward (see
:func:`cloudmail.tracking.move_recipient`). An event that arrives before the report
naming its message id stays ``pending``; :func:`cloudmail.reports.apply_report` calls
:func:`apply_waiting` once the report has recorded the id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.orm import Session

from . import reports, signals, suppressions, tracking
from .errors import CloudmailError
from .extension import get_state
from .models import Event, Recipient, utcnow
from .webhooks import ses_events
from .webhooks.ses_events import SesEvent

logger = logging.getLogger(__name__)

SES = "ses"
REPORT = "report"

PENDING, APPLIED, FAILED, IGNORED = "pending", "applied", "failed", "ignored"
#: Statuses an event is (re)applied from.
OPEN = (PENDING, FAILED)

# What each SES event kind makes of its recipient; the other kinds (send, open,
# click, delivery delay, subscription) are recorded without moving anyone.
_TARGETS = {
    ses_events.DELIVERY: "delivered",
    ses_events.BOUNCE: "bounced",
    ses_events.COMPLAINT: "complained",
    ses_events.REJECT: "failed",
    ses_events.RENDERING_FAILURE: "failed",
}
_SETTLED_BY_PROVIDER = frozenset({"sent", "delivered", "bounced", "complained"})
_CHUNK = 500


class EventApplyError(CloudmailError):
    """An event was stored but could not be applied; it is kept for a replay."""


@dataclass
class Stored:
    """A stored event row and whether this delivery created it."""

    id: int
    recipient: str
    status: str
    new: bool


@dataclass
class ReplayOutcome:
    """How many replayed events ended in each status."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1


@dataclass
class _Result:
    status: str
    error: str | None = None
    job_id: int | None = None
    recipient_id: int | None = None
    current: str | None = None
    moved_to: str | None = None


# --- Storing ---


def store(
    source: str,
    event_id: str,
    payload: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    commit: bool = True,
) -> list[Stored]:
    """Store the rows of one delivery (one per recipient), and commit unless told not to.

    Each row holds ``recipient``, ``kind`` and optionally ``message_id``, ``job_id``
    and ``occurred_at``. Returns every row of the delivery, new or already stored.
    """
    session = get_state().db.session
    now = utcnow()
    values = [
        {
            "source": source,
            "event_id": event_id[:128],
            "recipient": row.get("recipient", "")[:320],
            "kind": row["kind"],
            "message_id": row.get("message_id"),
            "job_id": row.get("job_id"),
            "recipient_id": None,
            "status": PENDING,
            "error": None,
            "attempts": 0,
            "payload": payload,
            "occurred_at": row.get("occurred_at"),
            "received_at": now,
            "applied_at": None,
        }
        for row in rows
    ]
    inserted = tracking.insert_or_skip(
        session,
        Event.__table__,
        values,
        ("source", "event_id", "recipient"),
        ("id", "recipient"),
    )
    stored = [Stored(r.id, r.recipient, PENDING, True) for r in inserted]
    if len(stored) < len(values):
        stored.extend(
            _existing(session, source, event_id, {r.recipient for r in inserted})
        )
    if commit:
        session.commit()
    return stored


def _existing(
    session: Session, source: str, event_id: str, skip: set[str]
) -> list[Stored]:
    found = session.execute(
        sa.select(Event.id, Event.recipient, Event.status).where(
            Event.source == source, Event.event_id == event_id[:128]
        )
    ).all()
    return [
        Stored(r.id, r.recipient, r.status, False)
        for r in found
        if r.recipient not in skip
    ]


def recipient_key(address: str) -> str:
    """The key an SES address is stored and matched under (bare, lower-cased).

    Cut to the 320 characters an event row holds, so the stored row and the parsed
    event agree; no address cloudmail sends to is that long.
    """
    return (parseaddr(address)[1] or address).strip().lower()[:320]


# --- Receiving (store, then apply) ---


def receive_ses(
    sns_message_id: str, payload: str, parsed: Sequence[SesEvent]
) -> list[str]:
    """Store one SNS notification's events and apply the new or unfinished ones.

    The rows are inserted first and applied in the same transaction, so one commit
    makes both durable; a notification is answered 200 only after it. When applying
    raises, the transaction is rolled back, the events are stored again as ``failed``
    with the error, and :class:`EventApplyError` is raised (the caller answers 500, so
    SNS delivers the notification again). Returns the status of every recipient's event.
    """
    session = get_state().db.session
    by_key = {recipient_key(event.recipient): event for event in parsed}
    rows = [
        {
            "recipient": key,
            "kind": event.kind,
            "message_id": event.message_id,
            "job_id": event.job_id,
            "occurred_at": event.timestamp,
        }
        for key, event in by_key.items()
    ]

    done: list[tuple[Stored, _Result | None]] = []
    try:
        for row in store(SES, sns_message_id, payload, rows, commit=False):
            if row.status not in OPEN:
                logger.debug(
                    "Event %s: already %s; duplicate ignored", row.id, row.status
                )
                done.append((row, None))
                continue
            # None only when a replay finished this row meanwhile.
            done.append((row, _apply_ses(session, row.id, by_key[row.recipient])))
        session.commit()
    except Exception as err:
        session.rollback()
        for row in store(SES, sns_message_id, payload, rows):
            if row.status in OPEN:
                _record_failure(session, row.id, err)
        raise EventApplyError(
            f"SNS message {sns_message_id}: its events could not be applied; they are "
            "kept for a replay."
        ) from err

    statuses = []
    for row, result in done:
        if result is None:
            statuses.append(row.status)
            continue
        event = by_key[row.recipient]
        if result.moved_to:
            _announce(row.id, event, result)
        if result.status == PENDING:
            result.status = _recheck(row.id, event)
        statuses.append(result.status)
    return statuses


def _recheck(event_row_id: int, event: SesEvent) -> str:
    """Apply a waiting event whose report was committed while it was being stored.

    The report looks for waiting events only after its own commit; if that look came
    before this event's commit, the report missed it, but then the report's message
    ids are visible now.
    """
    session = get_state().db.session
    waiting = (
        _correlate(session, event, recipient_key(event.recipient)).status == PENDING
    )
    session.rollback()
    if waiting:
        return PENDING
    return apply_ses(event_row_id, event)


def receive_report(
    report_id: str, payload: str, report: Mapping[str, Any]
) -> tuple[Stored, reports.ReportOutcome | None]:
    """Store a verified report, then apply it unless it was applied before.

    Returns the stored row and the outcome (None for a duplicate). Raises
    :class:`EventApplyError` when applying failed; the report is kept as ``failed``.
    """
    (row,) = store(
        REPORT, report_id, payload, [{"kind": REPORT, "job_id": report["job"]}]
    )
    if row.status not in OPEN:
        logger.info("Report %s: already %s; duplicate ignored", report_id, row.status)
        return row, None

    return row, apply_report_event(row.id, report)


# --- Applying ---


def apply_ses(event_row_id: int, event: SesEvent) -> str:
    """Apply one stored SES event and commit; return its new status.

    On failure the transaction is rolled back, the event marked ``failed`` with the
    error, and :class:`EventApplyError` raised.
    """
    session = get_state().db.session
    try:
        result = _apply_ses(session, event_row_id, event)
        if result is None:
            session.rollback()
            return _status(session, event_row_id)
        session.commit()
    except Exception as err:
        _record_failure(session, event_row_id, err)
        raise EventApplyError(f"Event {event_row_id} could not be applied.") from err

    logger.debug(
        "Event %s (%s, message %s): %s",
        event_row_id,
        event.kind,
        event.message_id,
        result.status,
    )
    if result.moved_to:
        _announce(event_row_id, event, result)
    return result.status


def apply_report_event(
    event_row_id: int, report: Mapping[str, Any]
) -> reports.ReportOutcome:
    """Apply a stored report (see :func:`cloudmail.reports.apply_report`)."""
    session = get_state().db.session
    try:
        outcome = reports.apply_report(report)
        _finish(session, event_row_id, _Result(APPLIED, job_id=report["job"]))
        session.commit()
    except Exception as err:
        _record_failure(session, event_row_id, err)
        raise EventApplyError(
            f"Report event {event_row_id} could not be applied."
        ) from err
    return outcome


def apply_waiting(message_ids: Iterable[str]) -> int:
    """Apply the pending SES events about ``message_ids``, now that a report named them.

    Called by :func:`cloudmail.reports.apply_report` after its commit. An event that
    fails stays ``failed`` for a replay; it does not fail the report. Returns how many
    events were applied.
    """
    session = get_state().db.session
    ids = sorted(set(message_ids))
    applied = 0
    for start in range(0, len(ids), _CHUNK):
        waiting = list(
            session.execute(
                sa.select(Event.id)
                .where(
                    Event.message_id.in_(ids[start : start + _CHUNK]),
                    Event.status == PENDING,
                    Event.source == SES,
                )
                .order_by(Event.occurred_at, Event.id)
            ).scalars()
        )
        for event_row_id in waiting:
            # The report is committed: a failure here must not fail it. The event stays
            # failed (or pending) and a replay applies it.
            try:
                applied += apply_stored(event_row_id) == APPLIED
            except Exception:
                session.rollback()
                logger.error(
                    "Event %s: waiting event could not be applied",
                    event_row_id,
                    exc_info=True,
                )
    return applied


def apply_stored(event_row_id: int) -> str:
    """Apply a stored event from its saved payload; return its new status."""
    session = get_state().db.session
    row = session.get(Event, event_row_id)
    if row is None:
        raise LookupError(f"There is no event {event_row_id}.")
    source, payload, recipient = row.source, row.payload, row.recipient
    session.expunge(row)

    try:
        if source == REPORT:
            report = reports.validate_report(json.loads(payload))
            apply_report_event(event_row_id, report)
            return APPLIED
        event = _saved_ses_event(payload, recipient)
    except (ValueError, KeyError) as err:
        _record_failure(session, event_row_id, err)
        raise EventApplyError(
            f"Event {event_row_id} has an unreadable payload."
        ) from err
    return apply_ses(event_row_id, event)


def replay(
    statuses: Sequence[str] = (FAILED,), limit: int | None = None
) -> ReplayOutcome:
    """Apply again the events in ``statuses``, oldest first; count where each ended."""
    session = get_state().db.session
    outcome = ReplayOutcome()
    last_id = 0
    done = 0
    while limit is None or done < limit:
        batch = list(
            session.execute(
                sa.select(Event.id)
                .where(Event.status.in_(statuses), Event.id > last_id)
                .order_by(Event.id)
                .limit(_CHUNK if limit is None else min(_CHUNK, limit - done))
            ).scalars()
        )
        session.rollback()
        if not batch:
            break
        for event_row_id in batch:
            try:
                outcome.add(apply_stored(event_row_id))
            except EventApplyError:
                logger.error("Event %s: replay failed", event_row_id, exc_info=True)
                outcome.add(FAILED)
        last_id = batch[-1]
        done += len(batch)
    logger.info("Events replayed: %s", outcome.counts)
    return outcome


def list_events(status: str | None = None, limit: int = 50) -> list[Event]:
    """The most recent events, optionally only those in ``status``."""
    query = sa.select(Event).order_by(Event.id.desc()).limit(limit)
    if status:
        query = query.where(Event.status == status)
    return list(get_state().db.session.execute(query).scalars())


def _apply_ses(session: Session, event_row_id: int, event: SesEvent) -> _Result | None:
    """Find the event's recipient, record the outcome on the event, move the recipient.

    Nothing is committed here. Returns None when another transaction finished the
    event meanwhile (then nothing was done). The job's counter row is updated last, so
    concurrent events of one job hold its lock only until their commit.
    """
    key = recipient_key(event.recipient)
    result = _correlate(session, event, key)
    if not _finish(session, event_row_id, result):
        return None
    if result.status == IGNORED:
        return result

    # The address is bad or unwilling whichever mail it was: suppress it even while
    # the event waits for its report.
    if event.kind == ses_events.COMPLAINT or (
        event.kind == ses_events.BOUNCE and event.permanent
    ):
        reason = (
            suppressions.COMPLAINT
            if event.kind == ses_events.COMPLAINT
            else suppressions.BOUNCE
        )
        detail = " ".join(
            filter(None, [event.bounce_type, event.bounce_subtype, event.diagnostic])
        )
        suppressions.suppress(
            session,
            key,
            reason=reason,
            detail=detail or None,
            source=f"event:{event_row_id}",
        )
    target = _TARGETS.get(event.kind)
    if result.status == PENDING or result.recipient_id is None or target is None:
        return result

    left = tracking.move_recipient(
        session,
        result.recipient_id,
        result.job_id or 0,
        result.current or "",
        target,
        _values(event),
    )
    if left is not None:
        result.moved_to = target
    return result


def _correlate(session: Session, event: SesEvent, key: str) -> _Result:
    """Decide which recipient an event is about, or why it waits or is ignored."""
    table = Recipient.__table__
    columns = (
        table.c.id,
        table.c.job_id,
        table.c.status,
        table.c.email_key,
        table.c.provider_message_id,
    )
    rows = session.execute(
        sa.select(*columns).where(table.c.provider_message_id == event.message_id)
    ).all()
    match = [r for r in rows if r.email_key == key] or (rows if len(rows) == 1 else [])
    if match:
        found = match[0]
        return _Result(
            APPLIED, job_id=found.job_id, recipient_id=found.id, current=found.status
        )

    # No report has named this message id yet: fall back on cloudmail's tags.
    rid = event.recipient_id
    if rid is None:
        if event.tags and event.job_id is None:
            return _Result(IGNORED, "The mail carries no cloudmail tags.")
        return _Result(PENDING, job_id=event.job_id)

    row = session.execute(sa.select(*columns).where(table.c.id == rid)).one_or_none()
    if row is None or (event.job_id is not None and row.job_id != event.job_id):
        return _Result(
            IGNORED, f"Recipient {rid} of job {event.job_id} does not exist."
        )
    if row.status in ("pending", "queued"):
        # The report that says whether this attempt was sent has not come yet.
        return _Result(PENDING, job_id=row.job_id, recipient_id=row.id)
    if row.provider_message_id is not None or row.status not in _SETTLED_BY_PROVIDER:
        return _Result(
            IGNORED, "The event is about an earlier attempt.", row.job_id, row.id
        )

    # Sent without a message id in its report: adopt this one.
    session.execute(
        sa.update(table)
        .where(table.c.id == rid, table.c.provider_message_id.is_(None))
        .values(provider_message_id=event.message_id)
    )
    return _Result(APPLIED, job_id=row.job_id, recipient_id=row.id, current=row.status)


def _values(event: SesEvent) -> dict[str, Any]:
    if event.kind == ses_events.BOUNCE:
        kind = "/".join(filter(None, [event.bounce_type, event.bounce_subtype]))
        return {"reason": (kind or "bounce")[:32], "error": event.diagnostic}
    if event.kind == ses_events.COMPLAINT:
        return {"reason": "complaint", "error": event.diagnostic}
    if event.kind in (ses_events.REJECT, ses_events.RENDERING_FAILURE):
        return {"reason": f"ses_{event.kind}"[:32], "error": event.diagnostic}
    return {}


def _finish(session: Session, event_row_id: int, result: _Result) -> bool:
    """Record the result on the event, only if no one else finished it meanwhile."""
    table = Event.__table__
    claimed = session.execute(
        sa.update(table)
        .where(table.c.id == event_row_id, table.c.status.in_(OPEN))
        .values(
            status=result.status,
            error=result.error,
            job_id=sa.func.coalesce(result.job_id, table.c.job_id),
            recipient_id=result.recipient_id,
            attempts=table.c.attempts + 1,
            applied_at=utcnow() if result.status != PENDING else None,
        )
    ).rowcount
    return bool(claimed)


def _status(session: Session, event_row_id: int) -> str:
    return session.execute(
        sa.select(Event.status).where(Event.id == event_row_id)
    ).scalar_one()


def _record_failure(session: Session, event_row_id: int, err: BaseException) -> None:
    """Roll back, then keep the event as ``failed`` with the error for a replay."""
    session.rollback()
    logger.warning(
        "Event %s could not be applied (%s); kept as failed",
        event_row_id,
        type(err).__name__,
    )
    try:
        session.execute(
            sa.update(Event)
            .where(Event.id == event_row_id)
            .values(
                status=FAILED,
                error=f"{type(err).__name__}: {err}"[:2000],
                attempts=Event.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()
    except Exception:
        session.rollback()
        logger.error(
            "Event %s: its failure could not be recorded", event_row_id, exc_info=True
        )


def _saved_ses_event(payload: str, recipient: str) -> SesEvent:
    envelope = json.loads(payload)
    for event in ses_events.parse_ses_events(envelope["Message"]):
        if recipient_key(event.recipient) == recipient:
            return event
    raise KeyError(f"The saved notification names no recipient {recipient!r}.")


def _announce(event_row_id: int, event: SesEvent, result: _Result) -> None:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    common = {
        "job_id": result.job_id,
        "recipient_ids": [result.recipient_id],
        "event_id": event_row_id,
    }
    if result.moved_to == "delivered":
        signals.recipient_delivered.send(app, **common)
    elif result.moved_to == "bounced":
        signals.recipient_bounced.send(
            app,
            **common,
            permanent=event.permanent,
            bounce_type=event.bounce_type,
            bounce_subtype=event.bounce_subtype,
        )
    elif result.moved_to == "complained":
        signals.recipient_complained.send(app, **common, feedback_type=event.diagnostic)
    elif result.moved_to == "failed":
        signals.recipient_failed.send(
            app, job_id=result.job_id, recipient_ids=[result.recipient_id]
        )
