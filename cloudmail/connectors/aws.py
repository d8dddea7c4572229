"""The AWS connector: a batch's mail as SQS messages for cloudmail's Lambda.

Each batch is packed into *units* (batch message v1, ``docs/message-schema.md``) of at
most 1 MiB, and the units go to the queue with ``SendMessageBatch``, up to ten and
1 MiB per call. The Lambda in ``lambda/`` sends them through SES and posts a signed
report per unit to ``CLOUDMAIL_CALLBACK_URL``, which moves each recipient to ``sent``
or ``failed``. Until then the recipients stay ``queued``.

What happens to each recipient here:

- its unit was accepted by SQS: ``HandOff.accepted``, the report will settle it;
- its unit was never accepted (SQS kept failing the entry, or refused the call): it
  goes to ``HandOff.refused``, so it is back to ``pending`` and the batch ``failed``;
  ``flask cloudmail resume`` sends it again under a new idempotency key;
- its mail alone exceeds the SQS message size: reported ``failed`` at once with
  ``error_code`` ``MessageTooLarge`` (it would never fit, so waiting cannot help).

See ``docs/aws.md`` for the configuration and the delivery guarantee.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import DispatchError
from .base import BatchInfo, Connector, HandOff, OutgoingMessage
from .packing import Oversized, Unit, fail_oversized, pack_units, remember_keys

logger = logging.getLogger(__name__)

# Amazon SQS API reference, SendMessageBatch: "The maximum allowed individual message
# size and the maximum total payload size (the sum of the individual lengths of all
# of the batched messages) are both 1 MiB 1,048,576 bytes", and at most 10 entries.
SQS_MAX_BYTES = 1_048_576
SQS_MAX_ENTRIES = 10

#: The error code a recipient whose mail cannot fit in one SQS message is failed with.

_session: boto3.session.Session | None = None
_session_pid: int | None = None
_session_lock = threading.Lock()


def _boto3_session() -> boto3.session.Session:
    # Creating a session loads botocore's service models (~80 ms); one per process is
    # enough, as it holds no app settings. Clients are made per connector instance.
    global _session, _session_pid
    with _session_lock:
        if _session is None or _session_pid != os.getpid():
            _session = boto3.session.Session()
            _session_pid = os.getpid()
        return _session


def sqs_client(config: dict[str, Any]) -> Any:
    """A new SQS client for an app's ``CLOUDMAIL_AWS_*`` settings.

    Credentials come from boto3's own chain (environment, profile, instance role).
    Throttling and transient errors of a whole call are retried by botocore's
    ``standard`` mode, with exponential backoff and jitter.
    """
    queue_url = config.get("CLOUDMAIL_AWS_QUEUE_URL") or ""
    region = config.get("CLOUDMAIL_AWS_REGION") or region_from_queue_url(queue_url)
    retries = {
        "mode": "standard",
        "total_max_attempts": config["CLOUDMAIL_AWS_MAX_ATTEMPTS"],
    }
    return _boto3_session().client(
        "sqs",
        region_name=region,
        endpoint_url=config.get("CLOUDMAIL_AWS_ENDPOINT_URL") or None,
        config=Config(connect_timeout=5, read_timeout=30, retries=retries),
    )


def region_from_queue_url(queue_url: str) -> str | None:
    """The region in ``https://sqs.<region>.amazonaws.com/...``, else None."""
    host = urlsplit(queue_url).hostname or ""
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs" and parts[2] == "amazonaws":
        return parts[1]
    return None


@dataclass
class _Outcome:
    accepted: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    sent_units: int = 0
    stopped: str | None = None


class AwsConnector(Connector):
    """Puts a batch's units on the SQS queue ``CLOUDMAIL_AWS_QUEUE_URL``."""

    name = "aws"

    #: Base and cap, in seconds, of the backoff between rounds of ``Failed`` entries.
    retry_base_seconds = 0.2
    retry_max_seconds = 5.0

    def __init__(self, app: Any, settings: dict[str, Any]) -> None:
        super().__init__(app, settings)
        config = app.config
        self.queue_url: str = config.get("CLOUDMAIL_AWS_QUEUE_URL") or ""
        self.fifo = self.queue_url.endswith(".fifo")
        self.configuration_set: str | None = config.get(
            "CLOUDMAIL_AWS_CONFIGURATION_SET"
        )
        self.max_attempts: int = config["CLOUDMAIL_AWS_MAX_ATTEMPTS"]
        self._client: Any = None

    @property
    def client(self) -> Any:
        """This instance's SQS client, created on first use."""
        if self._client is None:
            self._client = sqs_client(self.app.config)
        return self._client

    def dispatch(
        self, batch: BatchInfo, messages: Iterable[OutgoingMessage]
    ) -> HandOff:
        self._check(batch)
        try:
            client = self.client
        except BotoCoreError as err:
            raise DispatchError(
                f"Cannot create the SQS client ({err}); set CLOUDMAIL_AWS_REGION or "
                "use a queue URL of the form https://sqs.<region>.amazonaws.com/...",
                job_id=batch.job_id,
                batch_id=batch.batch_id,
                connector=self.name,
            ) from err
        logger.debug(
            "Batch %s of job %s: queueing on %s (%s)",
            batch.batch_id,
            batch.job_id,
            self.queue_url,
            client.meta.region_name,
        )

        # 1. Pack the batch into units and send them, ten (or 1 MiB) per call.
        keys: dict[int, str] = {}
        outcome = _Outcome()
        oversized: list[Oversized] = []
        group: list[Unit] = []
        units = pack_units(
            batch,
            remember_keys(messages, keys),
            max_bytes=SQS_MAX_BYTES,
            configuration_set=self.configuration_set,
        )
        for item in units:
            if isinstance(item, Oversized):
                oversized.append(item)
                continue
            if group and (
                len(group) == SQS_MAX_ENTRIES
                or sum(u.size for u in group) + item.size > SQS_MAX_BYTES
            ):
                self._send_group(batch, group, outcome)
                group = []
            group.append(item)
        if group:
            self._send_group(batch, group, outcome)

        # 2. A mail too large for any SQS message fails now, alone.
        if oversized:
            fail_oversized(
                batch, oversized, keys, source="aws", queue="SQS", limit=SQS_MAX_BYTES
            )

        total = len(outcome.accepted) + len(outcome.refused)
        logger.info(
            "Batch %s of job %s: SQS accepted %d of %d messages (%d units)",
            batch.batch_id,
            batch.job_id,
            len(outcome.accepted),
            total,
            outcome.sent_units,
        )
        return HandOff(
            accepted=outcome.accepted,
            refused=outcome.refused,
            provider_ref=self.queue_url,
        )

    def _check(self, batch: BatchInfo) -> None:
        if not self.queue_url:
            raise DispatchError(
                "CLOUDMAIL_AWS_QUEUE_URL is not set; set it to the QueueUrl output of "
                "lambda/template.yaml (or the queue 'flask cloudmail dev-aws' prints).",
                job_id=batch.job_id,
                batch_id=batch.batch_id,
                connector=self.name,
            )
        if not batch.callback_url:
            raise DispatchError(
                "CLOUDMAIL_CALLBACK_URL is not set, so the Lambda could never report "
                "what it sent; set it to https://<host>/cloudmail/callback/report.",
                job_id=batch.job_id,
                batch_id=batch.batch_id,
                connector=self.name,
            )

    # -- sending ----------------------------------------------------------------------

    def _entry(self, batch: BatchInfo, unit: Unit) -> dict[str, Any]:
        entry: dict[str, Any] = {"Id": unit.unit_id, "MessageBody": unit.body}
        if self.fifo:
            # One group per job keeps a job's units in order without holding up other
            # jobs. The batch attempt is part of the deduplication id: a resent batch
            # within SQS's 5-minute window must not be dropped as a duplicate, while a
            # retried entry of this very attempt must be.
            entry["MessageGroupId"] = f"cloudmail-job-{batch.job_id}"
            entry["MessageDeduplicationId"] = f"{unit.unit_id}-a{batch.attempt}"
        return entry

    def _send_group(
        self, batch: BatchInfo, group: list[Unit], outcome: _Outcome
    ) -> None:
        """Queue a group of units; retry ``Failed`` entries; record who was refused."""
        if outcome.stopped:
            self._refuse(group, outcome, outcome.stopped)
            return

        pending = {unit.unit_id: unit for unit in group}
        for attempt in range(self.max_attempts):
            try:
                response = self.client.send_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[self._entry(batch, unit) for unit in pending.values()],
                )
            except (ClientError, BotoCoreError) as err:
                # botocore has already retried throttling and transient errors; SQS is
                # out of reach or refuses us, so the rest of the batch is not tried.
                outcome.stopped = f"SQS refused SendMessageBatch: {_describe(err)}"
                logger.error(
                    "Batch %s of job %s: %s",
                    batch.batch_id,
                    batch.job_id,
                    outcome.stopped,
                    exc_info=True,
                )
                self._refuse(list(pending.values()), outcome, outcome.stopped)
                return

            for entry in response.get("Successful", []):
                unit = pending.pop(entry["Id"], None)
                if unit is not None:
                    outcome.accepted.extend(unit.recipient_ids)
                    outcome.sent_units += 1
            failed = response.get("Failed", [])
            for entry in failed:
                # A sender fault (bad contents, bad attributes) fails the same way
                # every time; only SQS's own failures are worth another round.
                if entry.get("SenderFault") and entry["Id"] in pending:
                    code, text = entry.get("Code"), entry.get("Message")
                    reason = f"SQS refused the message: {code}: {text}"
                    self._refuse([pending.pop(entry["Id"])], outcome, reason)
            if not pending:
                return

            logger.warning(
                "Batch %s of job %s: SQS failed %d entries (%s), round %d of %d",
                batch.batch_id,
                batch.job_id,
                len(pending),
                ", ".join(sorted({str(e.get("Code")) for e in failed})) or "no answer",
                attempt + 1,
                self.max_attempts,
            )
            if attempt + 1 < self.max_attempts:
                time.sleep(self._backoff(attempt))

        codes = ", ".join(sorted({str(e.get("Code")) for e in failed}))
        reason = f"SQS failed the message {self.max_attempts} times ({codes})"
        self._refuse(list(pending.values()), outcome, reason)

    def _backoff(self, attempt: int) -> float:
        # Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").
        cap = min(self.retry_max_seconds, self.retry_base_seconds * 2**attempt)
        return random.uniform(0, cap)

    @staticmethod
    def _refuse(units: list[Unit], outcome: _Outcome, reason: str) -> None:
        for unit in units:
            for rid in unit.recipient_ids:
                outcome.refused[rid] = reason


def _describe(err: Exception) -> str:
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        return f"{error.get('Code')}: {error.get('Message')}"
    return f"{type(err).__name__}: {err}"
