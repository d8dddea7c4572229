"""Verifying Amazon SNS HTTP(S) deliveries.

SNS posts a JSON envelope (``Type``, ``MessageId``, ``TopicArn``, ``Message``...)
signed with an RSA key whose X.509 certificate it publishes at ``SigningCertURL``.
:class:`SNSVerifier` checks, in this order, that the topic is one cloudmail subscribed
to, that the certificate URL really points at SNS, and that the signature over the
documented string to sign is valid; only then may a subscription be confirmed.

AWS references:

- https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html
  (string to sign per message type, SignatureVersion 1 = SHA1withRSA, 2 = SHA256withRSA)
- https://docs.aws.amazon.com/sns/latest/dg/http-notification-json.html,
  ``http-subscription-confirmation-json.html`` and
  ``http-unsubscribe-confirmation-json.html`` (the envelope of each message type)

Known limitation: the certificate is trusted because it was fetched over verified TLS
from a strictly checked ``sns.<region>.amazonaws.com`` URL; its own chain and subject
are not checked against a CA bundle, which is what AWS's SDK validators do as well.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cloudmail.errors import (
    CloudmailError,
    ConfigurationError,
    WebhookError,
    WebhookVerificationError,
)

logger = logging.getLogger(__name__)

NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"
MESSAGE_TYPES = (NOTIFICATION, SUBSCRIPTION_CONFIRMATION, UNSUBSCRIBE_CONFIRMATION)

# The name-value pairs of the string to sign, in the byte-sort order AWS requires
# (sns-verify-signature-of-message.html, step "Create the string to sign").
_NOTIFICATION_FIELDS = (
    "Message",
    "MessageId",
    "Subject",
    "Timestamp",
    "TopicArn",
    "Type",
)
_CONFIRMATION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_OPTIONAL_FIELDS = frozenset({"Subject"})

# SHA1 is not our choice: SignatureVersion 1 is SNS's default until the topic's
# SignatureVersion attribute is set to 2 (SNS SetTopicAttributes reference).
_SIGNATURE_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "1": hashes.SHA1,
    "2": hashes.SHA256,
}

# Commercial and GovCloud regions (us-east-1, eu-central-2, us-gov-west-1...) are
# served from amazonaws.com; the China regions (cn-north-1, cn-northwest-1) from
# amazonaws.com.cn. ISO partitions use other domains and are not accepted.
_REGION = r"[a-z]{2}(?:-gov)?-[a-z]+-\d{1,2}"
_SNS_NETLOC = re.compile(
    rf"sns\.(?P<region>{_REGION})\.amazonaws\.com(?P<china>\.cn)?(?::443)?"
)
_PEM_PATH = re.compile(r"(?:/[A-Za-z0-9_.-]+)+\.pem")

# Envelope fields of a raw-delivered SES payload, told apart from a broken envelope
# so the error can say what to change on the subscription.
_SES_PAYLOAD_FIELDS = ("eventType", "notificationType", "mail")

_MAX_URL_LENGTH = 2048
_MAX_CERT_BYTES = 64 * 1024
DEFAULT_TIMEOUT = 5.0
DEFAULT_CACHE_SIZE = 32

Fetch = Callable[[str], bytes]


class SnsFetchError(CloudmailError, ConnectionError):
    """An SNS URL (signing certificate or SubscribeURL) could not be fetched.

    This is cloudmail's side failing (network, timeout, AWS answering 5xx), not the
    request: answer 500 so SNS delivers the message again later.
    """


def parse_sns_body(body: bytes) -> dict[str, Any]:
    """Parse the body of an SNS HTTP(S) delivery into its JSON envelope.

    Raises :class:`~cloudmail.errors.WebhookError` when the body is not a JSON
    object, has no ``Type``, carries an unknown ``Type``, or is an SES payload
    delivered raw (without the SNS envelope, so it cannot be authenticated).
    """
    try:
        data = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WebhookError(
            "The SNS request body is not UTF-8 JSON; SNS posts a JSON envelope with "
            "'Type', 'MessageId', 'TopicArn' and 'Signature'."
        ) from err
    if not isinstance(data, dict):
        raise WebhookError(
            f"The SNS request body is a JSON {type(data).__name__}, not an object."
        )

    if "Type" not in data:
        if any(field in data for field in _SES_PAYLOAD_FIELDS):
            raise WebhookError(
                "The SNS request body is an SES payload without the SNS envelope: "
                "raw message delivery is not supported; turn it off on the "
                "subscription."
            )
        raise WebhookError("The SNS request body has no 'Type' field.")

    message_type = data["Type"]
    if message_type not in MESSAGE_TYPES:
        raise WebhookError(
            f"The SNS message Type {message_type!r} is unknown; expected one of "
            f"{', '.join(MESSAGE_TYPES)}."
        )

    return data


def check_cert_url(url: object) -> str:
    """Return ``url`` if it is an SNS certificate URL, else refuse it.

    Accepted: ``https://sns.<region>.amazonaws.com/<name>.pem`` (and
    ``sns.cn-<region>.amazonaws.com.cn`` for the China regions), with no user
    information, no port but 443, no query, no fragment and no escaping. Raises
    :class:`~cloudmail.errors.WebhookVerificationError` naming the URL otherwise.
    """
    checked, parts = _checked_sns_url(url, "SigningCertURL")
    segments = parts.path.split("/")
    if parts.query or not _PEM_PATH.fullmatch(parts.path) or ".." in segments:
        raise WebhookVerificationError(
            f"SigningCertURL {checked!r} is not a path to a .pem file on Amazon SNS."
        )

    return checked


def check_subscribe_url(url: object) -> str:
    """Return ``url`` if it is an SNS ``ConfirmSubscription`` URL, else refuse it.

    The host is checked the same strict way as :func:`check_cert_url`.
    """
    checked, parts = _checked_sns_url(url, "SubscribeURL")
    query = urllib.parse.parse_qs(parts.query)
    if parts.path != "/" or query.get("Action") != ["ConfirmSubscription"]:
        raise WebhookVerificationError(
            f"SubscribeURL {checked.split('?', 1)[0]!r} is not an Amazon SNS "
            "ConfirmSubscription URL."
        )

    return checked


def string_to_sign(message: Mapping[str, Any]) -> str:
    """Return the string SNS signed for ``message``, as AWS documents it.

    Each field is its name, a newline, its value and a newline, in byte-sort order:
    ``Message, MessageId, Subject (if present), Timestamp, TopicArn, Type`` for a
    Notification; ``Message, MessageId, SubscribeURL, Timestamp, Token, TopicArn,
    Type`` for a SubscriptionConfirmation or UnsubscribeConfirmation.
    """
    message_type = message.get("Type")
    fields: tuple[str, ...]
    if message_type == NOTIFICATION:
        fields = _NOTIFICATION_FIELDS
    elif message_type in (SUBSCRIPTION_CONFIRMATION, UNSUBSCRIBE_CONFIRMATION):
        fields = _CONFIRMATION_FIELDS
    else:
        raise WebhookError(f"The SNS message Type {message_type!r} is unknown.")

    lines = []
    for field in fields:
        value = message.get(field)
        # A Notification published without a subject has no "Subject" key at all
        # (http-notification-json.html); some relays write it as null instead.
        if value is None and field in _OPTIONAL_FIELDS:
            continue
        if not isinstance(value, str):
            raise WebhookError(
                f"The SNS {message_type} has no string {field!r} field, so its "
                "signature cannot be checked."
            )
        lines.append(f"{field}\n{value}\n")
    return "".join(lines)


class SNSVerifier:
    """Authenticates SNS messages for a fixed set of topics.

    ``allowed_topic_arns`` are the topics cloudmail subscribed to; a message from any
    other topic is refused before anything is fetched, so a forged message cannot
    make cloudmail download arbitrary certificates. ``fetch_cert(url) -> bytes``
    returns a PEM certificate; the default uses :func:`urllib.request.urlopen` with
    ``timeout`` seconds and does not follow redirects. Certificates are kept in a
    bounded, thread-safe in-process cache of ``cache_size`` entries.
    """

    def __init__(
        self,
        allowed_topic_arns: Iterable[str],
        fetch_cert: Fetch | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if isinstance(allowed_topic_arns, str):
            allowed_topic_arns = [allowed_topic_arns]
        topics = frozenset(allowed_topic_arns)
        if not topics:
            raise ConfigurationError(
                "SNSVerifier needs at least one allowed topic ARN; list the ARN of "
                "every SNS topic cloudmail's endpoint is subscribed to."
            )
        for arn in topics:
            if (
                not isinstance(arn, str)
                or not arn.startswith("arn:")
                or ":sns:" not in arn
            ):
                raise ConfigurationError(
                    f"{arn!r} is not an SNS topic ARN "
                    "(arn:aws:sns:<region>:<account>:<name>)."
                )
        if timeout <= 0:
            raise ConfigurationError(
                f"SNSVerifier timeout {timeout!r} must be positive."
            )
        if cache_size < 1:
            raise ConfigurationError(
                f"SNSVerifier cache_size {cache_size!r} must be at least 1."
            )

        self.allowed_topic_arns = topics
        self.timeout = timeout
        self.cache_size = cache_size
        self._fetch_cert = fetch_cert or self._default_fetch
        self._certificates: OrderedDict[str, x509.Certificate] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, message: Mapping[str, Any]) -> None:
        """Raise unless ``message`` (a parsed envelope) is authentic.

        :class:`~cloudmail.errors.WebhookVerificationError` for a foreign topic, a
        spoofed certificate URL, an unsupported SignatureVersion or a bad signature;
        :class:`~cloudmail.errors.WebhookError` for a malformed envelope;
        :class:`SnsFetchError` when the certificate could not be downloaded.

        Known limitation: the envelope's ``Timestamp`` is not checked for age,
        because SNS redelivers a message with its original Timestamp under its retry
        policy; a captured message can therefore be replayed, and the caller must
        act on each ``MessageId`` only once.
        """
        if not isinstance(message, Mapping):
            raise WebhookError("The SNS message is not a JSON object.")

        # 1. The topic first: nothing is fetched on behalf of a topic we never chose.
        topic_arn = message.get("TopicArn")
        if not isinstance(topic_arn, str):
            raise WebhookError("The SNS message has no string 'TopicArn' field.")
        if topic_arn not in self.allowed_topic_arns:
            raise WebhookVerificationError(
                f"SNS topic {topic_arn[:256]!r} is not one of the allowed topic ARNs."
            )

        # 2. What is signed and how, before any network access.
        hash_algorithm = _hash_for(message.get("SignatureVersion"))
        signature = _decoded_signature(message.get("Signature"))
        signed = string_to_sign(message).encode("utf-8")

        # 3. The certificate, only from a genuine SNS URL.
        cert_url = check_cert_url(message.get("SigningCertURL"))
        public_key = self._public_key(cert_url)

        # 4. The signature itself.
        try:
            public_key.verify(signature, signed, padding.PKCS1v15(), hash_algorithm)
        except InvalidSignature as err:
            raise WebhookVerificationError(
                f"SNS message {str(message.get('MessageId'))[:64]!r} from topic "
                f"{topic_arn!r}: the signature does not match its content."
            ) from err

        logger.debug(
            "SNS message %s from topic %s: signature verified",
            message.get("MessageId"),
            topic_arn,
        )

    def confirm_subscription(
        self, message: Mapping[str, Any], fetch: Fetch | None = None
    ) -> None:
        """Verify a SubscriptionConfirmation, then visit its ``SubscribeURL``.

        ``fetch(url) -> bytes`` defaults to the same no-redirect ``urlopen`` as
        certificates. Raises like :meth:`verify`, and :class:`SnsFetchError` when
        SNS could not be reached (answer 500 so SNS sends the confirmation again).
        """
        if message.get("Type") != SUBSCRIPTION_CONFIRMATION:
            raise WebhookError(
                f"Only a {SUBSCRIPTION_CONFIRMATION} can be confirmed, not a "
                f"{message.get('Type')!r} message."
            )

        self.verify(message)
        subscribe_url = check_subscribe_url(message.get("SubscribeURL"))

        _fetch_checked(fetch or self._default_fetch, subscribe_url, "SubscribeURL")
        logger.info("SNS topic %s: subscription confirmed", message["TopicArn"])

    def _public_key(self, url: str) -> rsa.RSAPublicKey:
        certificate = self._cached(url)
        if certificate is None:
            pem = _fetch_checked(self._fetch_cert, url, "SigningCertURL")
            certificate = _load_certificate(pem, url)
            self._store(url, certificate)
            logger.info("SNS signing certificate %s: fetched and cached", url)

        now = dt.datetime.now(dt.UTC)
        if (
            not certificate.not_valid_before_utc
            <= now
            <= certificate.not_valid_after_utc
        ):
            raise WebhookVerificationError(
                f"SNS signing certificate {url!r} is not valid at "
                f"{now:%Y-%m-%dT%H:%M:%SZ}."
            )

        public_key = certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise WebhookVerificationError(
                f"SNS signing certificate {url!r} does not hold an RSA public key."
            )
        return public_key

    def _cached(self, url: str) -> x509.Certificate | None:
        with self._lock:
            certificate = self._certificates.get(url)
            if certificate is not None:
                self._certificates.move_to_end(url)
            return certificate

    def _store(self, url: str, certificate: x509.Certificate) -> None:
        with self._lock:
            self._certificates[url] = certificate
            self._certificates.move_to_end(url)
            while len(self._certificates) > self.cache_size:
                self._certificates.popitem(last=False)

    def _default_fetch(self, url: str) -> bytes:
        opener = urllib.request.build_opener(_RefuseRedirects)
        with opener.open(url, timeout=self.timeout) as response:
            data: bytes = response.read(_MAX_CERT_BYTES + 1)
        return data


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turns a redirect into an HTTPError: only the checked URL may be fetched."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _hash_for(version: object) -> hashes.HashAlgorithm:
    if not isinstance(version, str) or version not in _SIGNATURE_HASHES:
        raise WebhookVerificationError(
            f"SNS SignatureVersion {version!r} is not supported; expected '1' "
            "(SHA1withRSA) or '2' (SHA256withRSA)."
        )
    return _SIGNATURE_HASHES[version]()


def _decoded_signature(signature: object) -> bytes:
    if not isinstance(signature, str) or not signature:
        raise WebhookVerificationError("The SNS message has no 'Signature' field.")

    try:
        return base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as err:
        raise WebhookVerificationError(
            "The SNS message 'Signature' is not valid base64."
        ) from err


def _checked_sns_url(url: object, field: str) -> tuple[str, urllib.parse.SplitResult]:
    """Split ``url`` after refusing anything but ``https://sns.<region>.amazonaws.com``."""
    if not isinstance(url, str) or not url:
        raise WebhookVerificationError(
            f"The SNS message has no string {field!r} field."
        )

    # The query of a SubscribeURL holds the confirmation token: keep it out of
    # messages that end up in logs.
    shown = url.split("?", 1)[0][:100]

    # Parsers disagree about backslashes, whitespace and control characters
    # (WHATWG URL treats "\" as "/"), so a URL holding any of them is refused
    # rather than interpreted.
    if len(url) > _MAX_URL_LENGTH or not url.isascii() or not url.isprintable():
        raise WebhookVerificationError(f"{field} {shown!r} has forbidden characters.")
    if "\\" in url or " " in url:
        raise WebhookVerificationError(f"{field} {shown!r} has forbidden characters.")
    if not url.startswith("https://"):
        raise WebhookVerificationError(f"{field} {shown!r} does not use https.")

    parts = urllib.parse.urlsplit(url)
    # The whole netloc must be the SNS host: no "user@", no "%2e", no other port.
    host = _SNS_NETLOC.fullmatch(parts.netloc)
    if host is None:
        raise WebhookVerificationError(
            f"{field} {shown!r} is not on an Amazon SNS host "
            "(sns.<region>.amazonaws.com)."
        )
    if host["region"].startswith("cn-") != bool(host["china"]):
        raise WebhookVerificationError(
            f"{field} {shown!r} mixes a region and a domain that do not belong "
            "together (China regions use amazonaws.com.cn)."
        )
    if parts.fragment or "#" in url:
        raise WebhookVerificationError(f"{field} {shown!r} has a fragment.")

    return url, parts


def _fetch_checked(fetch: Fetch, url: str, field: str) -> bytes:
    """Call ``fetch`` and sort its failures into refusals and retryable errors."""
    shown = url.split("?", 1)[0]  # a SubscribeURL's query holds its token
    try:
        data = fetch(url)
    except urllib.error.HTTPError as err:
        # The error holds the open response; release the connection now.
        err.close()
        if 400 <= err.code < 500:
            # SNS itself refused the URL (unknown certificate, expired token):
            # asking again cannot help, so this is a refusal, not a retry.
            raise WebhookVerificationError(
                f"{field} {shown!r} answered HTTP {err.code}."
            ) from err
        raise SnsFetchError(f"{field} {shown!r} answered HTTP {err.code}.") from err
    except OSError as err:
        raise SnsFetchError(f"{field} {shown!r} could not be fetched: {err}.") from err

    if len(data) > _MAX_CERT_BYTES:
        raise WebhookVerificationError(
            f"{field} {shown!r} returned more than {_MAX_CERT_BYTES} bytes."
        )
    return data


def _load_certificate(pem: bytes, url: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise WebhookVerificationError(
            f"SNS signing certificate {url!r} is not a PEM X.509 certificate."
        ) from err
