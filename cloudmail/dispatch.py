"""Sending batches: enqueueing them on RQ and running one in a worker.

A batch is claimed before anything is sent: the claim is a conditional update from
``enqueued`` to ``dispatched``, and then each recipient moves from ``pending`` to
``queued`` the same way, so running one RQ job twice, or two workers racing for it,
never sends a recipient twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from email import errors as email_errors
from email.utils import make_msgid, parseaddr

import sqlalchemy as sa
from flask import current_app
from redis.exceptions import RedisError
from rq import Queue

from . import tracking
from .connectors import BatchInfo, HandOff, OutgoingMessage, get_connector
from .errors import CloudmailError, DispatchError
from .extension import get_state
from .models import Batch, Job, Recipient, utcnow
from .rendering import MessageTemplate, build_message, recipient_context
from .settings import all_settings
from .states import JOB_ACTIVE
from .unsubscribe import recipient_url

logger = logging.getLogger(__name__)

_RENDER_CHUNK = 500

#: The RQ task, by import path so a worker needs no reference to this module's objects.
TASK = "cloudmail.tasks.send_batch"


def enqueue_batches(
    job_id: int, *, progress: Callable[[int], None] | None = None
) -> int:
    """Hand every pending or enqueued batch of a job to RQ, or send them here.

    Returns how many batches were handed over. When Redis refuses them, they go back to
    pending (nothing is lost) and :class:`DispatchError` says how to try again.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    session = get_state().db.session
    # A batch its connector could not wholly hand over failed with its unsent
    # recipients back to pending; reopen it so resume and retry send exactly those.
    waiting = sa.select(Recipient.batch_no).where(
        Recipient.job_id == job_id, Recipient.status == "pending"
    )
    tracking.move_batches(
        session, "failed", "pending", Batch.job_id == job_id, Batch.number.in_(waiting)
    )
    tracking.move_batches(session, "pending", "enqueued", Batch.job_id == job_id)
    session.commit()
    # Batches already "enqueued" go again too: their RQ job may be lost (a Redis
    # restart, a crash before an in-process run). A duplicate RQ job is harmless: only
    # one claim of a batch succeeds.
    ids = list(
        session.execute(
            sa.select(Batch.id).where(
                Batch.job_id == job_id, Batch.status == "enqueued"
            )
        ).scalars()
    )
    if not ids:
        return 0

    queue = get_state().queue(app)
    if queue is None:
        for batch_id in sorted(ids):
            run_batch(batch_id)
            if progress:
                progress(batch_id)
        return len(ids)

    _enqueue_on(queue, job_id, sorted(ids))
    return len(ids)


def _enqueue_on(queue: Queue, job_id: int, ids: Sequence[int]) -> None:
    session = get_state().db.session
    rq_ids = {
        batch_id: f"cloudmail-batch-{batch_id}-{uuid.uuid4().hex[:8]}"
        for batch_id in ids
    }
    try:
        with queue.connection.pipeline() as pipe:
            queue.enqueue_many(
                [
                    Queue.prepare_data(
                        TASK,
                        args=(batch_id,),
                        job_id=rq_ids[batch_id],
                        description=f"cloudmail batch {batch_id} of job {job_id}",
                    )
                    for batch_id in ids
                ],
                pipeline=pipe,
            )
            # enqueue_many only queues commands on the pipeline; nothing exists in
            # Redis until it runs.
            pipe.execute()
    except RedisError as err:
        tracking.move_batches(
            session,
            "enqueued",
            "pending",
            Batch.id.in_(ids),
            values={"last_error": f"Redis refused the batch: {err}"},
        )
        session.commit()
        logger.error(
            "Job %s: Redis refused %d batches; they stay pending", job_id, len(ids)
        )
        raise DispatchError(
            f"Redis refused the batches of job {job_id} ({err}). They stay pending; "
            f"once Redis is back, run 'flask cloudmail resume {job_id}'.",
            job_id=job_id,
        ) from err

    session.execute(
        sa.update(Batch).execution_options(synchronize_session=False),
        [{"id": batch_id, "rq_job_id": rq_id} for batch_id, rq_id in rq_ids.items()],
    )
    session.commit()
    logger.info(
        "Job %s: %d batches enqueued on RQ queue %r", job_id, len(ids), queue.name
    )


def run_batch(batch_id: int) -> str:
    """Claim a batch, render its recipients' mail and hand it to the job's connector.

    Returns ``"skipped"`` when the batch was not there to claim (already taken, or its
    job paused or cancelled), else the batch's status afterwards.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    session = get_state().db.session

    # 1. Claim the batch, only while its job is running.
    active = sa.select(Job.id).where(Job.status.in_(JOB_ACTIVE)).scalar_subquery()
    claimed = tracking.move_batches(
        session,
        "enqueued",
        "dispatched",
        Batch.id == batch_id,
        Batch.job_id.in_(active),
        values={
            "attempts": Batch.attempts + 1,
            "dispatched_at": utcnow(),
            "last_error": None,
        },
    )
    if not claimed:
        session.rollback()
        logger.info(
            "Batch %s: not claimable (taken, or its job is not running)", batch_id
        )
        return "skipped"

    batch = session.execute(sa.select(Batch).where(Batch.id == batch_id)).scalar_one()
    job = session.execute(sa.select(Job).where(Job.id == batch.job_id)).scalar_one()
    tracking.move_job(
        session,
        job.id,
        "sending",
        only_from=("queued",),
        strict=False,
        values={"started_at": utcnow()},
    )

    # 2. Claim its recipients: only those still pending are sent.
    ids = tracking.move_recipients(
        session,
        job.id,
        "pending",
        "queued",
        Recipient.batch_no == batch.number,
        values={"attempts": Recipient.attempts + 1},
        returning=True,
    )
    session.commit()
    logger.info("Batch %s of job %s: claimed %d recipients", batch_id, job.id, len(ids))

    # 3. Render and hand over.
    settings = all_settings()
    info = BatchInfo(
        job_id=job.id,
        batch_id=batch.id,
        number=batch.number,
        attempt=batch.attempts,
        callback_url=_callback_url(app),
    )
    broken: dict[int, str] = {}
    handoff = _hand_over(app, job, info, sorted(ids), settings, broken)  # type: ignore[arg-type]

    # 4. Record what happened and settle.
    return _record(batch, job, handoff, broken)


#: Recovery never touches a batch dispatched more recently than this: its worker may
#: still be sending, and SQS FIFO queues deduplicate a re-sent unit id for 5 minutes.
RECOVER_MINIMUM = timedelta(minutes=10)


def recover_stale(older_than: timedelta = timedelta(minutes=30)) -> list[int]:
    """Hand over again what batches stuck in ``dispatched`` still hold; return their ids.

    A worker killed in the middle of a batch, or reports that never arrived, leave a
    batch ``dispatched`` with recipients ``queued``. Their mail is rendered again and
    handed to the connector under the *same* idempotency keys, so a consumer that
    already sent a key re-reports it instead of sending it again, and sends only what
    never reached it. Recipients the connector refuses stay ``queued`` for the next
    recovery: moving them back to pending would give them new keys.
    """
    if older_than < RECOVER_MINIMUM:
        raise ValueError(
            f"older_than is {older_than}; recover only batches dispatched at least "
            f"{RECOVER_MINIMUM} ago, or a worker still sending could be doubled."
        )

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    session = get_state().db.session
    cutoff = utcnow() - older_than
    active = sa.select(Job.id).where(Job.status.in_(JOB_ACTIVE)).scalar_subquery()
    stale = sa.and_(
        Batch.status == "dispatched",
        Batch.dispatched_at < cutoff,
        Batch.job_id.in_(active),
    )
    recovered = []
    for batch_id in list(session.execute(sa.select(Batch.id).where(stale)).scalars()):
        # Claim it by moving its clock, so two recoveries never take the same batch.
        claimed = session.execute(
            sa.update(Batch)
            .where(Batch.id == batch_id, stale)
            .values(dispatched_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        session.commit()
        if claimed:
            _recover_batch(app, batch_id)
            recovered.append(batch_id)
    return recovered


def _recover_batch(app: object, batch_id: int) -> None:
    session = get_state().db.session
    batch = session.execute(sa.select(Batch).where(Batch.id == batch_id)).scalar_one()
    job = session.execute(sa.select(Job).where(Job.id == batch.job_id)).scalar_one()
    ids = list(
        session.execute(
            sa.select(Recipient.id)
            .where(
                Recipient.job_id == job.id,
                Recipient.batch_no == batch.number,
                Recipient.status == "queued",
            )
            .order_by(Recipient.id)
        ).scalars()
    )
    logger.warning(
        "Batch %s of job %s: stuck dispatched; handing %d queued recipients over again",
        batch.id,
        job.id,
        len(ids),
    )
    info = BatchInfo(
        job_id=job.id,
        batch_id=batch.id,
        number=batch.number,
        attempt=batch.attempts,
        callback_url=_callback_url(app),
    )
    broken: dict[int, str] = {}
    handoff = _hand_over(app, job, info, ids, all_settings(), broken)
    for rid, error in broken.items():
        tracking.move_recipient_ids(
            session,
            job.id,
            [rid],
            "queued",
            "failed",
            values={"reason": "render_error", "error": error[:2000]},
        )
    if handoff.refused:
        first = handoff.refused[min(handoff.refused)]
        session.execute(
            sa.update(Batch)
            .where(Batch.id == batch.id)
            .values(last_error=f"Recovery: {first}"[:2000])
        )
        logger.warning(
            "Batch %s of job %s: %d recipients refused again; they stay queued",
            batch.id,
            job.id,
            len(handoff.refused),
        )
    tracking.settle_batch(session, batch.id)
    finished = tracking.settle_job(session, job.id)
    session.commit()
    if finished:
        from . import signals

        signals.job_finished.send(app, job_id=job.id, status=finished)


def _hand_over(
    app: object,
    job: Job,
    info: BatchInfo,
    ids: list[int],
    settings: dict,
    broken: dict[int, str],
) -> HandOff:
    connector = get_connector(job.provider, app, settings)  # type: ignore[arg-type]
    messages = _messages(job, info, ids, settings, broken)
    try:
        return connector.dispatch(info, messages)
    except DispatchError as err:
        logger.error(
            "Batch %s of job %s: %s", info.batch_id, job.id, err, exc_info=True
        )
        return HandOff(refused={rid: str(err) for rid in ids if rid not in broken})
    except Exception as err:
        # Anything else (a provider SDK's own error, a bug) must not leave the batch
        # claimed with its recipients queued for ever: they go back to pending and the
        # batch fails, so resume sends them again. Known limitation: a connector that
        # raises after handing part of the batch over gets that part sent twice.
        get_state().db.session.rollback()
        logger.error(
            "Batch %s of job %s: the %s connector failed unexpectedly",
            info.batch_id,
            job.id,
            job.provider,
            exc_info=True,
        )
        error = f"The {job.provider} connector failed: {type(err).__name__}: {err}"
        return HandOff(refused={rid: error for rid in ids if rid not in broken})


def _record(batch: Batch, job: Job, handoff: HandOff, broken: dict[int, str]) -> str:
    session = get_state().db.session
    for rid, error in broken.items():
        tracking.move_recipient_ids(
            session,
            job.id,
            [rid],
            "queued",
            "failed",
            values={"reason": "render_error", "error": error[:2000]},
        )
    refused = sorted(handoff.refused)
    if refused:
        tracking.move_recipient_ids(session, job.id, refused, "queued", "pending")
        first_error = handoff.refused[refused[0]]
        tracking.move_batches(
            session,
            "dispatched",
            "failed",
            Batch.id == batch.id,
            values={
                "last_error": first_error[:2000],
                "provider_ref": handoff.provider_ref,
            },
        )
        logger.warning(
            "Batch %s of job %s: %d recipients not handed over; batch failed",
            batch.id,
            job.id,
            len(refused),
        )
    elif handoff.provider_ref:
        session.execute(
            sa.update(Batch)
            .where(Batch.id == batch.id)
            .values(provider_ref=handoff.provider_ref)
        )

    tracking.settle_batch(session, batch.id)
    finished = tracking.settle_job(session, job.id)
    session.commit()
    if finished:
        from . import signals

        signals.job_finished.send(
            current_app._get_current_object(),  # type: ignore[attr-defined]
            job_id=job.id,
            status=finished,
        )
    return session.execute(
        sa.select(Batch.status).where(Batch.id == batch.id)
    ).scalar_one()


def _messages(
    job: Job,
    info: BatchInfo,
    ids: list[int],
    settings: dict,
    broken: dict[int, str],
) -> Iterator[OutgoingMessage]:
    """Render the claimed recipients' mail, a chunk of rows at a time."""
    if job.kind == "transactional":
        # Intercepted mail arrives composed by the host; it is sent as it was stored.
        from .observers.interceptor import stored_messages

        yield from stored_messages(job, ids, broken)
        return

    session = get_state().db.session
    template = MessageTemplate(
        job.subject_template, job.html_template, job.text_template
    )
    domain = parseaddr(job.sender)[1].rpartition("@")[2] or "cloudmail.invalid"
    rate = float(settings.get("send_rate") or 0)
    columns = (
        Recipient.id,
        Recipient.email,
        Recipient.email_display,
        Recipient.name,
        Recipient.variables,
        Recipient.attempts,
    )
    for start in range(0, len(ids), _RENDER_CHUNK):
        chunk = ids[start : start + _RENDER_CHUNK]
        rows = session.execute(
            sa.select(*columns).where(Recipient.id.in_(chunk)).order_by(Recipient.id)
        ).all()
        for row in rows:
            try:
                unsubscribe_url = (
                    recipient_url(job, row.id) if job.unsubscribe else None
                )
                context = recipient_context(
                    email=row.email,
                    display=row.email_display,
                    name=row.name,
                    variables=row.variables,
                    extra={"unsubscribe_url": unsubscribe_url}
                    if unsubscribe_url
                    else None,
                )
                msg = build_message(
                    sender=job.sender,
                    to_email=row.email,
                    to_name=row.name,
                    rendered=template.render(context),
                    reply_to=job.reply_to,
                    message_id=make_msgid(
                        idstring=f"cm{job.id}.{row.id}", domain=domain
                    ),
                    unsubscribe_url=unsubscribe_url,
                )
                raw = msg.as_bytes()
            except (CloudmailError, email_errors.MessageError) as err:
                # One recipient's data must not fail the batch: this mail alone fails.
                broken[row.id] = str(err)
                continue
            yield OutgoingMessage(
                recipient_id=row.id,
                key=f"cm-{job.id}-{row.id}-{row.attempts}",
                to=(row.email,),
                sender=job.sender,
                message_id=msg["Message-ID"],
                raw=raw,
            )
            if rate:
                # Known limitation: the send rate is paced per worker process, so N
                # workers send at up to N times the rate.
                time.sleep(1.0 / rate)


def _callback_url(app: object) -> str | None:
    return app.config.get("CLOUDMAIL_CALLBACK_URL")  # type: ignore[attr-defined]
