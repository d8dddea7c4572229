"""AWS Lambda consumer of cloudmail's batch messages (version 1).

Each SQS record carries one *unit* (see ``docs/message-schema.md``). Every message of
the unit is sent through SES v2 ``SendEmail`` as raw bytes, at most once per
idempotency key, and a signed report v1 is posted to the unit's ``callback``. What
cannot be sent within this invocation is handed back to SQS through
``batchItemFailures``; see ``lambda/README.md`` for the delivery guarantee.

The deployed zip holds this file only: it uses boto3 (provided by the Lambda runtime)
and the standard library, never the ``cloudmail`` package.

Environment variables (read when a record is processed unless said otherwise):

``CLOUDMAIL_IDEMPOTENCY_TABLE``
    Required. DynamoDB table with the string hash key ``idempotency_key`` and TTL on
    ``expires_at``.
``CLOUDMAIL_REPORT_SECRET``
    ``whsec_...`` secret(s) used to sign reports, space-separated during a rotation;
    reports are signed with the first. Without it no report is posted.
``CLOUDMAIL_CONFIGURATION_SET``
    SES configuration set used when a unit's ``configuration_set`` is null.
``CLOUDMAIL_AWS_ENDPOINT_URL``
    Endpoint for the SES and DynamoDB clients, read at import and by
    :func:`build_clients` (boto3 itself also honours ``AWS_ENDPOINT_URL``).
``CLOUDMAIL_IDEMPOTENCY_TTL_DAYS``
    Days an idempotency item is kept (default 30, longer than SQS's 14-day maximum
    retention so a key cannot be forgotten while its message may still be delivered).
``CLOUDMAIL_SAFETY_MARGIN_MS``
    Time kept in reserve before the Lambda timeout for releasing a claim and posting
    the report (default 15000; it must exceed one SES call, see ``SES_READ_TIMEOUT``).
``CLOUDMAIL_BACKOFF_BASE_MS`` / ``CLOUDMAIL_BACKOFF_MAX_MS``
    Exponential backoff with full jitter for throttled SES calls and failed report
    posts (defaults 200 and 5000).
``CLOUDMAIL_REPORT_TIMEOUT_SECONDS`` / ``CLOUDMAIL_REPORT_ATTEMPTS``
    Timeout of one report POST and how many times it is tried (defaults 5 and 3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
AMBIGUOUS_SEND = "AmbiguousSend"

# SES v2 names throttling TooManyRequestsException / LimitExceededException; the v1
# "Throttling" code and its "Maximum sending rate exceeded" text still reach v2 callers
# for per-second rate limits.
THROTTLING_CODES = frozenset(
    {
        "TooManyRequestsException",
        "LimitExceededException",
        "Throttling",
        "ThrottlingException",
    }
)
THROTTLING_TEXT = "maximum sending rate exceeded"
PAUSED_CODES = frozenset({"AccountSuspendedException", "SendingPausedException"})

# botocore's own retries are off for SES: a SendEmail retried after a lost response
# can send the mail twice, and botocore does not know the invocation's time budget.
SES_READ_TIMEOUT = 10
SES_CONFIG = Config(
    connect_timeout=3,
    read_timeout=SES_READ_TIMEOUT,
    retries={"mode": "standard", "total_max_attempts": 1},
)
# Item operations are safe to retry: each is conditional on the key or our token.
DYNAMODB_CONFIG = Config(
    connect_timeout=3, read_timeout=5, retries={"mode": "standard", "max_attempts": 3}
)

sesv2: Any = None
dynamodb: Any = None


def build_clients() -> None:
    """Create the module's SES v2 and DynamoDB clients from the environment."""
    global sesv2, dynamodb

    endpoint_url = os.environ.get("CLOUDMAIL_AWS_ENDPOINT_URL") or None
    sesv2 = boto3.client("sesv2", endpoint_url=endpoint_url, config=SES_CONFIG)
    dynamodb = boto3.client(
        "dynamodb", endpoint_url=endpoint_url, config=DYNAMODB_CONFIG
    )


build_clients()


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point for the SQS event source (ReportBatchItemFailures)."""
    return process_event(event, Budget(context))


# -- the unit ----------------------------------------------------------------------


class InvalidUnit(ValueError):
    """An SQS record body is not a batch message this consumer understands."""


@dataclass(frozen=True)
class Message:
    rid: int
    key: str
    to: list[str]
    raw: bytes


@dataclass(frozen=True)
class Unit:
    job: int
    batch: int
    unit: str
    callback: str | None
    configuration_set: str | None
    messages: list[Message]


@dataclass(frozen=True)
class Result:
    rid: int
    key: str
    status: str
    message_id: str | None = None
    error_code: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rid": self.rid,
            "key": self.key,
            "status": self.status,
            "message_id": self.message_id,
            "error_code": self.error_code,
            "error": self.error,
        }


@dataclass(frozen=True)
class HandBack:
    """The rest of the unit must be redelivered by SQS; ``reason`` is for the log."""

    reason: str


def parse_unit(body: str) -> Unit:
    """Read a batch message v1, raising :class:`InvalidUnit` on anything else."""
    try:
        data = json.loads(body)
    except (TypeError, ValueError) as err:
        raise InvalidUnit(f"the body is not JSON ({err})") from err

    if not isinstance(data, dict):
        raise InvalidUnit("the body is not a JSON object")
    if data.get("v") != SCHEMA_VERSION:
        raise InvalidUnit(f"unknown schema version {data.get('v')!r}")

    callback = data.get("callback")
    if callback is not None and not _is_http_url(callback):
        raise InvalidUnit("'callback' is neither null nor an http(s) URL")

    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidUnit("'messages' is not a non-empty list")

    try:
        return Unit(
            job=_integer(data["job"]),
            batch=_integer(data["batch"]),
            unit=str(data["unit"]),
            callback=callback,
            configuration_set=data.get("configuration_set") or None,
            messages=[_parse_message(item) for item in messages],
        )
    except (KeyError, TypeError) as err:
        raise InvalidUnit(f"a required field is missing or mistyped ({err!r})") from err


def _parse_message(item: dict[str, Any]) -> Message:
    to = item["to"]
    if not isinstance(to, list) or not to or not all(isinstance(a, str) for a in to):
        raise InvalidUnit(
            f"'to' of recipient {item.get('rid')!r} is not a list of strings"
        )

    try:
        raw = base64.b64decode(item["raw"], validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidUnit(
            f"'raw' of recipient {item.get('rid')!r} is not base64"
        ) from err

    return Message(rid=_integer(item["rid"]), key=str(item["key"]), to=to, raw=raw)


def _integer(value: Any) -> int:
    # bool is an int subclass; a JSON true is no id.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _is_http_url(value: Any) -> bool:
    # urllib would also open file:// and ftp:// URLs.
    return isinstance(value, str) and value.startswith(("https://", "http://"))


# -- time budget -------------------------------------------------------------------


class Budget:
    """What is left of the invocation's time, minus a safety margin."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self.margin_ms = _env_int("CLOUDMAIL_SAFETY_MARGIN_MS", 15000)

    def remaining_ms(self) -> float:
        if self._context is None:
            return float("inf")
        return float(self._context.get_remaining_time_in_millis())

    def allows(self, wait_ms: float = 0) -> bool:
        """Whether one more SES call, after waiting ``wait_ms``, still fits."""
        return self.remaining_ms() - self.margin_ms - wait_ms > 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        logger.warning(
            "Setting %s: %r is not an integer, using %d", name, value, default
        )
        return default


def _backoff_seconds(attempt: int) -> float:
    base = _env_int("CLOUDMAIL_BACKOFF_BASE_MS", 200)
    cap = _env_int("CLOUDMAIL_BACKOFF_MAX_MS", 5000)
    # Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter") spreads
    # concurrent invocations that hit the same rate limit.
    return random.uniform(0, min(cap, base * 2**attempt)) / 1000


# -- event and record --------------------------------------------------------------


def process_event(event: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Process every SQS record and name the ones SQS must deliver again."""
    failures: list[dict[str, str]] = []
    stopped = False

    for record in event.get("Records", []):
        message_id = record.get("messageId", "")

        # Once a record is handed back the rest follow unprocessed: the cause (time,
        # a paused account, DynamoDB) applies to them too, and FIFO order is kept.
        if stopped:
            failures.append({"itemIdentifier": message_id})
            continue

        try:
            hand_back = process_record(record, budget)
        except Exception:
            # Safe to redeliver: every key SES accepted is recorded as sent.
            logger.error(
                "SQS message %s: unexpected failure", message_id, exc_info=True
            )
            hand_back = HandBack("unexpected failure")

        if hand_back is not None:
            logger.warning(
                "SQS message %s: handed back (%s)", message_id, hand_back.reason
            )
            failures.append({"itemIdentifier": message_id})
            stopped = True

    return {"batchItemFailures": failures}


def process_record(record: dict[str, Any], budget: Budget) -> HandBack | None:
    """Send one unit and report it; return a :class:`HandBack` to have it redelivered.

    A body that cannot be read is logged and dropped (never redelivered): retrying it
    cannot help, and the schema says an unknown version is refused without a report.
    """
    message_id = record.get("messageId", "")
    try:
        unit = parse_unit(record.get("body", ""))
    except InvalidUnit as err:
        logger.error(
            "SQS message %s: dropped, not a batch message v1: %s", message_id, err
        )
        return None

    results: list[Result] = []
    hand_back = None
    for message in unit.messages:
        outcome = send_message(unit, message, budget)
        if isinstance(outcome, HandBack):
            hand_back = outcome
            break
        results.append(outcome)

    logger.info(
        "Unit %s of job %s: %d sent, %d failed, %d left for redelivery",
        unit.unit,
        unit.job,
        sum(r.status == "sent" for r in results),
        sum(r.status == "failed" for r in results),
        len(unit.messages) - len(results),
    )
    if results:
        post_report(unit, results, budget)

    return hand_back


# -- one message -------------------------------------------------------------------


@dataclass(frozen=True)
class SesAnswer:
    kind: str  # accepted, rejected, paused, out_of_time or ambiguous
    message_id: str | None = None
    code: str | None = None
    text: str | None = None


def send_message(unit: Unit, message: Message, budget: Budget) -> Result | HandBack:
    """Send one message at most once per key, or say why the unit goes back to SQS."""
    if not budget.allows():
        return HandBack("time budget exhausted")

    # Step 1: claim the key; a key already known is answered from the store.
    try:
        token, stored = claim_key(message)
    except (ClientError, BotoCoreError):
        logger.error("Key %s: cannot claim it", message.key, exc_info=True)
        return HandBack("idempotency store unavailable")

    if stored is not None:
        return result_from_store(message, stored)

    # Step 2: send, then record what SES answered.
    answer = send_with_retries(unit, message, budget)
    if answer.kind == "accepted":
        mark_sent(message, token, answer.message_id or "")
        return Result(message.rid, message.key, "sent", message_id=answer.message_id)

    if answer.kind == "rejected":
        mark_failed(message, token, answer.code or "", answer.text or "")
        return Result(
            message.rid,
            message.key,
            "failed",
            error_code=answer.code,
            error=answer.text,
        )

    if answer.kind == "ambiguous":
        # The claim stays "sending": a redelivery reports the same ambiguity.
        return Result(
            message.rid,
            message.key,
            "failed",
            error_code=AMBIGUOUS_SEND,
            error=answer.text,
        )

    # Nothing was sent: free the key so the redelivery sends it.
    release_key(message, token)
    if answer.kind == "paused":
        return HandBack(f"SES sending is paused ({answer.code})")
    return HandBack("time budget exhausted while SES was throttling or failing")


def send_with_retries(unit: Unit, message: Message, budget: Budget) -> SesAnswer:
    """Call SES until it answers for good, retrying throttling and transient errors."""
    params = _send_email_params(unit, message)
    attempt = 0
    while True:
        try:
            response = sesv2.send_email(**params)
            return SesAnswer("accepted", message_id=response["MessageId"])
        except ClientError as err:
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            text = str(error.get("Message", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in PAUSED_CODES:
                return SesAnswer("paused", code=code, text=text)
            if not _is_retryable(code, text, status):
                return SesAnswer("rejected", code=code, text=text)
            reason = code
        except ParamValidationError as err:
            # botocore refused the request before sending it; retrying cannot help.
            return SesAnswer("rejected", code="ParamValidationError", text=str(err))
        except (
            EndpointConnectionError,
            ConnectTimeoutError,
            NoCredentialsError,
        ) as err:
            # No request reached SES, so it cannot have received the mail.
            reason = type(err).__name__
        except Exception as err:
            # A read timeout or a dropped connection loses SES's answer: the mail may
            # have been accepted, and sending again could deliver it twice.
            logger.error("Key %s: SES's answer was lost", message.key, exc_info=True)
            return SesAnswer(
                "ambiguous",
                text=f"SES's answer was lost ({type(err).__name__}); the mail may or "
                "may not have been sent, so it is not sent again under this key.",
            )

        delay = _backoff_seconds(attempt)
        if not budget.allows(delay * 1000):
            return SesAnswer("out_of_time", code=reason)
        logger.info(
            "Key %s: SES answered %s, retrying in %.3f s", message.key, reason, delay
        )
        time.sleep(delay)
        attempt += 1


def _is_retryable(code: str, text: str, status: int) -> bool:
    if code in THROTTLING_CODES or THROTTLING_TEXT in text.lower():
        return True
    return status >= 500


def _send_email_params(unit: Unit, message: Message) -> dict[str, Any]:
    # No FromEmailAddress: SES takes the sender from the raw message's From header,
    # so the bytes cloudmail rendered are the single source of truth.
    params: dict[str, Any] = {
        "Destination": {"ToAddresses": message.to},
        "Content": {"Raw": {"Data": message.raw}},
        "EmailTags": [
            {"Name": "cloudmail-job", "Value": str(unit.job)},
            {"Name": "cloudmail-batch", "Value": str(unit.batch)},
            {"Name": "cloudmail-recipient", "Value": str(message.rid)},
        ],
    }
    configuration_set = unit.configuration_set or os.environ.get(
        "CLOUDMAIL_CONFIGURATION_SET"
    )
    if configuration_set:
        params["ConfigurationSetName"] = configuration_set
    return params


# -- idempotency store -------------------------------------------------------------

# "state", "owner" and "error" may be DynamoDB reserved words: always use names.


def _table() -> str:
    table = os.environ.get("CLOUDMAIL_IDEMPOTENCY_TABLE", "")
    if not table:
        raise RuntimeError(
            "CLOUDMAIL_IDEMPOTENCY_TABLE is not set; set it to the name of the "
            "DynamoDB idempotency table."
        )
    return table


def claim_key(message: Message) -> tuple[str, dict[str, Any] | None]:
    """Mark ``message.key`` as being sent by us.

    Returns our claim token and ``None``, or ``("", item)`` when the key was already
    claimed (by an earlier delivery of the same unit).
    """
    token = uuid.uuid4().hex
    ttl_days = _env_int("CLOUDMAIL_IDEMPOTENCY_TTL_DAYS", 30)
    item = {
        "idempotency_key": {"S": message.key},
        "state": {"S": "sending"},
        "owner": {"S": token},
        "rid": {"N": str(message.rid)},
        "expires_at": {"N": str(int(time.time()) + ttl_days * 86400)},
    }
    try:
        dynamodb.put_item(
            TableName=_table(),
            Item=item,
            ConditionExpression="attribute_not_exists(#k)",
            ExpressionAttributeNames={"#k": "idempotency_key"},
        )
        return token, None
    except ClientError as err:
        if (
            err.response.get("Error", {}).get("Code")
            != "ConditionalCheckFailedException"
        ):
            raise

    stored = dynamodb.get_item(
        TableName=_table(),
        Key={"idempotency_key": {"S": message.key}},
        ConsistentRead=True,
    ).get("Item")
    # botocore may retry a put whose first answer was lost; the item is then ours.
    if stored is None or stored.get("owner", {}).get("S") == token:
        return token, None
    return "", stored


def result_from_store(message: Message, item: dict[str, Any]) -> Result:
    state = item.get("state", {}).get("S")
    if state == "sent":
        logger.info("Key %s: already sent, not sending again", message.key)
        return Result(
            message.rid, message.key, "sent", message_id=item["message_id"]["S"]
        )

    if state == "failed":
        return Result(
            message.rid,
            message.key,
            "failed",
            error_code=item.get("error_code", {}).get("S"),
            error=item.get("error", {}).get("S"),
        )

    logger.warning("Key %s: an earlier attempt never recorded its outcome", message.key)
    return Result(
        message.rid,
        message.key,
        "failed",
        error_code=AMBIGUOUS_SEND,
        error="An earlier attempt claimed this key but never recorded SES's answer "
        "(it was interrupted); the mail may or may not have been sent, so it is not "
        "sent again under this key. Check SES before sending it under a new key.",
    )


def mark_sent(message: Message, token: str, ses_message_id: str) -> None:
    _finish(message, token, "sent", {"message_id": ses_message_id})


def mark_failed(message: Message, token: str, code: str, text: str) -> None:
    _finish(message, token, "failed", {"error_code": code, "error": text})


def _finish(message: Message, token: str, state: str, fields: dict[str, str]) -> None:
    """Record SES's answer on our claim; runs after SES answered, so never raises."""
    fields = {"state": state, **fields}
    names = {f"#f{n}": name for n, name in enumerate(fields)}
    values = {f":f{n}": {"S": value} for n, value in enumerate(fields.values())}
    assignments = ", ".join(f"#f{n} = :f{n}" for n in range(len(fields)))
    for attempt in range(3):
        try:
            dynamodb.update_item(
                TableName=_table(),
                Key={"idempotency_key": {"S": message.key}},
                UpdateExpression=f"SET {assignments}",
                ConditionExpression="#o = :owner",
                ExpressionAttributeNames={"#o": "owner", **names},
                ExpressionAttributeValues={":owner": {"S": token}, **values},
            )
            return
        except Exception:
            logger.warning(
                "Key %s: cannot record state %s (attempt %d)",
                message.key,
                state,
                attempt + 1,
                exc_info=True,
            )
            time.sleep(_backoff_seconds(attempt))
    # Known limitation: the item stays "sending", so a redelivery reports
    # AmbiguousSend for a mail that was in fact handled; it never sends it again.
    logger.error("Key %s: state %s could not be recorded", message.key, state)


def release_key(message: Message, token: str) -> None:
    """Drop our claim on a key SES did not accept, so a redelivery sends it."""
    try:
        dynamodb.delete_item(
            TableName=_table(),
            Key={"idempotency_key": {"S": message.key}},
            ConditionExpression="#o = :owner AND #s = :sending",
            ExpressionAttributeNames={"#o": "owner", "#s": "state"},
            ExpressionAttributeValues={
                ":owner": {"S": token},
                ":sending": {"S": "sending"},
            },
        )
    except Exception:
        # Known limitation: the stale claim makes the redelivery report AmbiguousSend
        # instead of sending; cloudmail's retry under a new key then sends it.
        logger.error("Key %s: cannot release the claim", message.key, exc_info=True)


# -- reports -----------------------------------------------------------------------


def post_report(unit: Unit, results: list[Result], budget: Budget) -> None:
    """POST a signed report v1 to the unit's callback; never raises."""
    if unit.callback is None:
        return

    secrets = os.environ.get("CLOUDMAIL_REPORT_SECRET", "").split()
    if not secrets:
        logger.error(
            "Unit %s: no report posted, CLOUDMAIL_REPORT_SECRET is not set", unit.unit
        )
        return

    report_id = f"rep_{uuid.uuid4().hex}"
    body = json.dumps(
        {
            "v": SCHEMA_VERSION,
            "id": report_id,
            "source": "lambda",
            "job": unit.job,
            "batch": unit.batch,
            "unit": unit.unit,
            "results": [r.as_dict() for r in results],
        },
        separators=(",", ":"),
    ).encode()

    try:
        _deliver_report(unit, report_id, body, secrets[0], budget)
    except Exception:
        # The mails are recorded as sent; a redelivery would re-report from the store.
        logger.error(
            "Unit %s: report %s not delivered", unit.unit, report_id, exc_info=True
        )


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks signature ``v1,<base64 HMAC-SHA256>`` of one request."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(
            "CLOUDMAIL_REPORT_SECRET is not 'whsec_' followed by base64; copy the "
            "secret exactly as cloudmail generated it."
        ) from err
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _deliver_report(
    unit: Unit, report_id: str, body: bytes, secret: str, budget: Budget
) -> None:
    attempts = max(1, _env_int("CLOUDMAIL_REPORT_ATTEMPTS", 3))
    timeout = _env_int("CLOUDMAIL_REPORT_TIMEOUT_SECONDS", 5)
    for attempt in range(attempts):
        # Signed afresh each attempt so the timestamp stays within the 5-minute window.
        timestamp = int(time.time())
        request = urllib.request.Request(
            unit.callback or "",
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "cloudmail-lambda",
                "webhook-id": report_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(secret, report_id, timestamp, body),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                logger.info(
                    "Unit %s: report %s answered %d",
                    unit.unit,
                    report_id,
                    response.status,
                )
                return
        except urllib.error.HTTPError as err:
            # A 4xx says the report itself is refused; sending it again cannot help.
            if err.code < 500 and err.code != 429:
                logger.error(
                    "Unit %s: report %s refused with %d", unit.unit, report_id, err.code
                )
                return
            reason = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            reason = type(err).__name__

        delay = _backoff_seconds(attempt)
        out_of_time = budget.remaining_ms() < (delay + timeout) * 1000
        if attempt + 1 == attempts or out_of_time:
            logger.error(
                "Unit %s: report %s not delivered after %d attempts (%s)",
                unit.unit,
                report_id,
                attempt + 1,
                reason,
            )
            return
        logger.warning(
            "Unit %s: report %s failed (%s), retrying", unit.unit, report_id, reason
        )
        time.sleep(delay)
