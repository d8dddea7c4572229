"""What the observers share: isolated receivers, claims, templates and rolling jobs.

An observer runs inside the host's call (its request, its CLI command). It works in an
app context of its own, so it has a database session of its own: its commits and
rollbacks never touch the host's transaction, and a failure is logged, never raised
into the host (a receiver that raises would also stop the receivers after it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import wraps
from typing import Any

import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import dispatch, tracking
from ..errors import ConfigurationError, DispatchError
from ..extension import get_state
from ..importer import ColumnMap, RowBuilder, write_rows
from ..models import Batch, Job, Suppression, utcnow
from ..settings import all_settings
from ..states import JOB_ACTIVE
from .models import Claim, RollingJob

logger = logging.getLogger(__name__)

Receiver = Callable[..., None]

#: Job kinds the observers create; ``flush_pending`` looks at these only.
OBSERVER_KINDS = ("transactional", "welcome", "license", "reengagement")

_CHUNK = 500


def guarded(name: str) -> Callable[[Receiver], Receiver]:
    """Make a signal receiver safe to connect: its own app context, its own session,
    and every failure logged with the observer's name instead of raised."""

    def decorate(func: Receiver) -> Receiver:
        @wraps(func)
        def receiver(sender: Flask, **kwargs: Any) -> None:
            try:
                with sender.app_context():
                    func(sender, **kwargs)
            except Exception:
                logger.exception("Observer %s failed on %s", name, func.__name__)

        return receiver

    return decorate


def session() -> Session:
    return get_state().db.session


# -- claims ----------------------------------------------------------------------------


def insert_ignoring_duplicates(db_session: Session, table: sa.Table) -> Any:
    """An INSERT that skips rows a unique constraint already holds."""
    name = db_session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise ConfigurationError(
        f"cloudmail's observers support PostgreSQL and SQLite, not {name!r}."
    )


def claim(db_session: Session, kind: str, keys: Iterable[str]) -> set[str]:
    """Claim each key of ``kind`` once; return the keys this call won.

    The claims belong to the caller's transaction: they count only once it commits,
    and a concurrent claimant of the same key waits for it, then gets nothing.
    """
    now = utcnow()
    # A fixed order keeps two concurrent claimants from locking each other out.
    ordered = sorted(set(keys))
    won: set[str] = set()
    for start in range(0, len(ordered), _CHUNK):
        rows = [
            {"kind": kind, "key": key, "created_at": now}
            for key in ordered[start : start + _CHUNK]
        ]
        statement = insert_ignoring_duplicates(db_session, Claim.__table__)
        won.update(
            db_session.execute(statement.values(rows).returning(Claim.key)).scalars()
        )
    return won


# -- templates -------------------------------------------------------------------------


def load_template(kind: str) -> tuple[str, str, str]:
    """The subject, HTML and text sources of ``cloudmail/mail/<kind>``.

    They are read through the app's Jinja loader, so a host file at the same path
    wins; the job keeps its own copy and renders it in cloudmail's sandbox.
    """
    env = current_app.jinja_env
    if env.loader is None:
        raise ConfigurationError("The app's Jinja environment has no template loader.")

    def source(name: str) -> str:
        return env.loader.get_source(env, f"cloudmail/mail/{name}")[0]  # type: ignore[union-attr]

    return (
        source(f"{kind}_subject.txt").strip(),
        source(f"{kind}.html"),
        source(f"{kind}.txt"),
    )


def recipient_rows(
    users: Iterable[Mapping[str, Any]], **extra: Any
) -> list[dict[str, Any]]:
    """Turn the host's user dicts into recipient rows (``email``, ``name``,
    ``user_id`` and every other key as a template variable)."""
    rows = []
    for user in users:
        row = {k: v for k, v in user.items() if k != "id"}
        row["user_id"] = str(user["id"])
        row.setdefault("name", None)
        rows.append({**row, **extra})
    return rows


# -- rolling jobs ----------------------------------------------------------------------


def open_rolling_job(
    kind: str,
    category: str,
    *,
    template: tuple[str, str, str] | None = None,
    sender: str | None = None,
) -> RollingJob:
    """Return today's job of ``kind`` and ``category``, creating it when needed.

    Commits: call it before the transaction that appends to the job. A job an admin
    cancelled is replaced by a new one, so later mail of the day still goes out.
    """
    db_session = session()
    day = utcnow().date()
    # Each pass either returns a job or loses a race (and the next pass reads it).
    for _ in range(5):
        rolling = db_session.execute(
            sa.select(RollingJob).where(
                RollingJob.kind == kind,
                RollingJob.category == category,
                RollingJob.day == day,
            )
        ).scalar_one_or_none()
        if rolling is not None and _job_status(rolling.job_id) != "cancelled":
            return rolling

        job = _new_job(kind, category, template, sender, day.isoformat())
        db_session.add(job)
        try:
            db_session.flush()
            if rolling is None:
                db_session.add(
                    RollingJob(kind=kind, category=category, day=day, job_id=job.id)
                )
                db_session.flush()
            elif not _replace_job(db_session, rolling, job.id):
                db_session.rollback()
                continue
        except IntegrityError:
            # Another request opened today's job first; use theirs.
            db_session.rollback()
            continue

        db_session.commit()
        logger.info("Job %s opened for %s mail (%s) of %s", job.id, kind, category, day)
    raise RuntimeError(
        f"Could not open today's {kind} job for {category!r}; try again."
    )


def _job_status(job_id: int) -> str:
    return session().execute(sa.select(Job.status).where(Job.id == job_id)).scalar_one()


def _replace_job(db_session: Session, rolling: RollingJob, job_id: int) -> bool:
    """Point a rolling row at a new job, unless another request already did."""
    return bool(
        db_session.execute(
            sa.update(RollingJob)
            .where(RollingJob.id == rolling.id, RollingJob.job_id == rolling.job_id)
            .values(job_id=job_id, next_batch=0)
            .execution_options(synchronize_session=False)
        ).rowcount
    )


def _new_job(
    kind: str,
    category: str,
    template: tuple[str, str, str] | None,
    sender: str | None,
    day: str,
) -> Job:
    settings = all_settings()
    subject, html, text = template or ("(composed by the host)", "", None)
    return Job(
        name=f"{kind.capitalize()} mail {day} ({category})",
        kind=kind,
        category=category,
        status="queued",
        provider=settings["provider"],
        sender=settings["sender"] or sender or "",
        reply_to=settings["reply_to"],
        subject_template=subject,
        html_template=html,
        text_template=text,
        batch_size=settings["batch_size"],
        unsubscribe=False,
    )


def append(
    db_session: Session, rolling: RollingJob, rows: Sequence[Mapping[str, Any]]
) -> int | None:
    """Add ``rows`` to a rolling job as one new batch; return the batch id, or None
    when no row is sendable. The caller commits."""
    job_id = rolling.job_id
    category = db_session.execute(
        sa.select(Job.category).where(Job.id == job_id)
    ).scalar_one()

    # 1. Take the next batch number; the increment is atomic across requests.
    number = db_session.execute(
        sa.update(RollingJob)
        .where(RollingJob.id == rolling.id)
        .values(next_batch=RollingJob.next_batch + 1)
        .returning(RollingJob.next_batch)
        .execution_options(synchronize_session=False)
    ).scalar_one()

    # 2. Check the addresses as an import does; mark the suppressed ones.
    builder = RowBuilder(job_id, ColumnMap(email="email", name="name"), batch_size=1)
    built = [list(builder.build(line, row)) for line, row in enumerate(rows, start=1)]
    listed = _suppressed({row[5] for row in built if row[8] == "pending"}, category)
    seen: set[str] = set()
    for row in built:
        if row[8] != "pending":
            continue
        if row[5] in seen:
            row[1:] = [
                None,
                *row[2:8],
                "rejected",
                "duplicate",
                "Listed twice in one message.",
            ]
        elif row[5] in listed:
            row[1:] = [
                None,
                *row[2:8],
                "suppressed",
                "suppressed",
                "The address is on the suppression list.",
            ]
        else:
            row[1] = number
        seen.add(row[5])
    write_rows(db_session, (tuple(row) for row in built))

    # 3. Count them and plan the batch.
    counts = {"total": len(built)}
    for row in built:
        counts[row[8]] = counts.get(row[8], 0) + 1
    db_session.execute(
        sa.update(Job)
        .where(Job.id == job_id)
        .values({name: getattr(Job, name) + n for name, n in counts.items()})
        .execution_options(synchronize_session=False)
    )
    if not counts.get("pending"):
        return None

    batch = Batch(job_id=job_id, number=number, size=counts["pending"])
    db_session.add(batch)
    db_session.flush()
    # A drained job went "done"; new mail opens it again.
    tracking.move_job(db_session, job_id, "queued", only_from=("done",), strict=False)
    return batch.id


def _suppressed(keys: set[str], category: str | None) -> set[str]:
    if not keys:
        return set()

    scopes = ["", category] if category else [""]
    return set(
        session()
        .execute(
            sa.select(Suppression.email_key).where(
                Suppression.email_key.in_(keys), Suppression.category.in_(scopes)
            )
        )
        .scalars()
    )


def hand_over(job_id: int) -> None:
    """Enqueue a job's pending batches; with Redis down they stay pending for
    :func:`flush_pending` (the host's call goes on)."""
    status = (
        session().execute(sa.select(Job.status).where(Job.id == job_id)).scalar_one()
    )
    if status not in JOB_ACTIVE:
        # A paused job keeps its new batches pending until an admin resumes it.
        return

    try:
        dispatch.enqueue_batches(job_id)
    except DispatchError as err:
        logger.warning(
            "Job %s: batches kept pending until the queue is back: %s", job_id, err
        )


def flush_pending(*, recover: bool = True) -> int:
    """Hand over every pending batch of the observers' running jobs; return how many
    jobs had some.

    Call it from a scheduler (cron, rq-scheduler) so mail kept while Redis was down
    leaves once it is back; every drain of intercepted mail does it too. With
    ``recover`` it first puts back hand-offs a killed worker left half-read.
    """
    if recover:
        from .interceptor import recover_handoffs

        recover_handoffs(current_app._get_current_object())  # type: ignore[attr-defined]
    job_ids = list(
        session()
        .execute(
            sa.select(Batch.job_id)
            .distinct()
            .join(Job, Job.id == Batch.job_id)
            .where(
                Batch.status == "pending",
                Job.kind.in_(OBSERVER_KINDS),
                Job.status.in_(JOB_ACTIVE),
            )
            .order_by(Batch.job_id)
        )
        .scalars()
    )
    for job_id in job_ids:
        hand_over(job_id)
    return len(job_ids)
