"""Normalising Amazon SES payloads (the ``Message`` of an SNS notification) into events.

SES writes two formats:

- configuration-set event publishing, keyed by ``eventType`` (Send, Delivery, Bounce,
  Complaint, Reject, DeliveryDelay, Open, Click, Rendering Failure, Subscription);
  ``mail.tags`` holds the message tags, so cloudmail's ``cloudmail-job``,
  ``cloudmail-batch`` and ``cloudmail-recipient`` come back with every event
  (https://docs.aws.amazon.com/ses/latest/dg/event-publishing-retrieving-sns-contents.html);
- identity feedback notifications, keyed by ``notificationType`` (Bounce, Complaint,
  Delivery), which carry no tags: "If using feedback notifications directly on the
  identity, SES does not publish tags"
  (https://docs.aws.amazon.com/ses/latest/dg/event-publishing-retrieving-sns-examples.html,
  https://docs.aws.amazon.com/ses/latest/dg/notification-examples.html).

One :class:`SesEvent` is produced per affected recipient address.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudmail.errors import WebhookError

logger = logging.getLogger(__name__)

SEND = "send"
DELIVERY = "delivery"
BOUNCE = "bounce"
COMPLAINT = "complaint"
REJECT = "reject"
DELIVERY_DELAY = "delivery_delay"
OPEN = "open"
CLICK = "click"
RENDERING_FAILURE = "rendering_failure"
SUBSCRIPTION = "subscription"

# eventType -> (kind, key of the event's own object in the payload).
_EVENT_TYPES: dict[str, tuple[str, str]] = {
    "Send": (SEND, "send"),
    "Delivery": (DELIVERY, "delivery"),
    "Bounce": (BOUNCE, "bounce"),
    "Complaint": (COMPLAINT, "complaint"),
    "Reject": (REJECT, "reject"),
    "DeliveryDelay": (DELIVERY_DELAY, "deliveryDelay"),
    "Open": (OPEN, "open"),
    "Click": (CLICK, "click"),
    "Rendering Failure": (RENDERING_FAILURE, "failure"),
    "Subscription": (SUBSCRIPTION, "subscription"),
}
_NOTIFICATION_TYPES: dict[str, tuple[str, str]] = {
    "Bounce": (BOUNCE, "bounce"),
    "Complaint": (COMPLAINT, "complaint"),
    "Delivery": (DELIVERY, "delivery"),
}

# Setup notices, not mail events. SES publishes the first, as plain text, once to a
# new configuration-set SNS destination; it sends the second (JSON, with
# notificationType) when an identity's notification topic is set. Neither appears in
# AWS's example pages; both are seen on every new topic.
_EVENT_DESTINATION_NOTICE = (
    "Successfully validated SNS topic for Amazon SES event publishing."
)
_IDENTITY_TOPIC_NOTICE = "AmazonSnsSubscriptionSucceeded"

DIAGNOSTIC_MAX_LENGTH = 500
#: The longest message id the events and recipients tables hold.
MESSAGE_ID_MAX_LENGTH = 255

TAG_JOB = "cloudmail-job"
TAG_BATCH = "cloudmail-batch"
TAG_RECIPIENT = "cloudmail-recipient"


@dataclass
class SesEvent:
    """What SES reported about one recipient of one message.

    ``kind`` is one of ``send``, ``delivery``, ``bounce``, ``complaint``, ``reject``,
    ``delivery_delay``, ``open``, ``click``, ``rendering_failure``, ``subscription``.
    ``message_id`` is SES's ``mail.messageId``; ``timestamp`` is when the event
    happened (the event's own timestamp, else the send time), always UTC.
    ``permanent``, ``bounce_type`` and ``bounce_subtype`` describe bounces only.
    ``diagnostic`` is the bounce or delay diagnostic code, the complaint feedback
    type, the reject reason or the rendering error, cut to
    :data:`DIAGNOSTIC_MAX_LENGTH` characters. ``tags`` maps each ``mail.tags`` name to
    its first value (empty for identity notifications). ``raw`` is the whole payload.
    """

    kind: str
    message_id: str
    recipient: str
    timestamp: dt.datetime
    permanent: bool = False
    bounce_type: str | None = None
    bounce_subtype: str | None = None
    diagnostic: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def job_id(self) -> int | None:
        """cloudmail's job id from the ``cloudmail-job`` tag, if present and numeric."""
        return _int_tag(self.tags, TAG_JOB)

    @property
    def batch_id(self) -> int | None:
        """cloudmail's batch id from the ``cloudmail-batch`` tag."""
        return _int_tag(self.tags, TAG_BATCH)

    @property
    def recipient_id(self) -> int | None:
        """cloudmail's recipient id from the ``cloudmail-recipient`` tag."""
        return _int_tag(self.tags, TAG_RECIPIENT)


def parse_ses_events(payload: str | bytes | Mapping[str, Any]) -> list[SesEvent]:
    """Turn one SES payload into one :class:`SesEvent` per affected recipient.

    ``payload`` is the SNS ``Message`` string (or bytes), or the already decoded
    object. SES's setup notices give an empty list. Raises
    :class:`~cloudmail.errors.WebhookError` for a payload that is not JSON, has an
    unknown event type, or lacks the message id, the recipients or a timestamp.
    """
    data = _decoded(payload)
    if data is None:
        return []

    ses_type, kind, detail_key = _event_type(data)
    if kind is None:
        logger.info("SES notice %s: ignored, it reports no mail event", ses_type)
        return []

    mail = _object(data, "mail")
    message_id = mail.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise WebhookError(f"The SES {ses_type!r} payload has no 'mail.messageId'.")
    if len(message_id) > MESSAGE_ID_MAX_LENGTH:
        raise WebhookError(
            f"The SES {ses_type!r} payload's 'mail.messageId' is {len(message_id)} "
            f"characters long; SES ids are far below {MESSAGE_ID_MAX_LENGTH}."
        )

    detail = _object(data, detail_key, required=False)
    timestamp = _parse_timestamp(detail.get("timestamp") or mail.get("timestamp"))
    tags = _tags(mail)
    bounce_type = _text(detail.get("bounceType")) if kind == BOUNCE else None
    bounce_subtype = _text(detail.get("bounceSubType")) if kind == BOUNCE else None

    events = []
    for recipient, diagnostic in _recipients(kind, ses_type, mail, detail):
        events.append(
            SesEvent(
                kind=kind,
                message_id=message_id,
                recipient=recipient,
                timestamp=timestamp,
                permanent=bounce_type == "Permanent",
                bounce_type=bounce_type,
                bounce_subtype=bounce_subtype,
                diagnostic=_truncated(diagnostic),
                tags=dict(tags),
                raw=data,
            )
        )

    logger.debug("SES message %s: %d %s event(s) parsed", message_id, len(events), kind)
    return events


def _decoded(payload: str | bytes | Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the payload as a dict, or ``None`` for the event-destination notice."""
    if isinstance(payload, Mapping):
        return dict(payload)

    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as err:
            raise WebhookError("The SES payload is not UTF-8.") from err

    if payload.strip() == _EVENT_DESTINATION_NOTICE:
        logger.info("SES event destination: validation notice ignored")
        return None

    try:
        data = json.loads(payload)
    except json.JSONDecodeError as err:
        raise WebhookError("The SES payload is not JSON.") from err
    if not isinstance(data, dict):
        raise WebhookError(
            f"The SES payload is a JSON {type(data).__name__}, not an object."
        )

    return data


def _event_type(data: Mapping[str, Any]) -> tuple[str, str | None, str]:
    """Return the SES type, its kind (``None`` for a setup notice) and detail key."""
    if "eventType" in data:
        ses_type, known = data["eventType"], _EVENT_TYPES
    elif "notificationType" in data:
        ses_type, known = data["notificationType"], _NOTIFICATION_TYPES
        if ses_type == _IDENTITY_TOPIC_NOTICE:
            return ses_type, None, ""
    else:
        raise WebhookError(
            "The SES payload has neither 'eventType' nor 'notificationType'."
        )

    if not isinstance(ses_type, str) or ses_type not in known:
        field_name = "eventType" if known is _EVENT_TYPES else "notificationType"
        raise WebhookError(
            f"The SES {field_name} {ses_type!r} is unknown; expected one of "
            f"{', '.join(known)}."
        )

    kind, detail_key = known[ses_type]
    return ses_type, kind, detail_key


def _recipients(
    kind: str, ses_type: str, mail: Mapping[str, Any], detail: Mapping[str, Any]
) -> list[tuple[str, str | None]]:
    """Return ``(address, diagnostic)`` for every recipient the event is about."""
    if kind == BOUNCE:
        pairs = _listed(detail.get("bouncedRecipients"), "diagnosticCode")
    elif kind == DELIVERY_DELAY:
        pairs = _listed(detail.get("delayedRecipients"), "diagnosticCode")
        delay_type = _text(detail.get("delayType"))
        pairs = [(address, diagnostic or delay_type) for address, diagnostic in pairs]
    elif kind == COMPLAINT:
        # complainedRecipients names who complained; when a feedback report does
        # not identify them, the message's destination is the best we know.
        feedback_type = _text(detail.get("complaintFeedbackType"))
        listed = _listed(detail.get("complainedRecipients"), None)
        addresses = [a for a, _ in listed] or _destination(mail)
        pairs = [(address, feedback_type) for address in addresses]
    elif kind == DELIVERY:
        addresses = _strings(detail.get("recipients")) or _destination(mail)
        pairs = [(address, None) for address in addresses]
    else:
        diagnostic = {
            REJECT: _text(detail.get("reason")),
            RENDERING_FAILURE: _text(detail.get("errorMessage")),
        }.get(kind)
        pairs = [(address, diagnostic) for address in _destination(mail)]

    if not pairs:
        raise WebhookError(f"The SES {ses_type!r} payload names no recipient.")
    return pairs


def _listed(
    entries: object, diagnostic_key: str | None
) -> list[tuple[str, str | None]]:
    """Read a list of ``{"emailAddress": ..., <diagnostic_key>: ...}`` objects."""
    if not isinstance(entries, list):
        return []

    pairs = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        address = _text(entry.get("emailAddress"))
        if address is None:
            continue
        diagnostic = _text(entry.get(diagnostic_key)) if diagnostic_key else None
        pairs.append((address, diagnostic))
    return pairs


def _destination(mail: Mapping[str, Any]) -> list[str]:
    return _strings(mail.get("destination"))


def _strings(values: object) -> list[str]:
    if not isinstance(values, list):
        return []
    return [value for value in values if isinstance(value, str) and value]


def _object(
    data: Mapping[str, Any], key: str, *, required: bool = True
) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise WebhookError(
            f"The SES payload's {key!r} field is missing or not an object."
        )
    return value


def _tags(mail: Mapping[str, Any]) -> dict[str, str]:
    """Map each tag name to its first value; SES writes every value as a list."""
    raw_tags = mail.get("tags")
    if not isinstance(raw_tags, Mapping):
        return {}

    tags = {}
    for name, values in raw_tags.items():
        if isinstance(values, list):
            first = next((v for v in values if isinstance(v, str)), None)
        else:
            first = values if isinstance(values, str) else None
        if isinstance(name, str) and first is not None:
            tags[name] = first
    return tags


def _parse_timestamp(value: object) -> dt.datetime:
    """Parse SES's ISO 8601 timestamps (``2017-08-05T00:41:02.669Z``) as UTC."""
    if not isinstance(value, str) or not value:
        raise WebhookError("The SES payload has no timestamp.")

    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as err:
        raise WebhookError(
            f"The SES timestamp {value[:40]!r} is not an ISO 8601 date and time."
        ) from err

    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _truncated(text: str | None) -> str | None:
    if text is None or len(text) <= DIAGNOSTIC_MAX_LENGTH:
        return text
    return text[: DIAGNOSTIC_MAX_LENGTH - 1] + "…"


def _int_tag(tags: Mapping[str, str], name: str) -> int | None:
    value = tags.get(name, "")
    # Ids are BIGINT: a longer number names nothing cloudmail stored.
    if not value.isascii() or not value.isdigit() or int(value) > 2**63 - 1:
        return None
    return int(value)
