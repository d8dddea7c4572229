"""The job manager: creating jobs, planning batches, and the actions admins take.

>>> job = create_job("users.csv", subject="Hello {{ name }}", html=html)
>>> start_job(job.id)
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

import sqlalchemy as sa
from flask import current_app

from . import dispatch, signals, tracking
from .errors import ConfigurationError, RecipientImportError, TemplateError
from .extension import get_state
from .importer import (
    ColumnMap,
    ImportStats,
    RowBuilder,
    iter_csv_rows,
    iter_dict_rows,
    read_csv,
    write_rows,
)
from .models import Batch, Job, Recipient, Suppression, utcnow
from .rendering import MessageTemplate, recipient_context
from .settings import VALIDATORS, all_settings
from .states import JOB_ACTIVE

logger = logging.getLogger(__name__)

RecipientSource = (
    str | os.PathLike[str] | IO[bytes] | IO[str] | Iterable[Mapping[str, Any]]
)


def create_job(
    recipients: RecipientSource,
    *,
    subject: str,
    html: str,
    text: str | None = None,
    name: str | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    email_column: str | None = None,
    name_column: str | None = None,
    kind: str = "bulk",
    category: str | None = None,
    sender: str | None = None,
    reply_to: str | None = None,
    provider: str | None = None,
    batch_size: int | None = None,
    unsubscribe: bool = False,
) -> Job:
    """Create a draft job and stream its recipients into the database.

    ``recipients`` is a CSV path, a CSV stream (bytes or text), or an iterable of
    dicts. The job is committed with every row recorded: valid rows ``pending``, the
    others ``rejected`` or ``suppressed`` with a reason. Nothing is sent until
    :func:`start_job`. With ``unsubscribe`` each mail carries a one-click unsubscribe
    link (``CLOUDMAIL_UNSUBSCRIBE_URL``) scoped to the job's category. A template error, an unreadable file or a missing variable on
    the first valid recipient raises and leaves nothing behind.
    """
    settings = all_settings()
    if not (sender or settings["sender"]):
        raise ConfigurationError(
            "No sender is set: set CLOUDMAIL_SENDER (or the 'sender' setting), or pass "
            "sender='News <news@example.com>'."
        )
    sender = VALIDATORS["sender"](sender or settings["sender"])
    reply_to = VALIDATORS["reply_to"](
        reply_to if reply_to is not None else settings["reply_to"]
    )
    provider = VALIDATORS["provider"](provider or settings["provider"])
    batch_size = VALIDATORS["batch_size"](
        batch_size if batch_size is not None else settings["batch_size"]
    )
    _check_length("name", name, 200)
    _check_length("category", category, 64)
    template = MessageTemplate(subject, html, text)

    session = get_state().db.session
    job = Job(
        name=name or _default_name(recipients),
        kind=kind,
        category=category,
        status="draft",
        provider=provider,
        sender=sender,
        reply_to=reply_to,
        subject_template=subject,
        html_template=html,
        text_template=text,
        source=_source_name(recipients),
        batch_size=batch_size,
        unsubscribe=unsubscribe,
    )
    session.add(job)
    try:
        session.flush()
        stats = _import(
            session,
            job,
            recipients,
            template,
            encoding=encoding,
            delimiter=delimiter,
            email_column=email_column,
            name_column=name_column,
        )
        _reject_duplicates(session, job.id)
        _suppress(session, job.id, category)
        tracking.recount(session, job.id)
        job.blank_lines = stats.blank_lines
        session.commit()
    except BaseException:
        session.rollback()
        raise

    session.refresh(job)
    logger.info(
        "Job %s created: %d rows, %d to send, %d rejected, %d suppressed",
        job.id,
        job.total,
        job.pending,
        job.rejected,
        job.suppressed,
    )
    signals.job_created.send(_app(), job_id=job.id, kind=job.kind)
    return job


def _check_length(what: str, value: str | None, size: int) -> None:
    if value is not None and len(value) > size:
        raise ConfigurationError(
            f"The job {what} {value[:40]!r}... is {len(value)} characters long; use at "
            f"most {size}."
        )


def _import(
    session: Any,
    job: Job,
    source: RecipientSource,
    template: MessageTemplate,
    **options: Any,
) -> ImportStats:
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as stream:
                return _import_csv(session, job, stream, template, **options)
        except FileNotFoundError:
            raise RecipientImportError(
                f"Recipient file {os.fspath(source)!r} does not exist."
            ) from None
        except (IsADirectoryError, PermissionError) as err:
            raise RecipientImportError(
                f"Recipient file {os.fspath(source)!r} cannot be opened: "
                f"{err.strerror}."
            ) from None
    if isinstance(source, (io.IOBase, io.TextIOBase)) or hasattr(source, "read"):
        return _import_csv(session, job, source, template, **options)  # type: ignore[arg-type]
    return _import_dicts(session, job, source, template, **options)


def _import_csv(
    session: Any,
    job: Job,
    stream: Any,
    template: MessageTemplate,
    *,
    encoding: str | None,
    delimiter: str | None,
    email_column: str | None,
    name_column: str | None,
) -> ImportStats:
    headers, records, blank_lines = read_csv(
        stream, encoding=encoding, delimiter=delimiter
    )
    columns = ColumnMap.detect(headers, email=email_column, name=name_column)
    builder = RowBuilder(job.id, columns, job.batch_size)
    rows = iter_csv_rows(builder, headers, records)
    write_rows(session, _checked(rows, template))
    builder.stats.blank_lines = blank_lines()
    return builder.stats


def _import_dicts(
    session: Any,
    job: Job,
    rows: Iterable[Mapping[str, Any]],
    template: MessageTemplate,
    *,
    email_column: str | None,
    name_column: str | None,
    **_: Any,
) -> ImportStats:
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return ImportStats()
    if not isinstance(first, Mapping):
        raise RecipientImportError(
            f"Recipients must be a CSV file, a stream, or dicts; got {type(first).__name__}."
        )
    columns = ColumnMap.detect(list(first), email=email_column, name=name_column)
    builder = RowBuilder(job.id, columns, job.batch_size)
    write_rows(
        session,
        _checked(iter_dict_rows(builder, itertools.chain([first], iterator)), template),
    )
    return builder.stats


def _checked(
    rows: Iterable[tuple[Any, ...]],
    template: MessageTemplate,
) -> Iterator[tuple[Any, ...]]:
    """Pass rows through, rendering the first valid one to catch missing variables."""
    checked = False
    for row in rows:
        if not checked and row[8] == "pending":
            checked = True
            context = recipient_context(
                email=row[3], display=row[4], name=row[6], variables=row[7]
            )
            try:
                template.render(context)
            except TemplateError as err:
                raise TemplateError(
                    f"Line {row[2]} (the first valid recipient): {err}"
                ) from None
        yield row


def _reject_duplicates(session: Any, job_id: int) -> None:
    """Reject every pending row whose address appeared on an earlier row."""
    window = {"partition_by": Recipient.email_key, "order_by": Recipient.id}
    ranked = (
        sa.select(
            Recipient.id,
            sa.func.row_number().over(**window).label("rank"),
            sa.func.first_value(Recipient.line).over(**window).label("first_line"),
        )
        .where(Recipient.job_id == job_id, Recipient.status == "pending")
        .subquery()
    )
    duplicates = session.execute(
        sa.select(ranked.c.id, ranked.c.first_line).where(ranked.c.rank > 1)
    ).all()
    table = Recipient.__table__
    statement = (
        sa.update(table)
        .where(table.c.id == sa.bindparam("rid"), table.c.status == "pending")
        .values(
            status="rejected",
            reason="duplicate",
            batch_no=None,
            error=sa.bindparam("detail"),
        )
    )
    for start in range(0, len(duplicates), 5000):
        session.connection().execute(
            statement,
            [
                {"rid": rid, "detail": f"Duplicate of line {line}."}
                for rid, line in duplicates[start : start + 5000]
            ],
        )


def _suppress(session: Any, job_id: int, category: str | None) -> None:
    """Mark pending rows whose address is on the suppression list."""
    scopes = ["", category] if category else [""]
    listed = sa.select(Suppression.email_key).where(Suppression.category.in_(scopes))
    tracking.move_recipients(
        session,
        job_id,
        "pending",
        "suppressed",
        Recipient.email_key.in_(listed),
        values={
            "reason": "suppressed",
            "batch_no": None,
            "error": "The address is on the suppression list.",
        },
    )


def plan_batches(job_id: int) -> int:
    """Create a batch row for every batch number that has pending recipients."""
    session = get_state().db.session
    planned = set(
        session.execute(sa.select(Batch.number).where(Batch.job_id == job_id)).scalars()
    )
    counts = session.execute(
        sa.select(Recipient.batch_no, sa.func.count())
        .where(Recipient.job_id == job_id, Recipient.status == "pending")
        .group_by(Recipient.batch_no)
        .order_by(Recipient.batch_no)
    ).all()
    new = [
        Batch(job_id=job_id, number=n, size=size)
        for n, size in counts
        if n not in planned
    ]
    session.add_all(new)
    return len(new)


def start_job(job_id: int, *, progress: Callable[[int], None] | None = None) -> int:
    """Plan a draft job's batches and hand them over; return how many were handed."""
    session = get_state().db.session
    tracking.move_job(session, job_id, "queued", only_from=("draft",))
    planned = plan_batches(job_id)
    session.commit()
    logger.info("Job %s: %d batches planned", job_id, planned)
    return _hand_over(job_id, progress)


def _hand_over(job_id: int, progress: Callable[[int], None] | None) -> int:
    session = get_state().db.session
    handed = dispatch.enqueue_batches(job_id, progress=progress)
    if tracking.settle_job(session, job_id):
        session.commit()
        signals.job_finished.send(_app(), job_id=job_id, status="done")
    return handed


def pause_job(job_id: int) -> int:
    """Stop handing out a job's batches; batches already being sent finish."""
    session = get_state().db.session
    tracking.move_job(session, job_id, "paused")
    taken_back = tracking.move_batches(
        session, "enqueued", "pending", Batch.job_id == job_id
    )
    session.commit()
    return len(taken_back)


def resume_job(job_id: int, *, progress: Callable[[int], None] | None = None) -> int:
    """Continue a paused job, or re-enqueue the batches Redis refused."""
    session = get_state().db.session
    status = tracking.job_status(session, job_id)
    if status == "paused":
        tracking.move_job(session, job_id, "queued")
        session.commit()
    elif status not in ("queued", "sending"):
        tracking.move_job(session, job_id, "queued", only_from=("paused",))
    return _hand_over(job_id, progress)


def cancel_job(job_id: int) -> None:
    """Cancel a job: no batch of it is handed out any more."""
    session = get_state().db.session
    tracking.move_job(session, job_id, "cancelled", values={"finished_at": utcnow()})
    tracking.move_batches(session, "enqueued", "pending", Batch.job_id == job_id)
    session.commit()
    signals.job_finished.send(_app(), job_id=job_id, status="cancelled")


def retry_failed(job_id: int, *, progress: Callable[[int], None] | None = None) -> int:
    """Send again to the job's failed recipients only; return how many."""
    session = get_state().db.session
    tracking.job_status(session, job_id)
    job = session.execute(sa.select(Job).where(Job.id == job_id)).scalar_one()
    ids = list(
        session.execute(
            sa.select(Recipient.id)
            .where(Recipient.job_id == job_id, Recipient.status == "failed")
            .order_by(Recipient.id)
        ).scalars()
    )
    if not ids:
        # Nothing failed, but a batch the connector could not wholly hand over still
        # holds pending recipients: hand those over again.
        if job.status in JOB_ACTIVE:
            _hand_over(job_id, progress)
        return 0

    # Failed recipients get fresh batch numbers after the job's last batch.
    last = (
        session.execute(
            sa.select(sa.func.max(Batch.number)).where(Batch.job_id == job_id)
        ).scalar()
        or 0
    )
    for offset, start in enumerate(range(0, len(ids), job.batch_size), start=last + 1):
        chunk = ids[start : start + job.batch_size]
        tracking.move_recipient_ids(
            session,
            job_id,
            chunk,
            "failed",
            "pending",
            values={"batch_no": offset, "reason": None, "error": None},
        )
    if job.status != "paused":
        tracking.move_job(
            session,
            job_id,
            "queued",
            only_from=("done", "failed", "queued", "sending"),
            strict=job.status not in ("queued", "sending"),
        )
    plan_batches(job_id)
    session.commit()
    logger.info(
        "Job %s: %d failed recipients queued for another attempt", job_id, len(ids)
    )
    if job.status != "paused":
        _hand_over(job_id, progress)
    return len(ids)


def job_summary(job_id: int) -> dict[str, Any]:
    """The job's status and counters, plus rejections by reason: one JSON-able dict."""
    session = get_state().db.session
    job = session.execute(sa.select(Job).where(Job.id == job_id)).scalar_one_or_none()
    if job is None:
        raise LookupError(f"There is no job {job_id}.")
    session.refresh(job)
    reasons = session.execute(
        sa.select(Recipient.reason, sa.func.count())
        .where(
            Recipient.job_id == job_id, Recipient.status.in_(("rejected", "suppressed"))
        )
        .group_by(Recipient.reason)
    ).all()
    failed = session.execute(
        sa.select(Recipient.reason, sa.func.count())
        .where(Recipient.job_id == job_id, Recipient.status == "failed")
        .group_by(Recipient.reason)
    ).all()
    return {
        "id": job.id,
        "name": job.name,
        "status": job.status,
        "kind": job.kind,
        "provider": job.provider,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "blank_lines": job.blank_lines,
        "counters": job.counters(),
        "rejected_by_reason": {r or "unknown": n for r, n in sorted(reasons, key=str)},
        "failed_by_reason": {r or "unknown": n for r, n in sorted(failed, key=str)},
    }


def write_rejects(job_id: int, out: IO[str]) -> int:
    """Write the job's rejected and suppressed rows as CSV; return how many."""
    session = get_state().db.session
    writer = csv.writer(out)
    writer.writerow(["line", "email", "name", "status", "reason", "detail"])
    rows = session.execute(
        sa.select(
            Recipient.line,
            Recipient.email,
            Recipient.name,
            Recipient.status,
            Recipient.reason,
            Recipient.error,
        )
        .where(
            Recipient.job_id == job_id, Recipient.status.in_(("rejected", "suppressed"))
        )
        .order_by(Recipient.id)
        .execution_options(yield_per=2000)
    )
    count = 0
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
        count += 1
    return count


def _default_name(source: RecipientSource) -> str:
    name = _source_name(source)
    return f"Mailing to {name}" if name else "Mailing"


def _source_name(source: RecipientSource) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return os.path.basename(os.fspath(source))[:255]
    name = getattr(source, "name", None)
    return os.path.basename(name)[:255] if isinstance(name, str) else None


def _app() -> Any:
    return current_app._get_current_object()  # type: ignore[attr-defined]
