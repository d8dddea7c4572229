"""Webhook routes: SES events through SNS, and reports from cloudmail's Lambda and Worker.

Each request is authenticated first, then parsed, then stored, then applied (see
:mod:`cloudmail.events`). Answers: 400 for a malformed request and 403 for one that
fails verification (neither is worth retrying), 500 when applying failed (the sender
retries), 200 otherwise. Bodies never carry internals; the log says what went wrong.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import RequestEntityTooLarge

from . import events, reports
from .errors import ConfigurationError, WebhookError, WebhookVerificationError
from .extension import CloudmailState, get_state
from .webhooks import ses_events, signing, sns

logger = logging.getLogger(__name__)

# Bodies are read whole before they are authenticated, so their size is bounded. An
# SNS message is at most 256 KiB, which JSON escaping in the envelope can double; a
# report covers one unit of at most 1 MiB of mail, a few thousand results at most.
SNS_MAX_BYTES = 2 << 20
REPORT_MAX_BYTES = 16 << 20


def register(bp: Blueprint) -> None:
    """Add the callback routes to cloudmail's blueprint."""
    bp.add_url_rule(
        "/callback/report", "callback_report", report_callback, methods=["POST"]
    )
    bp.add_url_rule("/callback/ses", "callback_ses", ses_callback, methods=["POST"])


def check_settings(config: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigurationError` for an unusable ``CLOUDMAIL_SNS_*`` value."""
    for arn in _split(config["CLOUDMAIL_SNS_TOPIC_ARNS"]):
        if not isinstance(arn, str) or not arn.startswith("arn:") or ":sns:" not in arn:
            raise ConfigurationError(
                f"CLOUDMAIL_SNS_TOPIC_ARNS holds {arn!r}, which is not an SNS topic "
                "ARN; write 'arn:aws:sns:<region>:<account>:<topic>'."
            )

    fetch = config["CLOUDMAIL_SNS_FETCH"]
    if fetch is not None and not callable(fetch):
        raise ConfigurationError(
            f"CLOUDMAIL_SNS_FETCH is {fetch!r}; it must be a callable taking a URL "
            "and returning the bytes of the answer, or None."
        )

    timeout = config["CLOUDMAIL_SNS_TIMEOUT"]
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or timeout <= 0
    ):
        raise ConfigurationError(
            f"CLOUDMAIL_SNS_TIMEOUT is {timeout!r}; it must be a positive number of "
            "seconds."
        )


def sns_topic_arns() -> list[str]:
    """The SNS topics whose messages the SES route accepts."""
    return _split(current_app.config.get("CLOUDMAIL_SNS_TOPIC_ARNS"))


def _split(value: Any) -> list[Any]:
    if isinstance(value, str):
        value = value.split()
    return [item for item in value or [] if item]


def report_secrets() -> list[str]:
    """The secrets reports may be signed with (several during a rotation)."""
    value = current_app.config.get("CLOUDMAIL_REPORT_SECRETS") or []
    if isinstance(value, str):
        value = value.split()
    return [secret for secret in value if secret]


def report_callback() -> ResponseReturnValue:
    body = _body(REPORT_MAX_BYTES)
    if body is None:
        return _answer(413, "too large")
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
        # Decoded first: json.loads would also take UTF-16 and UTF-32 bytes, which
        # the report's stored payload (UTF-8 text) could then not hold.
        report = json.loads(body.decode("utf-8"))
        reports.validate_report(report)
    except (ValueError, WebhookError) as err:
        logger.warning("Report %s refused as malformed: %s", report_id, err)
        return _answer(400, "malformed")

    try:
        _, outcome = events.receive_report(report_id, body.decode("utf-8"), report)
    except Exception:
        get_state().db.session.rollback()
        logger.error("Report %s could not be applied", report_id, exc_info=True)
        return _answer(500, "not applied")

    if outcome is None:
        return jsonify(ok=True, sent=0, failed=0, ignored=len(report["results"]))
    return jsonify(
        ok=True,
        sent=len(outcome.sent),
        failed=len(outcome.failed),
        ignored=outcome.ignored,
    )


def ses_callback() -> ResponseReturnValue:
    """SES events published to an SNS topic, delivered by SNS over HTTPS."""
    # 1. Nothing is read before the allowed topics are known.
    topics = sns_topic_arns()
    if not topics:
        logger.error(
            "SNS message refused: CLOUDMAIL_SNS_TOPIC_ARNS is not set; set it to the "
            "ARNs of the SNS topics SES publishes to"
        )
        return _answer(403, "forbidden")

    # 2. The envelope, then its topic and signature.
    body = _body(SNS_MAX_BYTES)
    if body is None:
        return _answer(413, "too large")
    try:
        message = sns.parse_sns_body(body)
    except WebhookError as err:
        logger.warning(
            "SNS message refused as malformed from %s: %s", request.remote_addr, err
        )
        return _answer(400, "malformed")

    message_id = str(message.get("MessageId"))[:64]
    verifier = _verifier(topics)
    try:
        if message["Type"] == sns.SUBSCRIPTION_CONFIRMATION:
            verifier.confirm_subscription(
                message, fetch=current_app.config["CLOUDMAIL_SNS_FETCH"]
            )
            return jsonify(ok=True)
        verifier.verify(message)
    except WebhookVerificationError as err:
        logger.warning(
            "SNS message %s refused from %s: %s", message_id, request.remote_addr, err
        )
        return _answer(403, "forbidden")
    except sns.SnsFetchError as err:
        logger.error("SNS message %s not processed: %s", message_id, err)
        return _answer(500, "not processed")
    except WebhookError as err:
        logger.warning("SNS message %s refused as malformed: %s", message_id, err)
        return _answer(400, "malformed")

    if message["Type"] == sns.UNSUBSCRIBE_CONFIRMATION:
        logger.warning(
            "SNS topic %s: the endpoint was unsubscribed; no more SES events "
            "arrive until it is subscribed again",
            message["TopicArn"],
        )
        return jsonify(ok=True)

    # 3. The SES payload it carries, then store and apply.
    try:
        parsed = ses_events.parse_ses_events(message["Message"])
    except WebhookError as err:
        logger.warning(
            "SNS message %s refused: its SES payload is malformed: %s", message_id, err
        )
        return _answer(400, "malformed")
    if not parsed:
        return jsonify(ok=True)

    try:
        events.receive_ses(
            message["MessageId"], body.decode("utf-8", "replace"), parsed
        )
    except Exception:
        get_state().db.session.rollback()
        logger.error(
            "SNS message %s could not be applied; SNS will retry",
            message_id,
            exc_info=True,
        )
        return _answer(500, "not processed")
    return jsonify(ok=True)


# One verifier per app keeps its certificate cache across requests.
_verifiers: weakref.WeakKeyDictionary[
    CloudmailState, tuple[tuple[Any, ...], sns.SNSVerifier]
] = weakref.WeakKeyDictionary()
_verifiers_lock = threading.Lock()


def _verifier(topics: list[str]) -> sns.SNSVerifier:
    config = current_app.config
    settings = (
        frozenset(topics),
        config["CLOUDMAIL_SNS_FETCH"],
        config["CLOUDMAIL_SNS_TIMEOUT"],
    )
    state = get_state()
    with _verifiers_lock:
        cached = _verifiers.get(state)
        if cached is None or cached[0] != settings:
            verifier = sns.SNSVerifier(
                topics, fetch_cert=settings[1], timeout=settings[2]
            )
            _verifiers[state] = cached = (settings, verifier)
    return cached[1]


def _body(limit: int) -> bytes | None:
    """The request body, or None (logged) when it is longer than ``limit`` bytes."""
    host_limit = request.max_content_length
    request.max_content_length = min(limit, host_limit or limit)
    try:
        return request.get_data(cache=False)
    except RequestEntityTooLarge:
        logger.warning(
            "Webhook %s refused from %s: the body is over %d bytes",
            request.path,
            request.remote_addr,
            request.max_content_length,
        )
        return None


def _answer(status: int, text: str) -> ResponseReturnValue:
    return jsonify(ok=False, error=text), status
