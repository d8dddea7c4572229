from __future__ import annotations

import base64
import datetime as dt
import json
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from cloudmail.errors import ConfigurationError, WebhookError, WebhookVerificationError
from cloudmail.webhooks.sns import (
    SnsFetchError,
    SNSVerifier,
    check_cert_url,
    check_subscribe_url,
    parse_sns_body,
    string_to_sign,
)

TOPIC = "arn:aws:sns:us-east-1:123456789012:cloudmail-events"
FOREIGN_TOPIC = "arn:aws:sns:us-east-1:999999999999:someone-else"
CERT_URL = (
    "https://sns.us-east-1.amazonaws.com/"
    "SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem"
)
OTHER_CERT_URL = (
    "https://sns.eu-west-1.amazonaws.com/"
    "SimpleNotificationService-01d088a6f77103d0fe307c0069e40ed6.pem"
)
SUBSCRIBE_URL = (
    "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
    f"&TopicArn={TOPIC}&Token=2336412f37fb687f5d51e6e241d164b05333"
)
SES_PAYLOAD = json.dumps(
    {
        "eventType": "Delivery",
        "mail": {
            "timestamp": "2016-10-19T23:20:52.240Z",
            "messageId": "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000",
            "destination": ["recipient@example.com"],
        },
        "delivery": {"timestamp": "2016-10-19T23:21:04.133Z"},
    },
    indent=2,
)


# --- A fake SNS: our own key and certificate, signing exactly as AWS documents ---


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_cert_pem(
    private_key: rsa.RSAPrivateKey,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .sign(private_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def cert_pem(key: rsa.RSAPrivateKey) -> bytes:
    return make_cert_pem(key)


class FakeFetch:
    """Records every URL asked for and answers with a fixed body."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.calls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        return self.body


@pytest.fixture
def fetch(cert_pem: bytes) -> FakeFetch:
    return FakeFetch(cert_pem)


@pytest.fixture
def verifier(fetch: FakeFetch) -> SNSVerifier:
    return SNSVerifier([TOPIC], fetch_cert=fetch)


def sns_string_to_sign(message: dict[str, Any]) -> bytes:
    """Written from AWS's sns-verify-signature-of-message page, apart from the code."""
    if message["Type"] == "Notification":
        names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        names = [
            "Message",
            "MessageId",
            "SubscribeURL",
            "Timestamp",
            "Token",
            "TopicArn",
            "Type",
        ]
    text = "".join(f"{n}\n{message[n]}\n" for n in names if n in message)
    return text.encode("utf-8")


def sns_sign(
    message: dict[str, Any], private_key: rsa.RSAPrivateKey, version: str = "1"
) -> dict[str, Any]:
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = private_key.sign(
        sns_string_to_sign(message), padding.PKCS1v15(), algorithm
    )
    return {
        **message,
        "SignatureVersion": version,
        "Signature": base64.b64encode(signature).decode(),
        "SigningCertURL": message.get("SigningCertURL", CERT_URL),
    }


def notification(
    subject: str | None = "Amazon SES Email Event Notification",
) -> dict[str, Any]:
    message = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC,
        "Message": SES_PAYLOAD,
        "Timestamp": "2016-10-19T23:21:04.300Z",
        "UnsubscribeURL": (
            "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe"
            f"&SubscriptionArn={TOPIC}:c9135db0-26c4-47ec-8998-413945fb5a96"
        ),
    }
    if subject is not None:
        message["Subject"] = subject
    return message


def confirmation(message_type: str = "SubscriptionConfirmation") -> dict[str, Any]:
    return {
        "Type": message_type,
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37fb687f5d51e6e241d164b05333",
        "TopicArn": TOPIC,
        "Message": (
            f"You have chosen to subscribe to the topic {TOPIC}.\n"
            "To confirm the subscription, visit the SubscribeURL included in this "
            "message."
        ),
        "SubscribeURL": SUBSCRIBE_URL,
        "Timestamp": "2012-04-26T20:45:04.751Z",
    }


# --- string_to_sign ---


def test_string_to_sign_for_aws_documented_notification() -> None:
    message = {
        "Type": "Notification",
        "MessageId": "4d4dc071-ddbf-465d-bba8-08f81c89da64",
        "TopicArn": "arn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P",
        "Subject": "My subject",
        "Message": "My Test Message",
        "Timestamp": "2019-01-31T04:37:04.321Z",
        "SignatureVersion": "1",
    }

    assert string_to_sign(message) == (
        "Message\nMy Test Message\n"
        "MessageId\n4d4dc071-ddbf-465d-bba8-08f81c89da64\n"
        "Subject\nMy subject\n"
        "Timestamp\n2019-01-31T04:37:04.321Z\n"
        "TopicArn\narn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P\n"
        "Type\nNotification\n"
    )


def test_string_to_sign_for_notification_without_subject() -> None:
    message = notification(subject=None)

    assert "Subject" not in string_to_sign(message)
    assert string_to_sign({**message, "Subject": None}) == string_to_sign(message)


@pytest.mark.parametrize(
    "message_type", ["SubscriptionConfirmation", "UnsubscribeConfirmation"]
)
def test_string_to_sign_for_confirmations(message_type: str) -> None:
    message = confirmation(message_type)

    assert string_to_sign(message) == (
        f"Message\n{message['Message']}\n"
        "MessageId\n165545c9-2a5c-472c-8df2-7ff2be2b3b1b\n"
        f"SubscribeURL\n{SUBSCRIBE_URL}\n"
        "Timestamp\n2012-04-26T20:45:04.751Z\n"
        "Token\n2336412f37fb687f5d51e6e241d164b05333\n"
        f"TopicArn\n{TOPIC}\n"
        f"Type\n{message_type}\n"
    )


def test_string_to_sign_refuses_a_missing_field() -> None:
    message = confirmation()
    del message["Token"]

    with pytest.raises(WebhookError) as excinfo:
        string_to_sign(message)

    assert str(excinfo.value) == (
        "The SNS SubscriptionConfirmation has no string 'Token' field, so its "
        "signature cannot be checked."
    )


# --- valid messages ---


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize(
    "message_factory",
    [
        lambda: notification(),
        lambda: notification(subject=None),
        lambda: confirmation("SubscriptionConfirmation"),
        lambda: confirmation("UnsubscribeConfirmation"),
    ],
    ids=["notification", "notification-no-subject", "subscribe", "unsubscribe"],
)
def test_valid_messages_are_accepted(
    version: str,
    message_factory: Callable[[], dict[str, Any]],
    key: rsa.RSAPrivateKey,
    verifier: SNSVerifier,
    fetch: FakeFetch,
) -> None:
    message = sns_sign(message_factory(), key, version)

    verifier.verify(message)  # raises on any failure
    assert fetch.calls == [CERT_URL]


def test_valid_message_parsed_from_the_http_body(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    body = json.dumps(sns_sign(notification(), key, "2")).encode()

    message = parse_sns_body(body)
    verifier.verify(message)

    assert json.loads(message["Message"])["eventType"] == "Delivery"


# --- tampering ---


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("Message", SES_PAYLOAD.replace("Delivery", "Bounce")),
        ("Subject", "Something else"),
        ("Timestamp", "2016-10-19T23:21:05.300Z"),
        ("MessageId", "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf325"),
        ("Type", "SubscriptionConfirmation"),
    ],
)
@pytest.mark.parametrize("version", ["1", "2"])
def test_changed_notification_is_refused(
    field: str, value: str, version: str, key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    message = sns_sign(notification(), key, version)
    message[field] = value
    if field == "Type":
        message.update(Token="x", SubscribeURL=SUBSCRIBE_URL)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verifier.verify(message)

    assert str(excinfo.value) == (
        f"SNS message {message['MessageId']!r} from topic {TOPIC!r}: the signature "
        "does not match its content."
    )


def test_added_or_removed_subject_is_refused(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    without = sns_sign(notification(subject=None), key)
    with_subject = sns_sign(notification(), key)

    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verifier.verify({**without, "Subject": "Injected"})
    del with_subject["Subject"]
    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verifier.verify(with_subject)


@pytest.mark.parametrize("field", ["SubscribeURL", "Token", "Message"])
def test_changed_confirmation_is_refused(
    field: str, key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    message = sns_sign(confirmation(), key, "2")
    message[field] = message[field] + "0"

    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verifier.verify(message)


def test_message_signed_by_another_key_is_refused(verifier: SNSVerifier) -> None:
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = sns_sign(notification(), impostor, "2")

    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verifier.verify(message)


def test_signature_that_is_not_base64_is_refused(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    message = {**sns_sign(notification(), key), "Signature": "not base64!"}

    with pytest.raises(WebhookVerificationError) as excinfo:
        verifier.verify(message)

    assert str(excinfo.value) == "The SNS message 'Signature' is not valid base64."
    assert fetch.calls == []


# --- the topic allow-list comes first ---


def test_foreign_topic_with_valid_signature_is_refused_without_fetching(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    message = sns_sign({**notification(), "TopicArn": FOREIGN_TOPIC}, key)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verifier.verify(message)

    assert str(excinfo.value) == (
        f"SNS topic {FOREIGN_TOPIC!r} is not one of the allowed topic ARNs."
    )
    assert fetch.calls == []


def test_foreign_topic_with_spoofed_cert_url_never_fetches(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    message = sns_sign(
        {
            **notification(),
            "TopicArn": FOREIGN_TOPIC,
            "SigningCertURL": "https://evil.example/cert.pem",
        },
        key,
    )

    with pytest.raises(WebhookVerificationError, match="not one of the allowed topic"):
        verifier.verify(message)
    assert fetch.calls == []


def test_missing_topic_is_malformed(verifier: SNSVerifier) -> None:
    message = notification()
    del message["TopicArn"]

    with pytest.raises(WebhookError) as excinfo:
        verifier.verify(message)

    assert str(excinfo.value) == "The SNS message has no string 'TopicArn' field."


# --- certificate URL checks ---

SPOOFED_CERT_URLS = [
    "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
    "HTTPS://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
    "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-abc.pem",
    "https://evil.com/sns.us-east-1.amazonaws.com/x.pem",
    "https://s3.amazonaws.com/bucket/x.pem",
    "https://sns.us-east-1.amazonaws.com@evil.com/x.pem",
    "https://user@sns.us-east-1.amazonaws.com/x.pem",
    "https://user:pw@sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com:8443/x.pem",
    "https://sns.us-east-1.amazonaws.com:/x.pem",
    "https://sns.us-east-1.amazonaws.com\\@evil.com/x.pem",
    "https://sns.us-east-1.amazonaws.com\\.evil.com/x.pem",
    "https://sns.us-east-1.amazonaws%2ecom/x.pem",
    "https://sns%2eus-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com%40evil.com/x.pem",
    "https://sns.us-east-1.amazonaws.com./x.pem",
    "https://SNS.US-EAST-1.AMAZONAWS.COM/x.pem",
    "https://sns.us-east-1.amazonaws.com/x.pem?.pem",
    "https://sns.us-east-1.amazonaws.com/x.pem#.pem",
    "https://sns.us-east-1.amazonaws.com/x.txt",
    "https://sns.us-east-1.amazonaws.com/",
    "https://sns.us-east-1.amazonaws.com/../x.pem",
    "https://sns.us-east-1.amazonaws.com/x%2Epem",
    "https://sns.evil.amazonaws.com/x.pem",
    "https://sns.amazonaws.com/x.pem",
    "https://sqs.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com.cn/x.pem",
    "https://sns.cn-north-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com/x.pem ",
    " https://sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com/x\n.pem",
    "https://sns.us-east-1.\u0430mazonaws.com/x.pem",  # Cyrillic a
    "https://[::1]/x.pem",
    "//sns.us-east-1.amazonaws.com/x.pem",
    "file:///etc/ssl/x.pem",
    "",
]


@pytest.mark.parametrize("url", SPOOFED_CERT_URLS)
def test_spoofed_cert_url_is_refused(url: str) -> None:
    with pytest.raises(WebhookVerificationError):
        check_cert_url(url)


@pytest.mark.parametrize("url", SPOOFED_CERT_URLS[:6])
def test_spoofed_cert_url_in_a_signed_message_is_refused_without_fetching(
    url: str, key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    message = sns_sign({**notification(), "SigningCertURL": url}, key)

    with pytest.raises(WebhookVerificationError):
        verifier.verify(message)
    assert fetch.calls == []


def test_cert_url_messages_name_the_url() -> None:
    with pytest.raises(WebhookVerificationError) as excinfo:
        check_cert_url("https://s3.amazonaws.com/bucket/x.pem")

    assert str(excinfo.value) == (
        "SigningCertURL 'https://s3.amazonaws.com/bucket/x.pem' is not on an Amazon "
        "SNS host (sns.<region>.amazonaws.com)."
    )


def test_missing_cert_url_is_refused(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    message = sns_sign(notification(), key)
    del message["SigningCertURL"]

    with pytest.raises(WebhookVerificationError) as excinfo:
        verifier.verify(message)

    assert str(excinfo.value) == "The SNS message has no string 'SigningCertURL' field."


@pytest.mark.parametrize(
    "url",
    [
        CERT_URL,
        OTHER_CERT_URL,
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.ap-southeast-2.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
        "https://sns.us-east-1.amazonaws.com:443/SimpleNotificationService-abc.pem",
    ],
)
def test_genuine_cert_urls_are_accepted(url: str) -> None:
    assert check_cert_url(url) == url


# --- signature versions ---


@pytest.mark.parametrize("version", ["3", "0", "", None, 1, "1 ", "SHA256"])
def test_unknown_signature_version_is_refused(
    version: object, key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    message = {**sns_sign(notification(), key, "2"), "SignatureVersion": version}

    with pytest.raises(WebhookVerificationError) as excinfo:
        verifier.verify(message)

    assert str(excinfo.value) == (
        f"SNS SignatureVersion {version!r} is not supported; expected '1' "
        "(SHA1withRSA) or '2' (SHA256withRSA)."
    )
    assert fetch.calls == []


def test_version_1_signature_relabelled_as_version_2_is_refused(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    message = {**sns_sign(notification(), key, "1"), "SignatureVersion": "2"}

    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verifier.verify(message)


# --- parse_sns_body ---


def test_raw_message_delivery_body_is_refused_with_the_reason() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_sns_body(SES_PAYLOAD.encode())

    assert str(excinfo.value) == (
        "The SNS request body is an SES payload without the SNS envelope: raw "
        "message delivery is not supported; turn it off on the subscription."
    )


def test_non_json_body_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_sns_body(b"Action=Publish&Message=hello")

    assert str(excinfo.value) == (
        "The SNS request body is not UTF-8 JSON; SNS posts a JSON envelope with "
        "'Type', 'MessageId', 'TopicArn' and 'Signature'."
    )
    with pytest.raises(WebhookError, match="not UTF-8 JSON"):
        parse_sns_body(b"\xff\xfe{}")


def test_json_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_sns_body(b"[1, 2]")

    assert str(excinfo.value) == "The SNS request body is a JSON list, not an object."


def test_body_without_type_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_sns_body(b'{"MessageId": "x"}')

    assert str(excinfo.value) == "The SNS request body has no 'Type' field."


def test_body_with_unknown_type_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_sns_body(b'{"Type": "Gossip"}')

    assert str(excinfo.value) == (
        "The SNS message Type 'Gossip' is unknown; expected one of Notification, "
        "SubscriptionConfirmation, UnsubscribeConfirmation."
    )


def test_webhook_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_sns_body(b"nope")


# --- certificate fetching and caching ---


def test_cert_is_cached_between_messages(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    first = sns_sign(notification(), key, "1")
    second = sns_sign({**notification(), "MessageId": "another-id"}, key, "2")

    verifier.verify(first)
    verifier.verify(second)

    assert fetch.calls == [CERT_URL]


def test_cert_cache_is_bounded(key: rsa.RSAPrivateKey, fetch: FakeFetch) -> None:
    verifier = SNSVerifier([TOPIC], fetch_cert=fetch, cache_size=1)
    at_first = sns_sign(notification(), key)
    at_other = sns_sign({**notification(), "SigningCertURL": OTHER_CERT_URL}, key)

    for message in (at_first, at_first, at_other, at_first):
        verifier.verify(message)

    assert fetch.calls == [CERT_URL, OTHER_CERT_URL, CERT_URL]


def test_cert_cache_is_shared_across_threads(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    messages = [
        sns_sign({**notification(), "MessageId": f"id-{n}"}, key, "2")
        for n in range(24)
    ]
    verifier.verify(messages[0])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(verifier.verify, messages))

    assert results == [None] * 24
    assert fetch.calls == [CERT_URL]


def test_cert_not_found_is_refused(key: rsa.RSAPrivateKey) -> None:
    def not_found(url: str) -> bytes:
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]

    verifier = SNSVerifier([TOPIC], fetch_cert=not_found)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verifier.verify(sns_sign(notification(), key))

    assert str(excinfo.value) == f"SigningCertURL {CERT_URL!r} answered HTTP 404."


def test_cert_fetch_failure_is_retryable(key: rsa.RSAPrivateKey) -> None:
    def unreachable(url: str) -> bytes:
        raise urllib.error.URLError("timed out")

    verifier = SNSVerifier([TOPIC], fetch_cert=unreachable)

    with pytest.raises(SnsFetchError) as excinfo:
        verifier.verify(sns_sign(notification(), key))

    assert str(excinfo.value) == (
        f"SigningCertURL {CERT_URL!r} could not be fetched: <urlopen error timed out>."
    )
    assert not isinstance(excinfo.value, (WebhookError, WebhookVerificationError))


def test_cert_server_error_is_retryable(key: rsa.RSAPrivateKey) -> None:
    def server_error(url: str) -> bytes:
        raise urllib.error.HTTPError(url, 503, "Unavailable", None, None)  # type: ignore[arg-type]

    verifier = SNSVerifier([TOPIC], fetch_cert=server_error)

    with pytest.raises(SnsFetchError, match="answered HTTP 503"):
        verifier.verify(sns_sign(notification(), key))


def test_failed_fetch_is_not_cached(key: rsa.RSAPrivateKey, cert_pem: bytes) -> None:
    answers: list[bytes | Exception] = [urllib.error.URLError("down"), cert_pem]
    calls: list[str] = []

    def flaky(url: str) -> bytes:
        calls.append(url)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    verifier = SNSVerifier([TOPIC], fetch_cert=flaky)
    message = sns_sign(notification(), key)

    with pytest.raises(SnsFetchError):
        verifier.verify(message)
    verifier.verify(message)

    assert calls == [CERT_URL, CERT_URL]


def test_non_pem_cert_is_refused(key: rsa.RSAPrivateKey) -> None:
    verifier = SNSVerifier([TOPIC], fetch_cert=FakeFetch(b"<html>Access denied</html>"))

    with pytest.raises(WebhookVerificationError) as excinfo:
        verifier.verify(sns_sign(notification(), key))

    assert str(excinfo.value) == (
        f"SNS signing certificate {CERT_URL!r} is not a PEM X.509 certificate."
    )


def test_oversized_cert_is_refused(key: rsa.RSAPrivateKey) -> None:
    verifier = SNSVerifier([TOPIC], fetch_cert=FakeFetch(b"A" * (64 * 1024 + 1)))

    with pytest.raises(
        WebhookVerificationError, match="returned more than 65536 bytes"
    ):
        verifier.verify(sns_sign(notification(), key))


def test_expired_cert_is_refused(key: rsa.RSAPrivateKey) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = make_cert_pem(
        key,
        not_before=now - dt.timedelta(days=60),
        not_after=now - dt.timedelta(days=1),
    )
    verifier = SNSVerifier([TOPIC], fetch_cert=FakeFetch(expired))

    with pytest.raises(WebhookVerificationError, match="is not valid at"):
        verifier.verify(sns_sign(notification(), key))


# --- subscription confirmation ---


def test_confirm_subscription_visits_subscribe_url_after_verifying(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    visit = FakeFetch(b"<ConfirmSubscriptionResponse/>")

    verifier.confirm_subscription(sns_sign(confirmation(), key, "2"), fetch=visit)

    assert fetch.calls == [CERT_URL]
    assert visit.calls == [SUBSCRIBE_URL]


def test_confirm_subscription_refuses_a_forgery_without_visiting(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    visit = FakeFetch(b"")
    message = sns_sign(confirmation(), key, "2")
    message["SubscribeURL"] = SUBSCRIBE_URL.replace("Token=", "Token=forged")

    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verifier.confirm_subscription(message, fetch=visit)
    assert visit.calls == []


def test_confirm_subscription_refuses_a_foreign_topic_without_fetching(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier, fetch: FakeFetch
) -> None:
    visit = FakeFetch(b"")
    message = sns_sign({**confirmation(), "TopicArn": FOREIGN_TOPIC}, key, "2")

    with pytest.raises(WebhookVerificationError, match="not one of the allowed topic"):
        verifier.confirm_subscription(message, fetch=visit)
    assert fetch.calls == []
    assert visit.calls == []


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/?Action=ConfirmSubscription&Token=x",
        "http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=x",
        "https://sns.us-east-1.amazonaws.com.evil.com/?Action=ConfirmSubscription",
        "https://sns.us-east-1.amazonaws.com@evil.com/?Action=ConfirmSubscription",
        "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
        "https://sns.us-east-1.amazonaws.com/redirect?Action=ConfirmSubscription",
    ],
)
def test_confirm_subscription_refuses_a_signed_but_foreign_subscribe_url(
    url: str, key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    visit = FakeFetch(b"")
    message = sns_sign({**confirmation(), "SubscribeURL": url}, key, "2")

    with pytest.raises(WebhookVerificationError, match="SubscribeURL"):
        verifier.confirm_subscription(message, fetch=visit)
    assert visit.calls == []


def test_confirm_subscription_refuses_other_message_types(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    visit = FakeFetch(b"")

    with pytest.raises(WebhookError) as excinfo:
        verifier.confirm_subscription(sns_sign(notification(), key), fetch=visit)

    assert str(excinfo.value) == (
        "Only a SubscriptionConfirmation can be confirmed, not a 'Notification' "
        "message."
    )
    assert visit.calls == []


def test_check_subscribe_url_accepts_the_documented_form() -> None:
    assert check_subscribe_url(SUBSCRIBE_URL) == SUBSCRIBE_URL


# --- configuration ---


def test_verifier_needs_topics() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        SNSVerifier([])

    assert str(excinfo.value) == (
        "SNSVerifier needs at least one allowed topic ARN; list the ARN of every SNS "
        "topic cloudmail's endpoint is subscribed to."
    )


def test_verifier_refuses_a_value_that_is_not_a_topic_arn() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        SNSVerifier(["cloudmail-events"])

    assert str(excinfo.value) == (
        "'cloudmail-events' is not an SNS topic ARN "
        "(arn:aws:sns:<region>:<account>:<name>)."
    )


def test_verifier_accepts_a_single_arn_string(
    key: rsa.RSAPrivateKey, fetch: FakeFetch
) -> None:
    verifier = SNSVerifier(TOPIC, fetch_cert=fetch)

    verifier.verify(sns_sign(notification(), key))

    assert verifier.allowed_topic_arns == frozenset({TOPIC})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": 0}, "SNSVerifier timeout 0 must be positive."),
        ({"cache_size": 0}, "SNSVerifier cache_size 0 must be at least 1."),
    ],
)
def test_verifier_refuses_bad_limits(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        SNSVerifier([TOPIC], **kwargs)

    assert str(excinfo.value) == message


# --- the default fetcher ---


def test_default_fetcher_does_not_follow_redirects() -> None:
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/elsewhere.pem")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        verifier = SNSVerifier([TOPIC], timeout=2.0)
        url = f"http://127.0.0.1:{server.server_port}/cert.pem"
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            verifier._default_fetch(url)
    finally:
        server.shutdown()
        server.server_close()

    excinfo.value.close()
    assert excinfo.value.code == 302


def test_subscribe_url_failures_keep_the_token_out_of_messages(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    def unreachable(url: str) -> bytes:
        raise urllib.error.URLError("timed out")

    with pytest.raises(SnsFetchError) as excinfo:
        verifier.confirm_subscription(
            sns_sign(confirmation(), key, "2"), fetch=unreachable
        )

    assert str(excinfo.value) == (
        "SubscribeURL 'https://sns.us-east-1.amazonaws.com/' could not be fetched: "
        "<urlopen error timed out>."
    )


def test_subscribe_url_refused_by_sns_is_a_refusal(
    key: rsa.RSAPrivateKey, verifier: SNSVerifier
) -> None:
    def expired(url: str) -> bytes:
        raise urllib.error.HTTPError(url, 403, "Forbidden", None, None)  # type: ignore[arg-type]

    with pytest.raises(WebhookVerificationError) as excinfo:
        verifier.confirm_subscription(sns_sign(confirmation(), key, "2"), fetch=expired)

    assert str(excinfo.value) == (
        "SubscribeURL 'https://sns.us-east-1.amazonaws.com/' answered HTTP 403."
    )
