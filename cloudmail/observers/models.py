"""The observers' tables, on cloudmail's own metadata.

Every once-only promise rests on a unique constraint here, not on a look-up before an
insert: two requests (or a signal fired twice) racing for the same claim both insert,
and the database lets exactly one of them win.
"""

from __future__ import annotations

from datetime import date, datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from ..models import Base, BigId, utcnow


class RollingJob(Base):
    """The job that collects one kind of event mail for one category and day.

    Transactional and welcome mail arrive one message at a time; they are appended to
    this job (one batch per hand-off) so the jobs page shows a job a day, not one per
    message. ``next_batch`` hands out batch numbers with an atomic increment.
    """

    __tablename__ = "cloudmail_rolling_jobs"
    __table_args__ = (
        sa.UniqueConstraint(
            "kind",
            "category",
            "day",
            name="uq_cloudmail_rolling_jobs_kind_category_day",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    category: Mapped[str] = mapped_column(sa.String(64))
    day: Mapped[date] = mapped_column(sa.Date)
    job_id: Mapped[int] = mapped_column(
        sa.ForeignKey("cloudmail_jobs.id", ondelete="CASCADE")
    )
    next_batch: Mapped[int] = mapped_column(sa.Integer, default=0)


class Claim(Base):
    """A promise kept once: a welcome per user, a license mail per user and license,
    a hand-off recorded once however often its queue item is read."""

    __tablename__ = "cloudmail_observer_claims"
    __table_args__ = (
        sa.UniqueConstraint(
            "kind", "key", name="uq_cloudmail_observer_claims_kind_key"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(32))
    key: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StoredMessage(Base):
    """A message the host composed (intercepted mail), kept as the bytes it built.

    Its recipients are ordinary recipient rows of a transactional job whose
    ``variables`` name this row; dispatch sends the bytes unchanged.
    """

    __tablename__ = "cloudmail_stored_messages"
    __table_args__ = (sa.Index("ix_cloudmail_stored_messages_job_id", "job_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(
        sa.ForeignKey("cloudmail_jobs.id", ondelete="CASCADE")
    )
    sender: Mapped[str] = mapped_column(sa.String(320))
    raw: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UserActivity(Base):
    """When a user was last seen and last re-engaged; the host's id only, no address."""

    __tablename__ = "cloudmail_user_activity"

    user_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    last_seen_at: Mapped[datetime | None]
    reengaged_at: Mapped[datetime | None]
