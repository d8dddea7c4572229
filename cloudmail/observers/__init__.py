"""Observers: modules that listen on cloudmail's signals and turn host events into mail.

Each is enabled per app by naming it in ``CLOUDMAIL_OBSERVERS``:

- ``interceptor``: the ``mail-outgoing`` signal (the Flask-Mailman backend and the
  Flask-Mail hook work whether or not it is listed);
- ``users``: welcome, address change, deletion;
- ``licenses``: one job per allocation;
- ``reengagement``: ``user-seen`` (``flask cloudmail reengage`` makes the job).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from flask import Flask

from ..errors import ConfigurationError

OBSERVERS = ("interceptor", "users", "licenses", "reengagement")


def connect_all(app: Flask) -> None:
    """Connect the observers ``CLOUDMAIL_OBSERVERS`` names, with ``app`` as sender."""
    # The observers' tables join cloudmail's metadata whether or not any is enabled,
    # so migrations and create_all see one schema.
    from . import models  # noqa: F401

    for name in app.config["CLOUDMAIL_OBSERVERS"]:
        import_module(f"{__name__}.{name}").connect(app)


def check_settings(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigurationError` naming the first unusable observer setting."""
    names = config.get("CLOUDMAIL_OBSERVERS") or ()
    if isinstance(names, str):
        names = config["CLOUDMAIL_OBSERVERS"] = tuple(names.replace(",", " ").split())
    unknown = [name for name in names if name not in OBSERVERS]
    if unknown:
        raise ConfigurationError(
            f"CLOUDMAIL_OBSERVERS names {unknown[0]!r}; use some of {', '.join(OBSERVERS)}."
        )

    for key in ("CLOUDMAIL_REENGAGE_DAYS", "CLOUDMAIL_REENGAGE_COOLDOWN_DAYS"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(
                f"{key} is {value!r}; it must be a whole number of days, at least 1."
            )

    query = config.get("CLOUDMAIL_INACTIVE_USERS")
    if query is not None and not callable(query):
        raise ConfigurationError(
            f"CLOUDMAIL_INACTIVE_USERS is {query!r}; it must be a callable that takes a "
            "cut-off datetime and returns the users inactive since then."
        )

    url = config.get("CLOUDMAIL_UNSUBSCRIBE_URL")
    if url is not None and (
        not isinstance(url, str)
        or not url.startswith("https://")
        or "{token}" not in url
    ):
        raise ConfigurationError(
            f"CLOUDMAIL_UNSUBSCRIBE_URL is {url!r}; it must be an https URL with a "
            "'{token}' placeholder, e.g. 'https://example.com/cloudmail/unsubscribe/{token}'."
        )
