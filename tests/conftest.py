"""Fixtures shared by the test suite.

``app`` is parametrized over SQLite and PostgreSQL: each test that uses it runs on both.
PostgreSQL tests use a database of their own, created for the session and dropped after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import CloudMail
from cloudmail.extension import get_state
from cloudmail.models import Base

ROOT = Path(__file__).resolve().parent.parent
SHARED = (
    ROOT / "examples" / "data"
)  # copies of ../shared/data, so a lone clone can test
PG_ADMIN_URL = os.environ.get(
    "CLOUDMAIL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CLOUDMAIL_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"cloudmail_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace(
        "postgresql://", "postgresql+psycopg://"
    )
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_app(tmp_path: Path, database_url: str, **config: object) -> Flask:
    app = Flask("host", instance_path=str(tmp_path / "instance"))
    app.config.update(
        TESTING=True,
        SECRET_KEY="test-secret",
        SQLALCHEMY_DATABASE_URI=database_url,
        CLOUDMAIL_SENDER="Cloudmail Tests <news@example.com>",
        CLOUDMAIL_OUTBOX_DIR=str(tmp_path / "outbox"),
        CLOUDMAIL_BATCH_SIZE=500,
        CLOUDMAIL_QUEUE_NAME=f"cloudmail-test-{uuid.uuid4().hex[:8]}",
    )
    app.config.update(config)
    CloudMail(app)
    return app


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cloudmail.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def app_config() -> dict[str, object]:
    """Extra config for the ``app`` fixture; override in a test module."""
    return {}


@pytest.fixture
def app(
    tmp_path: Path, database_url: str, app_config: dict[str, object]
) -> Iterator[Flask]:
    app = make_app(tmp_path, database_url, **app_config)
    with app.app_context():
        engine = get_state().db.engine
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        yield app
        get_state().db.session.remove()
        Base.metadata.drop_all(engine)
        engine.dispose()


@pytest.fixture
def db(app: Flask):  # noqa: ANN201
    return get_state(app).db


@pytest.fixture
def client(app: Flask):  # noqa: ANN201
    return app.test_client()


@pytest.fixture
def runner(app: Flask):  # noqa: ANN201
    return app.test_cli_runner()


@pytest.fixture
def outbox(app: Flask) -> Path:
    return Path(app.config["CLOUDMAIL_OUTBOX_DIR"])


@pytest.fixture
def html_file(tmp_path: Path) -> Path:
    path = tmp_path / "body.html"
    path.write_text(
        "<p>Hello {{ name }},</p><p>Your account at {{ institution | default('us') }}.</p>",
        encoding="utf-8",
    )
    return path


def count_rows(db, table: str, **where: object) -> int:  # noqa: ANN001
    clause = " AND ".join(f"{k} = :{k}" for k in where) or "1=1"
    return db.session.execute(
        sa.text(f"SELECT count(*) FROM {table} WHERE {clause}"), where
    ).scalar()
