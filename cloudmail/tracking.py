"""Moving jobs, batches and recipients between states, keeping the job counters exact.

Every move is a conditional ``UPDATE`` (``... WHERE status = <from>``), so two workers
or a duplicated report can never apply the same move twice, and each recipient move
adjusts the job's per-status counters in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import states
from .errors import ConfigurationError, InvalidTransition
from .models import COUNTED_STATES, Batch, Job, Recipient, utcnow

logger = logging.getLogger(__name__)

_ID_CHUNK = 500


def bump_counters(
    session: Session, job_id: int, source: str, target: str, n: int
) -> None:
    """Move ``n`` from the ``source`` counter of a job to its ``target`` counter."""
    if n <= 0:
        return

    table = Job.__table__
    values: dict[str, Any] = {}
    if source in COUNTED_STATES:
        values[source] = table.c[source] - n
    if target in COUNTED_STATES:
        values[target] = table.c[target] + n
    session.execute(sa.update(table).where(table.c.id == job_id).values(**values))


def move_recipients(
    session: Session,
    job_id: int,
    source: str,
    target: str,
    *conditions: sa.ColumnElement[bool],
    values: dict[str, Any] | None = None,
    returning: bool = False,
) -> list[int] | int:
    """Move the job's recipients in ``source`` that match ``conditions`` to ``target``.

    Returns the moved ids when ``returning`` is set, else how many moved.
    """
    states.check_recipient(source, target)
    statement = (
        sa.update(Recipient)
        .where(Recipient.job_id == job_id, Recipient.status == source, *conditions)
        .values(status=target, updated_at=utcnow(), **(values or {}))
        .execution_options(synchronize_session=False)
    )
    if returning:
        ids = list(session.execute(statement.returning(Recipient.id)).scalars())
        bump_counters(session, job_id, source, target, len(ids))
        return ids

    moved = session.execute(statement).rowcount
    bump_counters(session, job_id, source, target, moved)
    return moved


def move_recipient_ids(
    session: Session,
    job_id: int,
    ids: Sequence[int],
    source: str,
    target: str,
    values: dict[str, Any] | None = None,
) -> int:
    """Move the listed recipients that are still in ``source``; return how many moved."""
    moved = 0
    for start in range(0, len(ids), _ID_CHUNK):
        chunk = ids[start : start + _ID_CHUNK]
        moved += move_recipients(
            session, job_id, source, target, Recipient.id.in_(chunk), values=values
        )  # type: ignore[operator]
    return moved


def move_each(
    session: Session,
    job_id: int,
    source: str,
    target: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] = (),
) -> list[int]:
    """Move individual recipients, each only on the attempt its row names.

    Each row holds ``rid``, ``attempt`` and a value for every name in ``columns``.
    Returns the ids that were in ``source`` on that attempt and so have moved.
    """
    states.check_recipient(source, target)
    if not rows:
        return []

    table = Recipient.__table__
    attempts: dict[int, int] = {}
    ids = [row["rid"] for row in rows]
    for start in range(0, len(ids), _ID_CHUNK):
        attempts.update(
            (r.id, r.attempts)
            for r in session.execute(
                sa.select(table.c.id, table.c.attempts).where(
                    table.c.job_id == job_id,
                    table.c.status == source,
                    table.c.id.in_(ids[start : start + _ID_CHUNK]),
                )
            )
        )
    # A row about an earlier attempt, or repeating a recipient, moves nothing.
    chosen: dict[int, dict[str, Any]] = {}
    for row in rows:
        if attempts.get(row["rid"]) == row["attempt"]:
            chosen.setdefault(row["rid"], row)

    statement = (
        sa.update(table)
        .where(
            table.c.id == sa.bindparam("b_rid"),
            table.c.job_id == job_id,
            table.c.status == source,
            table.c.attempts == sa.bindparam("b_attempt"),
        )
        .values(
            status=target,
            updated_at=utcnow(),
            **{column: sa.bindparam(f"b_{column}") for column in columns},
        )
    )
    params = [
        {f"b_{key}": value for key, value in row.items()} for row in chosen.values()
    ]
    moved = session.connection().execute(statement, params).rowcount if params else 0
    bump_counters(session, job_id, source, target, moved)
    return list(chosen)


def move_job(
    session: Session,
    job_id: int,
    target: str,
    *,
    only_from: Iterable[str] | None = None,
    values: dict[str, Any] | None = None,
    strict: bool = True,
) -> bool:
    """Move a job to ``target``; refuse a move its machine forbids.

    With ``strict`` a refused or lost move raises :class:`InvalidTransition`; without
    it the function returns False (for moves that may legitimately be done already).
    """
    current = job_status(session, job_id)
    allowed = set(states.sources(states.JOB_TRANSITIONS, target))
    if only_from is not None:
        allowed &= set(only_from)
    if current not in allowed:
        if strict:
            states.check_job(current, target)
            raise InvalidTransition(
                f"Job {job_id} is {current!r}; it cannot move to {target!r} from there.",
                job_id=job_id,
            )
        return False

    moved = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.status == current)
        .values(status=target, updated_at=utcnow(), **(values or {}))
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved == 0 and strict:
        raise InvalidTransition(
            f"Job {job_id} changed state while moving to {target!r}; try again.",
            job_id=job_id,
        )
    if moved:
        logger.info("Job %s: %s -> %s", job_id, current, target)
    return bool(moved)


def job_status(session: Session, job_id: int) -> str:
    """The job's status; :class:`LookupError` naming the id if there is no such job."""
    status = session.execute(
        sa.select(Job.status).where(Job.id == job_id)
    ).scalar_one_or_none()
    if status is None:
        raise LookupError(f"There is no job {job_id}.")
    return status


def move_batches(
    session: Session,
    source: str,
    target: str,
    *conditions: sa.ColumnElement[bool],
    values: dict[str, Any] | None = None,
) -> list[int]:
    """Move the batches in ``source`` matching ``conditions``; return their ids."""
    states.check_batch(source, target)
    statement = (
        sa.update(Batch)
        .where(Batch.status == source, *conditions)
        .values(status=target, updated_at=utcnow(), **(values or {}))
        .returning(Batch.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.execute(statement).scalars())


def recount(session: Session, job_id: int) -> dict[str, int]:
    """Recompute a job's counters from its recipients (one scan; used after import)."""
    rows = session.execute(
        sa.select(Recipient.status, sa.func.count())
        .where(Recipient.job_id == job_id)
        .group_by(Recipient.status)
    ).all()
    counts = {state: 0 for state in COUNTED_STATES}
    counts.update({status: n for status, n in rows})
    counts["total"] = sum(n for _, n in rows)
    session.execute(sa.update(Job).where(Job.id == job_id).values(**counts))
    return counts


def settle_batch(session: Session, batch_id: int) -> bool:
    """Mark a dispatched batch done once none of its recipients awaits an outcome."""
    batch = session.execute(
        sa.select(Batch.job_id, Batch.number, Batch.status).where(Batch.id == batch_id)
    ).one_or_none()
    if batch is None or batch.status != "dispatched":
        return False

    waiting = session.execute(
        sa.select(sa.func.count())
        .select_from(Recipient)
        .where(
            Recipient.job_id == batch.job_id,
            Recipient.batch_no == batch.number,
            Recipient.status.in_(("pending", "queued")),
        )
    ).scalar_one()
    if waiting:
        return False

    return bool(
        move_batches(
            session,
            "dispatched",
            "done",
            Batch.id == batch_id,
            values={"finished_at": utcnow()},
        )
    )


def settle_job(session: Session, job_id: int) -> str | None:
    """Finish a job whose recipients all have an outcome; return its new status.

    A job ends ``done`` when every recipient it could send to has an outcome (sent or
    failed alike: failed recipients can be retried), and ``failed`` when no batch
    reached its provider at all.
    """
    job = session.execute(
        sa.select(Job.status, Job.pending, Job.queued).where(Job.id == job_id)
    ).one_or_none()
    if job is None or job.status not in states.JOB_ACTIVE or job.pending or job.queued:
        return None

    open_batches = session.execute(
        sa.select(sa.func.count())
        .select_from(Batch)
        .where(
            Batch.job_id == job_id,
            Batch.status.in_(("pending", "enqueued", "dispatched")),
        )
    ).scalar_one()
    if open_batches:
        return None

    if move_job(
        session, job_id, "done", strict=False, values={"finished_at": utcnow()}
    ):
        return "done"
    return None


def move_recipient(
    session: Session,
    recipient_id: int,
    job_id: int,
    current: str,
    target: str,
    values: dict[str, Any] | None = None,
) -> str | None:
    """Move one recipient towards ``target`` if its machine allows it from where it is.

    An event never moves a recipient backwards: when ``target`` cannot be reached in
    one step from the recipient's state (a Delivery after a Bounce, anything after a
    Complaint), nothing changes. ``current`` is the state the caller read; if another
    transaction moved the recipient meanwhile, the state is read again. Returns the
    state the recipient left, or None when it did not move.
    """
    table = Recipient.__table__
    for _ in range(3):
        if target not in states.RECIPIENT_TRANSITIONS.get(current, ()):
            return None

        moved = session.execute(
            sa.update(table)
            .where(table.c.id == recipient_id, table.c.status == current)
            .values(status=target, updated_at=utcnow(), **(values or {}))
        ).rowcount
        if moved:
            bump_counters(session, job_id, current, target, 1)
            return current

        found = session.execute(
            sa.select(table.c.status).where(table.c.id == recipient_id)
        ).scalar_one_or_none()
        if found is None:
            return None
        current = found

    logger.warning(
        "Recipient %s kept changing state; %r not applied", recipient_id, target
    )
    return None


def insert_or_skip(
    session: Session,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    conflict: Sequence[str],
    returning: Sequence[str] = (),
) -> list[sa.Row[Any]]:
    """Insert ``rows``, silently skipping those that clash on the unique ``conflict``.

    One ``INSERT ... ON CONFLICT DO NOTHING`` (PostgreSQL and SQLite alike), so two
    requests inserting the same key at once cannot both win. Returns the ``returning``
    columns of the rows actually inserted.
    """
    if not rows:
        return []

    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ConfigurationError(
            f"The database is {dialect!r}; cloudmail's tracking needs PostgreSQL or "
            "SQLite (set SQLALCHEMY_DATABASE_URI to one of them)."
        )

    statement = (
        insert(table)
        .values(list(rows))
        .on_conflict_do_nothing(index_elements=list(conflict))
    )
    if not returning:
        session.execute(statement)
        return []
    columns = [table.c[name] for name in returning]
    return list(session.execute(statement.returning(*columns)).all())
