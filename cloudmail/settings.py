"""Run-time settings: what an admin may change without a deploy.

Each value is read through :func:`get_setting`: the settings table first, then the app's
``CLOUDMAIL_*`` config. Secrets are never settings; they stay in config.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from email.utils import parseaddr
from typing import Any

from flask import current_app

from .errors import ConfigurationError
from .extension import PROVIDERS, get_state
from .models import Setting
from .rendering import has_line_break

logger = logging.getLogger(__name__)


def _provider(value: Any) -> str:
    if value not in PROVIDERS:
        raise ConfigurationError(
            f"provider is {value!r}; use one of {', '.join(PROVIDERS)}."
        )
    return value


def _batch_size(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or number > 50_000:
        raise ConfigurationError(
            f"batch_size is {value!r}; use a whole number from 1 to 50000."
        )
    return number


def _send_rate(value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = -1.0
    # NaN compares False with everything; a worker would crash sleeping 1/NaN seconds.
    if not math.isfinite(rate) or rate < 0:
        raise ConfigurationError(
            f"send_rate is {value!r}; use mails per second, or 0 for no limit."
        )
    return rate


def _address(key: str, required: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value in (None, "") and not required:
            return None

        text = str(value or "")
        if has_line_break(text) or "@" not in parseaddr(text)[1]:
            raise ConfigurationError(
                f"{key} is {value!r}; write an address such as 'News <news@example.com>'."
            )
        if len(text) > 320:
            raise ConfigurationError(
                f"{key} is {len(text)} characters long; use at most 320."
            )
        return text

    return check


#: The settings an admin may change, each with the function that checks a new value.
VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "provider": _provider,
    "batch_size": _batch_size,
    "send_rate": _send_rate,
    "sender": _address("sender", required=True),
    "reply_to": _address("reply_to", required=False),
}


def get_setting(key: str) -> Any:
    """Return the current value of setting ``key``: the table's, else the config's."""
    if key not in VALIDATORS:
        raise KeyError(
            f"{key!r} is not a cloudmail setting; use one of {sorted(VALIDATORS)}."
        )

    db = get_state().db
    row = db.session.get(Setting, key)
    if row is not None:
        return json.loads(row.value)

    return current_app.config[f"CLOUDMAIL_{key.upper()}"]


def all_settings() -> dict[str, Any]:
    """Every setting with its current value."""
    return {key: get_setting(key) for key in VALIDATORS}


def set_setting(key: str, value: Any) -> Any:
    """Check ``value`` and store it as setting ``key``; return the stored value.

    Raises :class:`ConfigurationError` naming the setting when the value is unusable.
    The caller commits.
    """
    if key not in VALIDATORS:
        raise KeyError(
            f"{key!r} is not a cloudmail setting; use one of {sorted(VALIDATORS)}."
        )

    checked = VALIDATORS[key](value)
    db = get_state().db
    row = db.session.get(Setting, key)
    if row is None:
        db.session.add(Setting(key=key, value=json.dumps(checked)))
    else:
        row.value = json.dumps(checked)
    logger.info("Setting %s changed", key)
    return checked
