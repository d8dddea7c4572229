"""The Cloudflare connector: batch units posted to cloudmail's Worker.

The batch is packed into units (batch message v1) that fit one Cloudflare Queue
message, the units are grouped into ``POST /enqueue`` requests under the Worker's body
limit, and each request is signed with Standard Webhooks under
``CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET``. The Worker puts every unit on its Queue; its
consumer sends each recipient through SES and reports to ``CLOUDMAIL_CALLBACK_URL``.
The Worker's side of the contract is ``lambda/WORKER.md``; this side is
``docs/cloudflare.md``.

Sending the same request again is safe (the consumer sends at most once per
idempotency key), so transient failures are retried with the very same body. A unit
that still is not accepted leaves its recipients refused: they go back to pending and
the batch fails, to be sent again later under new keys.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError, DispatchError
from ..webhooks.signing import sign_headers
from .base import BatchInfo, Connector, HandOff, OutgoingMessage
from .packing import Oversized, Unit, fail_oversized, pack_units, remember_keys

logger = logging.getLogger(__name__)

#: A unit's JSON may use this many bytes: the Queue's 128 KB message limit less its
#: ~100 bytes of metadata and a margin (lambda/src/limits.js, ``MAX_UNIT_BYTES``).
MAX_UNIT_BYTES = 127_000

#: The Worker refuses a larger ``/enqueue`` body (lambda/src/limits.js).
MAX_REQUEST_BYTES = 10_000_000

#: The Worker answers these after which the same request may be sent again.
_RETRYABLE_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))

_ERROR_LENGTH = 500


@dataclass
class EnqueueRequest:
    """One ``/enqueue`` body and the units it carries, in order."""

    job_id: int
    batch_id: int
    units: list[Unit] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        head = f'{{"v":1,"job":{self.job_id},"batch":{self.batch_id},"units":['
        return (head + ",".join(unit.body for unit in self.units) + "]}").encode()

    def size_with(self, unit: Unit) -> int:
        """The body's size in bytes once ``unit`` is added."""
        head = len(f'{{"v":1,"job":{self.job_id},"batch":{self.batch_id},"units":[]}}')
        units = sum(u.size for u in self.units) + unit.size
        return head + units + len(self.units)


@dataclass
class Attempt:
    """What one POST of a request came back with."""

    status: int | None
    error: str
    enqueued_units: int = 0
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in _RETRYABLE_STATUSES


class CloudflareConnector(Connector):
    """Hands batches to cloudmail's Cloudflare Worker (``lambda/worker.js``)."""

    name = "cloudflare"

    #: Limits, as attributes so a deployment with other Worker limits (or a test) can
    #: lower them on a subclass.
    max_unit_bytes = MAX_UNIT_BYTES
    max_request_bytes = MAX_REQUEST_BYTES

    def __init__(self, app: Any, settings: dict[str, Any]) -> None:
        super().__init__(app, settings)
        self.sleep: Callable[[float], None] = time.sleep
        self.jitter: Callable[[float, float], float] = random.uniform

    def dispatch(
        self, batch: BatchInfo, messages: Iterable[OutgoingMessage]
    ) -> HandOff:
        # 1. Read the settings; a missing one fails the batch, to be retried once set.
        url, secrets = self._endpoint(batch)

        # 2. Pack, group into requests and post them, one request at a time.
        keys: dict[int, str] = {}
        oversized: list[Oversized] = []
        handoff = HandOff()
        failure: str | None = None
        requests_sent = 0
        for request in self._requests(batch, remember_keys(messages, keys), oversized):
            if failure is None:
                requests_sent += 1
                failure = self._hand_over(url, secrets, batch, request, handoff)
            else:
                # An earlier request failed for good; the Worker is unlikely to take
                # this one, and the batch is retried as a whole anyway.
                for unit in request.units:
                    for rid in unit.recipient_ids:
                        handoff.refused[rid] = failure

        # 3. Recipients whose mail never fits a queue message fail on their own.
        if oversized:
            fail_oversized(
                batch,
                oversized,
                keys,
                source="cloudflare",
                queue="Cloudflare Queue",
                limit=self.max_unit_bytes,
            )

        host = urllib.parse.urlsplit(url).hostname
        handoff.provider_ref = f"cloudflare {host}: {requests_sent} requests"[:255]
        logger.info(
            "Batch %s of job %s: Worker accepted %d recipients, refused %d, %d too large",
            batch.batch_id,
            batch.job_id,
            len(handoff.accepted),
            len(handoff.refused),
            len(oversized),
        )
        return handoff

    # -- settings ----------------------------------------------------------------

    def _endpoint(self, batch: BatchInfo) -> tuple[str, list[str]]:
        config = self.app.config
        base = config.get("CLOUDMAIL_CLOUDFLARE_WORKER_URL")
        secrets = _secret_list(config.get("CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET"))
        if not base or not secrets:
            raise DispatchError(
                "The cloudflare provider needs CLOUDMAIL_CLOUDFLARE_WORKER_URL and "
                "CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET; set both, then retry the batch.",
                job_id=batch.job_id,
                batch_id=batch.batch_id,
                connector=self.name,
            )
        return str(base).rstrip("/") + "/enqueue", secrets

    # -- packing -----------------------------------------------------------------

    def _requests(
        self,
        batch: BatchInfo,
        messages: Iterable[OutgoingMessage],
        oversized: list[Oversized],
    ) -> Iterator[EnqueueRequest]:
        """Yield ``/enqueue`` requests as they fill, so a big batch is streamed."""
        units = pack_units(
            batch,
            messages,
            max_bytes=self.max_unit_bytes,
            configuration_set=self.app.config.get(
                "CLOUDMAIL_CLOUDFLARE_CONFIGURATION_SET"
            ),
        )
        request = EnqueueRequest(batch.job_id, batch.batch_id)
        for unit in units:
            if isinstance(unit, Oversized):
                oversized.append(unit)
                continue

            if request.units and request.size_with(unit) > self.max_request_bytes:
                yield request
                request = EnqueueRequest(batch.job_id, batch.batch_id)
            request.units.append(unit)
        if request.units:
            yield request

    # -- sending -----------------------------------------------------------------

    def _hand_over(
        self,
        url: str,
        secrets: list[str],
        batch: BatchInfo,
        request: EnqueueRequest,
        handoff: HandOff,
    ) -> str | None:
        """Post one request, retrying; return None when every unit is accepted.

        Otherwise the units not accepted are added to ``handoff.refused`` and the
        reason is returned.
        """
        body = request.body
        request_id = f"enq_{uuid.uuid4().hex}"
        max_attempts = int(self.app.config.get("CLOUDMAIL_CLOUDFLARE_MAX_ATTEMPTS", 5))
        enqueued = 0

        for number in range(1, max_attempts + 1):
            attempt = self._post(url, secrets, request_id, body)
            if attempt.status == 202:
                enqueued = len(request.units)
                break

            # A 503 says how many units (in order) this try put on the queue; they
            # stay there whatever later tries do.
            enqueued = max(enqueued, attempt.enqueued_units)
            logger.warning(
                "Batch %s of job %s: /enqueue try %d of %d failed: %s",
                batch.batch_id,
                batch.job_id,
                number,
                max_attempts,
                attempt.error,
            )
            if not attempt.retryable or number == max_attempts:
                break
            self.sleep(self._backoff(number, attempt.retry_after))

        # Record the outcome unit by unit.
        for position, unit in enumerate(request.units):
            if position < enqueued:
                handoff.accepted.extend(unit.recipient_ids)
            else:
                for rid in unit.recipient_ids:
                    handoff.refused[rid] = attempt.error
        if enqueued == len(request.units):
            return None

        logger.error(
            "Batch %s of job %s: the Worker took %d of %d units; the rest go back "
            "to pending",
            batch.batch_id,
            batch.job_id,
            enqueued,
            len(request.units),
        )
        return attempt.error

    def _post(
        self, url: str, secrets: list[str], request_id: str, body: bytes
    ) -> Attempt:
        # Signed again on every try: the Worker refuses a timestamp 5 minutes old.
        headers = sign_headers(secrets, body, msg_id=request_id)
        headers["content-type"] = "application/json"
        http_request = urllib.request.Request(
            url, data=body, headers=headers, method="POST"
        )
        timeout = float(self.app.config.get("CLOUDMAIL_CLOUDFLARE_TIMEOUT", 30))
        try:
            with urllib.request.urlopen(http_request, timeout=timeout) as response:
                response.read()
                return Attempt(response.status, "")
        except urllib.error.HTTPError as err:
            return _refusal(err)
        except (OSError, http.client.HTTPException) as err:
            # Known limitation: a timeout may come after the Worker enqueued the
            # units. The retry is safe (same keys), but when every try times out the
            # units count as refused and are later sent under new keys.
            reason = getattr(err, "reason", err)
            return Attempt(None, f"The Worker at {url} could not be reached: {reason}")

    def _backoff(self, number: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, capped, after failed try ``number``."""
        base = float(self.app.config.get("CLOUDMAIL_CLOUDFLARE_BACKOFF", 0.5))
        cap = float(self.app.config.get("CLOUDMAIL_CLOUDFLARE_BACKOFF_MAX", 10))
        delay = min(cap, base * 2 ** (number - 1))
        # "Equal jitter": at least half the delay, so the tries never bunch up.
        wait = self.jitter(delay / 2, delay)
        if retry_after is not None:
            wait = max(wait, min(retry_after, cap))
        return wait


def _secret_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    return [secret for secret in value or [] if secret]


def _refusal(err: urllib.error.HTTPError) -> Attempt:
    """An Attempt from the Worker's error answer (WORKER.md, "Answers")."""
    try:
        text = err.read(64_000).decode("utf-8", "replace")
    except OSError:
        text = ""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        answer = {}

    code = answer.get("error") or f"HTTP {err.code}"
    reason = str(answer.get("reason") or err.reason or "")[:_ERROR_LENGTH]
    enqueued = answer.get("enqueued_units")
    retry_after = err.headers.get("retry-after") if err.headers else None
    return Attempt(
        status=err.code,
        error=f"The Worker answered {err.code} {code}: {reason}".strip(),
        enqueued_units=enqueued if isinstance(enqueued, int) and enqueued > 0 else 0,
        retry_after=float(retry_after)
        if retry_after and retry_after.isdigit()
        else None,
    )


def check_settings(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigurationError` naming an unusable ``CLOUDMAIL_CLOUDFLARE_*``.

    Called by :func:`cloudmail.extension.validate_config`.
    """
    url = config.get("CLOUDMAIL_CLOUDFLARE_WORKER_URL")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("https://", "http://"))
    ):
        raise ConfigurationError(
            f"CLOUDMAIL_CLOUDFLARE_WORKER_URL is {url!r}; it must be the Worker's "
            "absolute URL, e.g. 'https://cloudmail-worker.example.workers.dev'."
        )

    secrets = config.get("CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET")
    if secrets is not None and not isinstance(secrets, (str, list, tuple)):
        raise ConfigurationError(
            "CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET must be a 'whsec_...' string or a "
            "list of them."
        )
    for secret in _secret_list(secrets):
        try:
            sign_headers(secret, b"")
        except ConfigurationError:
            raise ConfigurationError(
                "CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET holds a value that is not "
                "'whsec_' followed by base64; use the same value as the Worker's "
                "CLOUDMAIL_ENQUEUE_SECRET."
            ) from None

    if config.get("CLOUDMAIL_PROVIDER") == "cloudflare" and not (url and secrets):
        raise ConfigurationError(
            "CLOUDMAIL_PROVIDER is 'cloudflare' but CLOUDMAIL_CLOUDFLARE_WORKER_URL or "
            "CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET is not set; set both (see "
            "docs/cloudflare.md)."
        )

    for key, kind, minimum in (
        ("CLOUDMAIL_CLOUDFLARE_TIMEOUT", (int, float), 0.001),
        ("CLOUDMAIL_CLOUDFLARE_MAX_ATTEMPTS", int, 1),
        ("CLOUDMAIL_CLOUDFLARE_BACKOFF", (int, float), 0),
        ("CLOUDMAIL_CLOUDFLARE_BACKOFF_MAX", (int, float), 0),
    ):
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
            raise ConfigurationError(
                f"{key} is {value!r}; it must be a number of at least {minimum}."
            )
