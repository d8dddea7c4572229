"""The Flask extension object."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy

from .errors import ConfigurationError, NotInitializedError

if TYPE_CHECKING:
    from redis import Redis
    from rq import Queue

logger = logging.getLogger(__name__)

PROVIDERS = ("outbox", "aws", "cloudflare")

#: Every setting cloudmail reads, with its default. ``init_app`` documents each.
DEFAULTS: dict[str, Any] = {
    "CLOUDMAIL_PROVIDER": "outbox",
    "CLOUDMAIL_BATCH_SIZE": 2000,
    "CLOUDMAIL_SENDER": None,
    "CLOUDMAIL_REPLY_TO": None,
    "CLOUDMAIL_SEND_RATE": 0,
    "CLOUDMAIL_REDIS_URL": None,
    "CLOUDMAIL_QUEUE_NAME": "cloudmail",
    "CLOUDMAIL_JOB_TIMEOUT": 900,
    "CLOUDMAIL_OUTBOX_DIR": None,
    "CLOUDMAIL_DATABASE_URI": None,
    "CLOUDMAIL_URL_PREFIX": "/cloudmail",
    "CLOUDMAIL_ADMIN_CHECK": None,
    "CLOUDMAIL_UNSUBSCRIBE_URL": None,
    "CLOUDMAIL_CALLBACK_URL": None,
    "CLOUDMAIL_REPORT_SECRETS": [],
}


class CloudMail:
    """Bulk and event-driven mail for a Flask app, sent through cloud workers.

    ``CloudMail(app)`` or, with an app factory, ``cloudmail = CloudMail()`` and later
    ``cloudmail.init_app(app)``. Pass ``db`` to use the host's Flask-SQLAlchemy object;
    without it cloudmail uses the one already registered on the app, or creates its
    own.
    """

    def __init__(self, app: Flask | None = None, *, db: SQLAlchemy | None = None) -> None:
        self._db = db
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register cloudmail on ``app``.

        Settings (``app.config``), with their defaults:

        - ``CLOUDMAIL_PROVIDER`` (``"outbox"``): the connector that sends mail;
          ``outbox``, ``aws`` or ``cloudflare``. An admin may change it at run time.
        - ``CLOUDMAIL_BATCH_SIZE`` (2000): recipients per batch (one RQ job each).
        - ``CLOUDMAIL_SENDER`` (None): the From address, e.g. ``"News <n@example.com>"``.
        - ``CLOUDMAIL_REPLY_TO`` (None): the Reply-To address.
        - ``CLOUDMAIL_SEND_RATE`` (0): mails per second a connector may send; 0 is no
          limit of cloudmail's own.
        - ``CLOUDMAIL_REDIS_URL`` (None): Redis for the RQ queue. Without it, batches
          are sent in the process that starts the job.
        - ``CLOUDMAIL_QUEUE_NAME`` (``"cloudmail"``): the RQ queue's name.
        - ``CLOUDMAIL_JOB_TIMEOUT`` (900): seconds an RQ worker may spend on a batch.
        - ``CLOUDMAIL_OUTBOX_DIR`` (None): where the outbox connector writes ``.eml``
          files; by default ``cloudmail-outbox`` in the app's instance folder.
        - ``CLOUDMAIL_DATABASE_URI`` (None): used only when cloudmail creates its own
          Flask-SQLAlchemy object and ``SQLALCHEMY_DATABASE_URI`` is unset; by default
          an SQLite file ``cloudmail.db`` in the instance folder.
        - ``CLOUDMAIL_URL_PREFIX`` (``"/cloudmail"``): where the blueprint is mounted.
        - ``CLOUDMAIL_ADMIN_CHECK`` (None): a callable returning True when the current
          user may use the admin pages. Without it every admin page answers 403.
        - ``CLOUDMAIL_UNSUBSCRIBE_URL`` (None): an https URL template for
          ``List-Unsubscribe``.
        - ``CLOUDMAIL_CALLBACK_URL`` (None): the absolute URL of the report route
          (``https://host/cloudmail/callback/report``) that cloud functions post to.
        - ``CLOUDMAIL_REPORT_SECRETS`` ([]): the ``whsec_...`` secrets reports are
          signed with; list several (or space-separate them) to rotate.
        """
        # 1. Refuse a second registration: two sets of routes and signals would fight.
        if "cloudmail" in app.extensions:
            raise ConfigurationError(
                f"cloudmail is already registered on app {app.name!r}; call "
                "'init_app' once per app (use 'get_state(app)' to reach it)."
            )

        # 2. Fill in and check the settings, so a wrong one fails at start-up.
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        validate_config(app.config)

        # 3. Find or create the database object.
        db = self._db or app.extensions.get("sqlalchemy")
        if db is None:
            uri = app.config["CLOUDMAIL_DATABASE_URI"] or _default_sqlite(app)
            app.config.setdefault("SQLALCHEMY_DATABASE_URI", uri)
            db = SQLAlchemy()
            db.init_app(app)
        elif "sqlalchemy" not in app.extensions:
            db.init_app(app)

        # 4. Keep per-app state where Flask expects it.
        app.extensions["cloudmail"] = CloudmailState(db=db, config_prefix="CLOUDMAIL_")

        # 5. Routes, commands and observers.
        from .cli import cloudmail_cli
        from .views import make_blueprint

        app.register_blueprint(
            make_blueprint(), url_prefix=app.config["CLOUDMAIL_URL_PREFIX"]
        )
        app.cli.add_command(cloudmail_cli)
        logger.debug("cloudmail registered on app %r", app.name)

    @property
    def db(self) -> SQLAlchemy:
        """The Flask-SQLAlchemy object of the current app."""
        return get_state().db


class CloudmailState:
    """What cloudmail keeps per app, in ``app.extensions["cloudmail"]``."""

    def __init__(self, *, db: SQLAlchemy, config_prefix: str) -> None:
        self.db = db
        self.config_prefix = config_prefix
        self._redis: Redis | None = None
        self.admin_check: Callable[[], bool] | None = None

    def redis(self, app: Flask) -> Redis | None:
        """The Redis connection for RQ, or None when ``CLOUDMAIL_REDIS_URL`` is unset."""
        url = app.config["CLOUDMAIL_REDIS_URL"]
        if not url:
            return None

        if self._redis is None:
            from redis import Redis

            self._redis = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        return self._redis

    def queue(self, app: Flask) -> Queue | None:
        """The RQ queue batches are enqueued on, or None without Redis."""
        connection = self.redis(app)
        if connection is None:
            return None

        from rq import Queue

        return Queue(
            app.config["CLOUDMAIL_QUEUE_NAME"],
            connection=connection,
            default_timeout=app.config["CLOUDMAIL_JOB_TIMEOUT"],
        )


def get_state(app: Flask | None = None) -> CloudmailState:
    """Return cloudmail's state for ``app`` (default: the current app)."""
    if app is None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]

    try:
        return app.extensions["cloudmail"]
    except KeyError:
        raise NotInitializedError(
            f"cloudmail is not registered on app {app.name!r}. "
            "Did you forget to call 'CloudMail(app)' or 'init_app(app)'?"
        ) from None


def validate_config(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigurationError` naming the first unusable ``CLOUDMAIL_*`` value."""
    provider = config["CLOUDMAIL_PROVIDER"]
    if provider not in PROVIDERS:
        raise ConfigurationError(
            f"CLOUDMAIL_PROVIDER is {provider!r}; use one of {', '.join(PROVIDERS)}."
        )

    for key, minimum in (("CLOUDMAIL_BATCH_SIZE", 1), ("CLOUDMAIL_JOB_TIMEOUT", 1)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigurationError(
                f"{key} is {value!r}; it must be a whole number of at least {minimum}."
            )

    rate = config["CLOUDMAIL_SEND_RATE"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
        raise ConfigurationError(
            f"CLOUDMAIL_SEND_RATE is {rate!r}; it must be a number of mails per "
            "second, or 0 for no limit."
        )

    check = config["CLOUDMAIL_ADMIN_CHECK"]
    if check is not None and not callable(check):
        raise ConfigurationError(
            f"CLOUDMAIL_ADMIN_CHECK is {check!r}; it must be a callable that returns "
            "True when the current user is an admin."
        )

    prefix = config["CLOUDMAIL_URL_PREFIX"]
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ConfigurationError(
            f"CLOUDMAIL_URL_PREFIX is {prefix!r}; it must be a path starting with '/'."
        )


def outbox_dir(app: Flask) -> str:
    """The folder the outbox connector writes to."""
    return app.config["CLOUDMAIL_OUTBOX_DIR"] or os.path.join(
        app.instance_path, "cloudmail-outbox"
    )


def _default_sqlite(app: Flask) -> str:
    os.makedirs(app.instance_path, exist_ok=True)
    return "sqlite:///" + os.path.join(app.instance_path, "cloudmail.db")
