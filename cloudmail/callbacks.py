"""Webhook routes: reports from cloudmail's own Lambda and Worker.

Each request is authenticated first, then parsed, then applied. Answers: 400 for a
malformed request and 403 for one that fails verification (neither is worth
retrying), 500 when applying failed (the sender retries), 200 otherwise. Bodies never
carry internals; the log says what went wrong.
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from . import reports
from .errors import ConfigurationError, WebhookError, WebhookVerificationError
from .extension import get_state
from .webhooks import signing

logger = logging.getLogger(__name__)


def register(bp: Blueprint) -> None:
    """Add the callback routes to cloudmail's blueprint."""
    bp.add_url_rule("/callback/report", "callback_report", report_callback, methods=["POST"])


def report_secrets() -> list[str]:
    """The secrets reports may be signed with (several during a rotation)."""
    value = current_app.config.get("CLOUDMAIL_REPORT_SECRETS") or []
    if isinstance(value, str):
        value = value.split()
    return [secret for secret in value if secret]


def report_callback() -> ResponseReturnValue:
    body = request.get_data(cache=False)
    secrets = report_secrets()
    if not secrets:
        logger.error("Report refused: CLOUDMAIL_REPORT_SECRETS is not set")
        return _answer(403, "forbidden")

    try:
        report_id = signing.verify(secrets, request.headers, body)
    except WebhookVerificationError as err:
        logger.warning("Report refused from %s: %s", request.remote_addr, err)
        return _answer(403, "forbidden")
    except ConfigurationError as err:
        logger.error("Report refused: %s", err)
        return _answer(403, "forbidden")

    try:
        report = json.loads(body)
        reports.validate_report(report)
    except (ValueError, WebhookError) as err:
        logger.warning("Report %s refused as malformed: %s", report_id, err)
        return _answer(400, "malformed")

    try:
        outcome = reports.apply_report(report)
    except Exception:
        get_state().db.session.rollback()
        logger.error("Report %s could not be applied", report_id, exc_info=True)
        return _answer(500, "not applied")

    return jsonify(ok=True, sent=len(outcome.sent), failed=len(outcome.failed),
                   ignored=outcome.ignored)  # fmt: skip


def _answer(status: int, text: str) -> ResponseReturnValue:
    return jsonify(ok=False, error=text), status
