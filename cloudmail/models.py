"""cloudmail's tables: jobs, batches, recipients, settings and suppressions.

The models live on their own :class:`~sqlalchemy.orm.DeclarativeBase` and ``MetaData``
so that cloudmail's migrations (with their own version table) and the host app's never
try to manage each other's tables. They are queried through the host's Flask-SQLAlchemy
session, on its default engine, so cloudmail's writes share the host's transactions.

Table names start with ``cloudmail_``.
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .states import RECIPIENT_STATES

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL needs the 64 bits.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: sa.DateTime(timezone=True)}


#: The recipient states that have a counter column of the same name on ``Job``.
COUNTED_STATES = RECIPIENT_STATES


class Job(Base):
    """One mailing: a message template and the recipients it goes to."""

    __tablename__ = "cloudmail_jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    kind: Mapped[str] = mapped_column(sa.String(20), default="bulk")
    category: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16), default="draft", index=True)
    provider: Mapped[str] = mapped_column(sa.String(32))
    sender: Mapped[str] = mapped_column(sa.String(320))
    reply_to: Mapped[str | None] = mapped_column(sa.String(320))
    subject_template: Mapped[str] = mapped_column(sa.Text)
    html_template: Mapped[str] = mapped_column(sa.Text)
    text_template: Mapped[str | None] = mapped_column(sa.Text)
    unsubscribe: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    source: Mapped[str | None] = mapped_column(sa.String(255))
    batch_size: Mapped[int] = mapped_column(sa.Integer)
    error: Mapped[str | None] = mapped_column(sa.Text)
    blank_lines: Mapped[int] = mapped_column(sa.Integer, default=0)
    total: Mapped[int] = mapped_column(sa.Integer, default=0)
    pending: Mapped[int] = mapped_column(sa.Integer, default=0)
    queued: Mapped[int] = mapped_column(sa.Integer, default=0)
    sent: Mapped[int] = mapped_column(sa.Integer, default=0)
    delivered: Mapped[int] = mapped_column(sa.Integer, default=0)
    bounced: Mapped[int] = mapped_column(sa.Integer, default=0)
    complained: Mapped[int] = mapped_column(sa.Integer, default=0)
    failed: Mapped[int] = mapped_column(sa.Integer, default=0)
    rejected: Mapped[int] = mapped_column(sa.Integer, default=0)
    suppressed: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    def counters(self) -> dict[str, int]:
        """The per-status recipient counts, plus ``total``."""
        counts = {state: getattr(self, state) for state in COUNTED_STATES}
        counts["total"] = self.total
        return counts

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status!r}>"


class Batch(Base):
    """A slice of a job's recipients, dispatched as one RQ job.

    Recipients belong to a batch by ``(job_id, number)``: the number is given while
    importing, so planning needs no second pass over a million rows.
    """

    __tablename__ = "cloudmail_batches"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "number", name="uq_cloudmail_batches_job_number"),
        sa.Index("ix_cloudmail_batches_job_status", "job_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(
        sa.ForeignKey("cloudmail_jobs.id", ondelete="CASCADE")
    )
    number: Mapped[int] = mapped_column(sa.Integer)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    size: Mapped[int] = mapped_column(sa.Integer, default=0)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    rq_job_id: Mapped[str | None] = mapped_column(sa.String(64))
    provider_ref: Mapped[str | None] = mapped_column(sa.String(255))
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    dispatched_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<Batch {self.id} job={self.job_id} #{self.number} {self.status!r}>"


class Recipient(Base):
    """One row of a job's recipient list and what became of its mail."""

    __tablename__ = "cloudmail_recipients"
    __table_args__ = (
        sa.Index("ix_cloudmail_recipients_job_status", "job_id", "status", "id"),
        sa.Index("ix_cloudmail_recipients_job_batch", "job_id", "batch_no", "status"),
        sa.Index("ix_cloudmail_recipients_job_email", "job_id", "email_key"),
        sa.Index("ix_cloudmail_recipients_provider_message_id", "provider_message_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(
        sa.ForeignKey("cloudmail_jobs.id", ondelete="CASCADE")
    )
    batch_no: Mapped[int | None] = mapped_column(sa.Integer)
    line: Mapped[int | None] = mapped_column(sa.Integer)
    #: The address as sent (ASCII; an internationalised domain in punycode). For a
    #: rejected row, the address as it was written in the file.
    email: Mapped[str] = mapped_column(sa.String(320))
    #: The address as people read it, when it differs from ``email`` (Unicode domain).
    email_display: Mapped[str | None] = mapped_column(sa.String(320))
    #: Lower-cased ``email``: the key for duplicates and suppressions.
    email_key: Mapped[str] = mapped_column(sa.String(320))
    name: Mapped[str | None] = mapped_column(sa.String(320))
    variables: Mapped[str | None] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    reason: Mapped[str | None] = mapped_column(sa.String(32))
    error: Mapped[str | None] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    provider_message_id: Mapped[str | None] = mapped_column(sa.String(255))
    updated_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<Recipient {self.id} job={self.job_id} {self.status!r}>"


class Setting(Base):
    """A run-time setting an admin changed; absent keys fall back to app config."""

    __tablename__ = "cloudmail_settings"

    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    value: Mapped[str] = mapped_column(sa.Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Suppression(Base):
    """An address cloudmail will not mail: for every category, or for one.

    ``category`` is empty for a global suppression (a hard bounce, a complaint, an
    admin's decision) and names a mail category for an unsubscribe.
    """

    __tablename__ = "cloudmail_suppressions"
    __table_args__ = (
        sa.UniqueConstraint(
            "email_key", "category", name="uq_cloudmail_suppressions_email_category"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    email_key: Mapped[str] = mapped_column(sa.String(320))
    category: Mapped[str] = mapped_column(sa.String(64), default="")
    reason: Mapped[str] = mapped_column(sa.String(32))
    detail: Mapped[str | None] = mapped_column(sa.Text)
    source: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


#: What became of a stored event: ``pending`` (stored; waiting to be applied, or for
#: the report that names its message id), ``applied``, ``failed`` (applying raised;
#: ``flask cloudmail events replay`` tries again) or ``ignored`` (about mail cloudmail
#: did not send, or about an older attempt).
EVENT_STATUSES = ("pending", "applied", "failed", "ignored")


class Event(Base):
    """One event a callback accepted, stored before it is applied.

    ``source`` is ``ses`` (an SES event through SNS; ``event_id`` is the SNS
    MessageId and there is one row per recipient address of the notification) or
    ``report`` (a report from cloudmail's Lambda or Worker; ``event_id`` is the report
    id and ``recipient`` is empty). ``(source, event_id, recipient)`` is unique, so a
    redelivered event is recognised and changes nothing. ``payload`` is the body as
    it was received.
    """

    __tablename__ = "cloudmail_events"
    __table_args__ = (
        sa.UniqueConstraint(
            "source", "event_id", "recipient", name="uq_cloudmail_events_source_event"
        ),
        sa.Index("ix_cloudmail_events_message_id", "message_id", "status"),
        sa.Index("ix_cloudmail_events_status", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source: Mapped[str] = mapped_column(sa.String(16))
    event_id: Mapped[str] = mapped_column(sa.String(128))
    #: The lower-cased address the event is about; empty for a report.
    recipient: Mapped[str] = mapped_column(sa.String(320), default="")
    kind: Mapped[str] = mapped_column(sa.String(24))
    #: The provider's message id (SES ``mail.messageId``).
    message_id: Mapped[str | None] = mapped_column(sa.String(255))
    job_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    recipient_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    error: Mapped[str | None] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    payload: Mapped[str] = mapped_column(sa.Text)
    occurred_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    applied_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"<Event {self.id} {self.source}:{self.kind} {self.status!r}>"
