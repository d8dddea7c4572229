"""Applying per-recipient results reported by a connector or a cloud function.

A report (schema in ``docs/message-schema.md``) says, for recipients of one batch,
``sent`` with the provider's message id or ``failed`` with an error. The outbox
connector calls :func:`apply_report` directly; the callback route calls it once the
report's signature is verified. Applying the same report twice changes nothing: each
result only moves a recipient still ``queued`` on the attempt the key names. Once the
report is committed, the SES events that arrived before it (kept ``pending`` because no
recipient had their message id yet) are applied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from . import events, signals, tracking
from .errors import WebhookError
from .extension import get_state

logger = logging.getLogger(__name__)

REPORT_VERSION = 1


@dataclass
class ReportOutcome:
    """How many results of a report moved a recipient, and how many were stale."""

    sent: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    ignored: int = 0
    job_finished: str | None = None


#: The largest id the tables hold (BIGINT), and the largest attempt count (INTEGER).
_MAX_ID = 2**63 - 1
_MAX_ATTEMPT = 2**31 - 1


def _parse_key(key: Any, job_id: int, rid: int) -> int:
    parts = str(key).split("-")
    if len(parts) != 4 or parts[0] != "cm" or parts[1:3] != [str(job_id), str(rid)]:
        raise WebhookError(
            f"Result key {key!r} does not match job {job_id}, recipient {rid}."
        )
    attempt = parts[3]
    if not attempt.isascii() or not attempt.isdigit() or int(attempt) > _MAX_ATTEMPT:
        raise WebhookError(f"Result key {key!r} has no attempt number.")
    return int(attempt)


def _is_id(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return 0 < value <= _MAX_ID


def validate_report(report: Any) -> Mapping[str, Any]:
    """Check a report's shape; raise :class:`WebhookError` naming what is wrong."""
    if not isinstance(report, Mapping):
        raise WebhookError("A report must be a JSON object.")
    if report.get("v") != REPORT_VERSION:
        raise WebhookError(
            f"Report version {report.get('v')!r} is not supported; expected 1."
        )
    for name in ("job", "batch"):
        if not _is_id(report.get(name)):
            raise WebhookError(
                f"Report field {name!r} is {str(report.get(name))[:40]!r}; it must be "
                "a positive integer id."
            )
    results = report.get("results")
    if not isinstance(results, list):
        raise WebhookError("Report field 'results' must be a list.")
    for result in results:
        if not isinstance(result, Mapping) or not _is_id(result.get("rid")):
            raise WebhookError("Every report result needs a positive integer 'rid'.")
        if result.get("status") not in ("sent", "failed"):
            raise WebhookError(
                f"Result status {result.get('status')!r} is not 'sent' or 'failed'."
            )
        for name in ("message_id", "error_code", "error"):
            if not isinstance(result.get(name), (str, type(None))):
                raise WebhookError(
                    f"Result field {name!r} of recipient {result['rid']} must be a "
                    "string or null."
                )
        _parse_key(result.get("key"), report["job"], result["rid"])
    return report


def apply_report(report: Mapping[str, Any]) -> ReportOutcome:
    """Apply a report's results, settle the batch and job, and commit."""
    validate_report(report)
    db = get_state().db
    session = db.session
    job_id, batch_id = report["job"], report["batch"]
    outcome = ReportOutcome()

    sent, failed = [], []
    for result in report["results"]:
        rid = result["rid"]
        row = {"rid": rid, "attempt": _parse_key(result["key"], job_id, rid)}
        if result["status"] == "sent":
            row["provider_message_id"] = _clip(result.get("message_id"), 255)
            sent.append(row)
        else:
            row["reason"] = _clip(result.get("error_code") or "provider_error", 32)
            row["error"] = _clip(result.get("error"), 2000)
            failed.append(row)

    outcome.sent = tracking.move_each(
        session, job_id, "queued", "sent", sent, ["provider_message_id"]
    )
    outcome.failed = tracking.move_each(
        session, job_id, "queued", "failed", failed, ["reason", "error"]
    )
    outcome.ignored = len(report["results"]) - len(outcome.sent) - len(outcome.failed)

    tracking.settle_batch(session, batch_id)
    outcome.job_finished = tracking.settle_job(session, job_id)
    session.commit()

    logger.info(
        "Report %s for batch %s of job %s: %d sent, %d failed, %d already applied",
        report.get("id"),
        batch_id,
        job_id,
        len(outcome.sent),
        len(outcome.failed),
        outcome.ignored,
    )
    _announce(job_id, outcome)

    # SES events that came before this report can now find their recipients.
    moved = set(outcome.sent)
    recorded = [
        row["provider_message_id"]
        for row in sent
        if row["rid"] in moved and row["provider_message_id"]
    ]
    if recorded:
        events.apply_waiting(recorded)
    return outcome


def _announce(job_id: int, outcome: ReportOutcome) -> None:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if outcome.sent:
        signals.recipient_sent.send(app, job_id=job_id, recipient_ids=outcome.sent)
    if outcome.failed:
        signals.recipient_failed.send(app, job_id=job_id, recipient_ids=outcome.failed)
    if outcome.job_finished:
        signals.job_finished.send(app, job_id=job_id, status=outcome.job_finished)


def _clip(value: Any, size: int) -> str | None:
    if value is None:
        return None
    return str(value)[:size]
