"""Packing a batch's messages into queue-sized units (batch message v1).

Cloud queues cap the size of one message (SQS 1 MiB, Cloudflare Queues 128 KB), so a
batch becomes several *units*, each under the cap and holding at most
``max_messages`` recipients (SES's bulk limit is 50). Units are packed by size, not by
a fixed count, so a batch with large HTML still fits. See ``docs/message-schema.md``.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import reports
from .base import BatchInfo, OutgoingMessage

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: The error code of a recipient whose message can never fit in a queue message.
MESSAGE_TOO_LARGE = "MessageTooLarge"


@dataclass
class Unit:
    """One queue message: its JSON body and the recipients it carries."""

    unit_id: str
    body: str
    recipient_ids: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.body.encode("utf-8"))


@dataclass
class Oversized:
    """A single recipient's message that exceeds the cap on its own."""

    recipient_id: int
    size: int


def _entry(message: OutgoingMessage) -> str:
    return json.dumps(
        {
            "rid": message.recipient_id,
            "key": message.key,
            "to": list(message.to),
            "from": message.sender,
            "raw": base64.b64encode(message.raw).decode("ascii"),
        },
        separators=(",", ":"),
        ensure_ascii=True,
    )


def pack_units(
    batch: BatchInfo,
    messages: Iterable[OutgoingMessage],
    *,
    max_bytes: int,
    max_messages: int = 50,
    configuration_set: str | None = None,
) -> Iterator[Unit | Oversized]:
    """Yield units whose serialized JSON stays within ``max_bytes``.

    A message too large to fit in an empty unit is yielded as :class:`Oversized`, so
    the caller can fail that recipient instead of the batch.
    """
    number = 0
    entries: list[str] = []
    ids: list[int] = []

    def envelope(n: int) -> tuple[str, str]:
        head: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "job": batch.job_id,
            "batch": batch.batch_id,
            "unit": f"{batch.job_id}-{batch.batch_id}-{n}",
            "callback": batch.callback_url,
            "configuration_set": configuration_set,
        }
        text = json.dumps(head, separators=(",", ":"))
        return text[:-1] + ',"messages":[', "]}"

    def flush() -> Unit:
        nonlocal number, entries, ids
        start, end = envelope(number)
        unit = Unit(
            f"{batch.job_id}-{batch.batch_id}-{number}",
            start + ",".join(entries) + end,
            ids,
        )
        number += 1
        entries, ids = [], []
        return unit

    for message in messages:
        entry = _entry(message)
        start, end = envelope(number)
        overhead = len(start) + len(end)
        if overhead + len(entry) > max_bytes:
            yield Oversized(message.recipient_id, overhead + len(entry))
            continue

        used = overhead + sum(len(e) for e in entries) + len(entries)
        if entries and (
            len(entries) >= max_messages or used + 1 + len(entry) > max_bytes
        ):
            yield flush()
        entries.append(entry)
        ids.append(message.recipient_id)

    if entries:
        yield flush()


def remember_keys(
    messages: Iterable[OutgoingMessage], keys: dict[int, str]
) -> Iterator[OutgoingMessage]:
    """Pass messages through, noting each recipient's idempotency key in ``keys``."""
    for message in messages:
        keys[message.recipient_id] = message.key
        yield message


def fail_oversized(
    batch: BatchInfo,
    oversized: list[Oversized],
    keys: dict[int, str],
    *,
    source: str,
    queue: str,
    limit: int,
) -> None:
    """Report recipients whose message can never fit in one ``queue`` message as failed.

    Retrying would not help, so they are not handed back: they end ``failed`` with
    :data:`MESSAGE_TOO_LARGE`, through the same report path as every other outcome.
    """
    if not oversized:
        return

    logger.warning(
        "Batch %s of job %s: %d messages exceed the %s limit of %d bytes; failed",
        batch.batch_id,
        batch.job_id,
        len(oversized),
        queue,
        limit,
    )
    reports.apply_report(
        {
            "v": 1,
            "id": f"{source}-{uuid.uuid4().hex}",
            "source": source,
            "job": batch.job_id,
            "batch": batch.batch_id,
            "results": [
                {
                    "rid": item.recipient_id,
                    "key": keys[item.recipient_id],
                    "status": "failed",
                    "message_id": None,
                    "error_code": MESSAGE_TOO_LARGE,
                    "error": (
                        f"The mail is {item.size:,} bytes as one {queue} message; {queue} "
                        f"takes at most {limit:,}. Make the mail or its attachments "
                        "smaller and retry."
                    ),
                }
                for item in oversized
            ],
        }
    )
