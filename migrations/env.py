"""Alembic environment for cloudmail's own tables.

It runs inside a Flask app context (``flask cloudmail db upgrade``), uses the engine of
the app's Flask-SQLAlchemy object, and keeps its history in ``cloudmail_alembic_version``
so a host's own migrations live beside it without clashes.
"""

from __future__ import annotations

from alembic import context

from cloudmail.extension import get_state
from cloudmail.migrate import VERSION_TABLE
from cloudmail.models import Base

target_metadata = Base.metadata


def include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001, ANN201
    # Only cloudmail's tables are ours to compare; the host's are left alone.
    if type_ == "table":
        return str(name).startswith("cloudmail_") and name != VERSION_TABLE
    return True


def run_migrations_online() -> None:
    engine = get_state().db.engine
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=VERSION_TABLE,
            include_object=include_object,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise RuntimeError(
        "cloudmail's migrations run online only: use 'flask cloudmail db upgrade'."
    )
run_migrations_online()
