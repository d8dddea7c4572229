"""observers: rolling jobs, claims, stored messages, user activity

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 18:10:00

Written by hand for the tables of ``cloudmail/observers/models.py``, nothing else.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "cloudmail_rolling_jobs",
        sa.Column("id", BigId, nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("next_batch", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["cloudmail_jobs.id"],
            name=op.f("fk_cloudmail_rolling_jobs_job_id_cloudmail_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cloudmail_rolling_jobs")),
        sa.UniqueConstraint(
            "kind",
            "category",
            "day",
            name="uq_cloudmail_rolling_jobs_kind_category_day",
        ),
    )
    op.create_table(
        "cloudmail_observer_claims",
        sa.Column("id", BigId, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cloudmail_observer_claims")),
        sa.UniqueConstraint(
            "kind", "key", name="uq_cloudmail_observer_claims_kind_key"
        ),
    )
    op.create_table(
        "cloudmail_stored_messages",
        sa.Column("id", BigId, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("sender", sa.String(length=320), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["cloudmail_jobs.id"],
            name=op.f("fk_cloudmail_stored_messages_job_id_cloudmail_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cloudmail_stored_messages")),
    )
    with op.batch_alter_table("cloudmail_stored_messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_cloudmail_stored_messages_job_id", ["job_id"], unique=False
        )

    op.create_table(
        "cloudmail_user_activity",
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reengaged_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_cloudmail_user_activity")),
    )


def downgrade() -> None:
    op.drop_table("cloudmail_user_activity")
    with op.batch_alter_table("cloudmail_stored_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_cloudmail_stored_messages_job_id")
    op.drop_table("cloudmail_stored_messages")
    op.drop_table("cloudmail_observer_claims")
    op.drop_table("cloudmail_rolling_jobs")
