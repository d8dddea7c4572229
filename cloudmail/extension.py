"""The Flask extension object."""

from __future__ import annotations

import logging
import math
import os
import re
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
    "CLOUDMAIL_SNS_TOPIC_ARNS": [],
    "CLOUDMAIL_SNS_FETCH": None,
    "CLOUDMAIL_SNS_TIMEOUT": 5,
    "CLOUDMAIL_AWS_QUEUE_URL": None,
    "CLOUDMAIL_AWS_REGION": None,
    "CLOUDMAIL_AWS_ENDPOINT_URL": None,
    "CLOUDMAIL_AWS_CONFIGURATION_SET": None,
    "CLOUDMAIL_AWS_MAX_ATTEMPTS": 8,
    "CLOUDMAIL_CLOUDFLARE_WORKER_URL": None,
    "CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET": None,
    "CLOUDMAIL_CLOUDFLARE_CONFIGURATION_SET": None,
    "CLOUDMAIL_CLOUDFLARE_TIMEOUT": 30,
    "CLOUDMAIL_CLOUDFLARE_MAX_ATTEMPTS": 5,
    "CLOUDMAIL_CLOUDFLARE_BACKOFF": 0.5,
    "CLOUDMAIL_CLOUDFLARE_BACKOFF_MAX": 10,
    "CLOUDMAIL_OBSERVERS": (),
    "CLOUDMAIL_REENGAGE_DAYS": 90,
    "CLOUDMAIL_REENGAGE_COOLDOWN_DAYS": 30,
    "CLOUDMAIL_INACTIVE_USERS": None,
}


class CloudMail:
    """Bulk and event-driven mail for a Flask app, sent through cloud workers.

    ``CloudMail(app)`` or, with an app factory, ``cloudmail = CloudMail()`` and later
    ``cloudmail.init_app(app)``. Pass ``db`` to use the host's Flask-SQLAlchemy object;
    without it cloudmail uses the one already registered on the app, or creates its
    own.
    """

    def __init__(
        self, app: Flask | None = None, *, db: SQLAlchemy | None = None
    ) -> None:
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
          ``List-Unsubscribe``, with a ``{token}`` placeholder, e.g.
          ``https://example.com/cloudmail/unsubscribe/{token}``. Without it the URL is
          built from ``SERVER_NAME``. The token is signed with ``SECRET_KEY``.
        - ``CLOUDMAIL_OBSERVERS`` (()): the observers to connect to this app's
          signals, some of ``interceptor``, ``users``, ``licenses`` and
          ``reengagement`` (see ``docs/observers.md``).
        - ``CLOUDMAIL_REENGAGE_DAYS`` (90): days without activity before a user gets
          the re-engagement mail.
        - ``CLOUDMAIL_REENGAGE_COOLDOWN_DAYS`` (30): days before the same user may get
          it again.
        - ``CLOUDMAIL_INACTIVE_USERS`` (None): the host's query, a callable taking a
          cut-off datetime and returning the users inactive since then as dicts with
          ``id``, ``email`` and optionally ``name`` and template variables.
        - ``CLOUDMAIL_CALLBACK_URL`` (None): the absolute URL of the report route
          (``https://host/cloudmail/callback/report``) that cloud functions post to.
        - ``CLOUDMAIL_REPORT_SECRETS`` ([]): the ``whsec_...`` secrets reports are
          signed with; list several (or space-separate them) to rotate.
        - ``CLOUDMAIL_SNS_TOPIC_ARNS`` ([]): the ARNs of the SNS topics SES publishes
          events to (list them, or space-separate them); ``/callback/ses`` refuses
          every message from any other topic, and every message while this is empty.
        - ``CLOUDMAIL_SNS_FETCH`` (None): a callable ``url -> bytes`` that downloads
          SNS signing certificates and visits SubscribeURLs, for a proxy or tests;
          by default ``urllib`` without redirects. URLs are checked before it is
          called.
        - ``CLOUDMAIL_SNS_TIMEOUT`` (5): seconds to wait for an SNS certificate.
        - ``CLOUDMAIL_AWS_QUEUE_URL`` (None): the SQS queue the ``aws`` connector puts
          batch messages on (the ``QueueUrl`` output of ``lambda/template.yaml``); a
          name ending in ``.fifo`` makes it a FIFO queue. Required when the provider
          is ``aws``, as is ``CLOUDMAIL_CALLBACK_URL``.
        - ``CLOUDMAIL_AWS_REGION`` (None): the queue's region; by default taken from
          the queue URL, else from boto3's configuration.
        - ``CLOUDMAIL_AWS_ENDPOINT_URL`` (None): another SQS endpoint, for moto or
          LocalStack (``flask cloudmail dev-aws`` prints one).
        - ``CLOUDMAIL_AWS_CONFIGURATION_SET`` (None): the SES configuration set the
          Lambda sends with (its own ``CLOUDMAIL_CONFIGURATION_SET`` otherwise).
        - ``CLOUDMAIL_AWS_MAX_ATTEMPTS`` (8): tries per ``SendMessageBatch`` call, and
          rounds for its ``Failed`` entries, before a unit counts as refused.

        AWS credentials are never settings: boto3 finds them through its own chain
        (environment, shared config, instance or task role).
        - ``CLOUDMAIL_CLOUDFLARE_WORKER_URL`` (None): the base URL of cloudmail's
          Cloudflare Worker (``lambda/worker.js``); batches go to its ``/enqueue``.
          Required when the provider is ``cloudflare``.
        - ``CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET`` (None): the ``whsec_...`` secret
          ``/enqueue`` requests are signed with, the Worker's
          ``CLOUDMAIL_ENQUEUE_SECRET``; list several to rotate.
        - ``CLOUDMAIL_CLOUDFLARE_CONFIGURATION_SET`` (None): the SES configuration
          set the Worker sends with.
        - ``CLOUDMAIL_CLOUDFLARE_TIMEOUT`` (30): seconds to wait for the Worker's
          answer to one ``/enqueue`` request.
        - ``CLOUDMAIL_CLOUDFLARE_MAX_ATTEMPTS`` (5): tries per ``/enqueue`` request
          before its units count as refused.
        - ``CLOUDMAIL_CLOUDFLARE_BACKOFF`` (0.5) and
          ``CLOUDMAIL_CLOUDFLARE_BACKOFF_MAX`` (10): seconds of exponential backoff
          (with jitter) between tries, and its cap.
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
        from .observers import connect_all as connect_observers
        from .views import make_blueprint

        app.register_blueprint(
            make_blueprint(), url_prefix=app.config["CLOUDMAIL_URL_PREFIX"]
        )
        _protect_forms(app)
        app.cli.add_command(cloudmail_cli)
        connect_observers(app)
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

            self._redis = Redis.from_url(
                url, socket_connect_timeout=5, socket_timeout=30
            )
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


#: Flask-WTF's own defaults, for a host that has no ``CSRFProtect``.
_CSRF_DEFAULTS: dict[str, Any] = {
    "WTF_CSRF_ENABLED": True,
    "WTF_CSRF_METHODS": {"POST", "PUT", "PATCH", "DELETE"},
    "WTF_CSRF_FIELD_NAME": "csrf_token",
    "WTF_CSRF_HEADERS": ["X-CSRFToken", "X-CSRF-Token"],
    "WTF_CSRF_TIME_LIMIT": 3600,
    "WTF_CSRF_SSL_STRICT": True,
}


def _protect_forms(app: Flask) -> None:
    """Require a CSRF token on every POST to cloudmail's pages.

    A host with Flask-WTF's ``CSRFProtect`` already checks every POST: cloudmail only
    exempts its webhook and public routes (which verify their callers on their own).
    A host without one gets a ``CSRFProtect`` that guards cloudmail's blueprint alone:
    ``init_app`` is not called on it, since that would guard every POST of the host.
    """
    from flask import request
    from flask_wtf.csrf import CSRFProtect

    for key, value in _CSRF_DEFAULTS.items():
        app.config.setdefault(key, value)
    own = CSRFProtect()
    _exempt_public_views(app)

    def cloudmail_csrf() -> None:
        if request.blueprint != "cloudmail":
            return
        # A host CSRFProtect set up after cloudmail runs its check after this hook.
        if "csrf" in current_app.extensions:
            _exempt_public_views(current_app)
            return
        if current_app.config["WTF_CSRF_ENABLED"] and not _is_public(request.endpoint):
            own.protect()

    app.before_request(cloudmail_csrf)


def _is_public(endpoint: str | None) -> bool:
    from .views import PUBLIC_ENDPOINTS

    return (endpoint or "").startswith(PUBLIC_ENDPOINTS)


def _exempt_public_views(app: Flask) -> None:
    csrf = app.extensions.get("csrf")
    if csrf is None:
        return
    for endpoint, view in app.view_functions.items():
        if _is_public(endpoint):
            csrf.exempt(view)


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
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or not math.isfinite(rate)
        or rate < 0
    ):
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

    _validate_aws(config)

    prefix = config["CLOUDMAIL_URL_PREFIX"]
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ConfigurationError(
            f"CLOUDMAIL_URL_PREFIX is {prefix!r}; it must be a path starting with '/'."
        )

    from .connectors.cloudflare import check_settings as check_cloudflare

    check_cloudflare(config)

    from .observers import check_settings as check_observers

    check_observers(config)

    from .callbacks import check_settings as check_callbacks

    check_callbacks(config)


def _validate_aws(config: dict[str, Any]) -> None:
    """Check the ``CLOUDMAIL_AWS_*`` settings (the queue is required for ``aws``)."""
    for key in ("CLOUDMAIL_AWS_QUEUE_URL", "CLOUDMAIL_AWS_ENDPOINT_URL"):
        value = config[key]
        if value is not None and not (
            isinstance(value, str) and value.startswith(("https://", "http://"))
        ):
            raise ConfigurationError(
                f"{key} is {value!r}; it must be an http(s) URL such as "
                "'https://sqs.eu-west-1.amazonaws.com/123456789012/cloudmail'."
            )

    region = config["CLOUDMAIL_AWS_REGION"]
    if region is not None and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", str(region)):
        raise ConfigurationError(
            f"CLOUDMAIL_AWS_REGION is {region!r}; write a region code such as 'eu-west-1'."
        )

    name = config["CLOUDMAIL_AWS_CONFIGURATION_SET"]
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(name)):
        raise ConfigurationError(
            f"CLOUDMAIL_AWS_CONFIGURATION_SET is {name!r}; an SES configuration set "
            "name has 1 to 64 letters, digits, '_' or '-'."
        )

    attempts = config["CLOUDMAIL_AWS_MAX_ATTEMPTS"]
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigurationError(
            f"CLOUDMAIL_AWS_MAX_ATTEMPTS is {attempts!r}; it must be a whole number "
            "of at least 1."
        )

    if config["CLOUDMAIL_PROVIDER"] != "aws":
        return
    for key, example in (
        ("CLOUDMAIL_AWS_QUEUE_URL", "the QueueUrl output of lambda/template.yaml"),
        ("CLOUDMAIL_CALLBACK_URL", "'https://<host>/cloudmail/callback/report'"),
    ):
        if not config[key]:
            raise ConfigurationError(
                f"CLOUDMAIL_PROVIDER is 'aws' but {key} is not set; set it to {example}."
            )


def outbox_dir(app: Flask) -> str:
    """The folder the outbox connector writes to."""
    return app.config["CLOUDMAIL_OUTBOX_DIR"] or os.path.join(
        app.instance_path, "cloudmail-outbox"
    )


def _default_sqlite(app: Flask) -> str:
    os.makedirs(app.instance_path, exist_ok=True)
    return "sqlite:///" + os.path.join(app.instance_path, "cloudmail.db")
