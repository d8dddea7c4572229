"""cloudmail's shipped migrations build exactly the tables the models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import make_app

from cloudmail.extension import get_state
from cloudmail.migrate import VERSION_TABLE, downgrade, upgrade
from cloudmail.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_app(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'migrate.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    app = make_app(tmp_path, url)
    with app.app_context():
        engine = get_state().db.engine
        with engine.begin() as conn:
            for name in sa.inspect(conn).get_table_names():
                conn.execute(
                    sa.text(
                        f'DROP TABLE IF EXISTS "{name}" CASCADE'
                        if conn.dialect.name == "postgresql"
                        else f'DROP TABLE "{name}"'
                    )
                )
        yield app
        engine.dispose()


def _cloudmail_tables(engine: sa.Engine) -> set[str]:
    return {
        t for t in sa.inspect(engine).get_table_names() if t.startswith("cloudmail_")
    }


def test_upgrade_matches_models_then_downgrade_removes_all(empty_app) -> None:
    engine = get_state().db.engine
    # The host has its own Alembic history and tables.
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"
            )
        )
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('host0001')"))
        conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY)"))

    upgrade("head")

    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_object": lambda obj, name, type_, *_: (
                    type_ != "table" or name in Base.metadata.tables
                ),
            },
        )
        assert compare_metadata(context, Base.metadata) == []
        assert (
            conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
            == "host0001"
        )
        assert (
            conn.execute(sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar() == 1
        )
    assert _cloudmail_tables(engine) == set(Base.metadata.tables) | {VERSION_TABLE}

    downgrade("base")

    assert _cloudmail_tables(engine) == {VERSION_TABLE}
    assert {"users", "alembic_version"} <= set(sa.inspect(engine).get_table_names())


def test_cli_upgrade(empty_app) -> None:
    result = empty_app.test_cli_runner().invoke(args=["cloudmail", "db", "upgrade"])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == "cloudmail tables at head."
    assert _cloudmail_tables(get_state().db.engine) >= set(Base.metadata.tables)
