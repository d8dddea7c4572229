"""Standard Webhooks signing and verification (https://www.standardwebhooks.com/).

Reports posted by the Lambda or the Worker, and cloudmail's calls to the Worker's
``/enqueue``, carry three headers: ``webhook-id``, ``webhook-timestamp`` (Unix seconds)
and ``webhook-signature``. The signed content is ``"{id}.{timestamp}.{body}"``; the
signature is ``v1,`` followed by the base64 of its HMAC-SHA256 under the secret's key.
A secret is written ``whsec_`` followed by the base64 of the key bytes. During a
rotation a sender signs with every secret it holds, space-separated, and a receiver
accepts a request if any signature matches any of its secrets. See
``docs/message-schema.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping, Sequence
from secrets import token_bytes, token_urlsafe

from cloudmail.errors import ConfigurationError, WebhookVerificationError

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE = 300

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"

# The Standard Webhooks spec recommends keys of 24 to 64 bytes; 32 matches SHA-256.
_KEY_BYTES = 32


def generate_secret() -> str:
    """Return a new random secret written ``whsec_<base64 of 32 random bytes>``."""
    key = token_bytes(_KEY_BYTES)
    return SECRET_PREFIX + base64.b64encode(key).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``v1,<base64>`` signature of ``body`` sent as ``msg_id``.

    Raises :class:`~cloudmail.errors.ConfigurationError` when ``secret`` is not
    ``whsec_`` followed by base64; the message never repeats the secret.
    """
    key = _decode_secret(secret)
    if key is None:
        raise ConfigurationError(
            "The webhook secret is not 'whsec_' followed by base64; "
            "create one with cloudmail.webhooks.signing.generate_secret()."
        )

    return _signature(key, msg_id, int(timestamp), body)


def sign_headers(
    secret_or_secrets: str | Sequence[str],
    body: bytes,
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """Return the three Standard Webhooks headers for ``body``.

    Given several secrets (during a rotation), ``webhook-signature`` holds one
    signature per secret, space-separated. ``msg_id`` defaults to a random
    ``msg_...`` id and ``timestamp`` to the current Unix time.
    """
    if isinstance(secret_or_secrets, str):
        secret_list = [secret_or_secrets]
    else:
        secret_list = list(secret_or_secrets)
    if not secret_list:
        raise ConfigurationError(
            "sign_headers() was given no secret; pass at least one 'whsec_...' secret."
        )

    if msg_id is None:
        msg_id = "msg_" + token_urlsafe(18)
    if timestamp is None:
        timestamp = int(time.time())

    signatures = [sign(secret, msg_id, timestamp, body) for secret in secret_list]
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(int(timestamp)),
        SIGNATURE_HEADER: " ".join(signatures),
    }


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> str:
    """Authenticate a request and return its ``webhook-id``.

    ``secrets`` are every secret currently accepted (old and new during a rotation);
    ``headers`` is looked up case-insensitively; ``body`` is the raw request body.
    Raises :class:`~cloudmail.errors.WebhookVerificationError` whose message says
    which check failed: a missing header, a timestamp that is not an integer or is
    more than ``tolerance`` seconds away from ``now``, a malformed secret, or no
    signature matching any secret.
    """
    keys = _decode_secrets(secrets)
    msg_id, raw_timestamp, signature_header = _required_headers(headers)
    timestamp = _checked_timestamp(raw_timestamp, now, tolerance)

    # Every candidate is compared against every key, in constant time, so that
    # neither the position of a match nor a partial match shows in the timing.
    expected = [_digest(key, msg_id, timestamp, body) for key in keys]
    matched = False
    for candidate in _candidate_digests(signature_header):
        for digest in expected:
            matched |= hmac.compare_digest(candidate, digest)
    if not matched:
        raise WebhookVerificationError(
            f"Webhook {msg_id[:100]!r}: no 'v1' signature in the {SIGNATURE_HEADER!r} "
            "header matches any configured secret."
        )

    logger.debug("Webhook %s: signature verified", msg_id)
    return msg_id


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = _digest(key, msg_id, timestamp, body)
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    signed_content = f"{msg_id}.{timestamp}.".encode() + bytes(body)
    return hmac.new(key, signed_content, hashlib.sha256).digest()


def _decode_secret(secret: str) -> bytes | None:
    """Return the key bytes of a ``whsec_`` secret, or ``None`` if it is malformed."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        return None

    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return None

    return key or None


def _decode_secrets(secrets: Sequence[str]) -> list[bytes]:
    if isinstance(secrets, str):
        # A lone string would be iterated character by character.
        secrets = [secrets]
    if not secrets:
        raise WebhookVerificationError(
            "No webhook secret is configured, so no request can be authenticated."
        )

    keys = []
    for position, secret in enumerate(secrets, start=1):
        key = _decode_secret(secret)
        if key is None:
            raise WebhookVerificationError(
                f"Webhook secret number {position} of {len(secrets)} is malformed: "
                "it must be 'whsec_' followed by base64."
            )
        keys.append(key)
    return keys


def _required_headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    # WSGI frameworks already fold header case, but a plain dict from a test or a
    # queue consumer does not; Standard Webhooks header names are lowercase.
    wanted = {ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER}
    found = {
        name.lower(): value for name, value in headers.items() if name.lower() in wanted
    }

    for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER):
        if not found.get(name, "").strip():
            raise WebhookVerificationError(f"The {name!r} header is missing or empty.")

    return found[ID_HEADER], found[TIMESTAMP_HEADER].strip(), found[SIGNATURE_HEADER]


def _checked_timestamp(raw: str, now: float | None, tolerance: int) -> int:
    if not raw.isascii() or not raw.isdigit():
        raise WebhookVerificationError(
            f"The {TIMESTAMP_HEADER!r} header {raw[:40]!r} is not whole Unix seconds."
        )

    timestamp = int(raw)
    current = time.time() if now is None else now
    if timestamp < current - tolerance:
        raise WebhookVerificationError(
            f"The {TIMESTAMP_HEADER!r} header {timestamp} is too old: more than "
            f"{tolerance} seconds before the receiver's clock ({int(current)})."
        )
    if timestamp > current + tolerance:
        raise WebhookVerificationError(
            f"The {TIMESTAMP_HEADER!r} header {timestamp} is too new: more than "
            f"{tolerance} seconds after the receiver's clock ({int(current)})."
        )

    return timestamp


def _candidate_digests(signature_header: str) -> list[bytes]:
    """Return the decoded ``v1`` signatures, skipping other versions and bad base64."""
    candidates = []
    for entry in signature_header.split():
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION or not encoded:
            continue
        try:
            candidates.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return candidates
