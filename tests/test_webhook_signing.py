from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from cloudmail.errors import ConfigurationError, WebhookVerificationError
from cloudmail.webhooks.signing import (
    generate_secret,
    sign,
    sign_headers,
    verify,
)

NOW = 1_700_000_000
BODY = b'{"v":1,"id":"rep_3f1c","results":[]}'
# Key bytes b"cloudmail-test-key-0123456789abc" (32 bytes), written as a secret.
SECRET = "whsec_" + base64.b64encode(b"cloudmail-test-key-0123456789abc").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-test-key-0123456789abcde").decode()


def test_generate_secret_is_whsec_and_32_random_bytes() -> None:
    first, second = generate_secret(), generate_secret()

    assert first.startswith("whsec_")
    assert len(base64.b64decode(first[len("whsec_") :], validate=True)) == 32
    assert first != second


def test_sign_matches_the_standard_webhooks_definition() -> None:
    key = b"cloudmail-test-key-0123456789abc"
    content = b"rep_1." + str(NOW).encode() + b"." + BODY
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())

    assert sign(SECRET, "rep_1", NOW, BODY) == "v1," + expected.decode()


def test_sign_matches_the_standard_webhooks_reference_vector() -> None:
    # Test vector from the Standard Webhooks reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'

    signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)

    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_sign_refuses_a_malformed_secret_without_echoing_it() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        sign("not-a-secret", "rep_1", NOW, BODY)

    assert "not-a-secret" not in str(excinfo.value)
    assert str(excinfo.value) == (
        "The webhook secret is not 'whsec_' followed by base64; "
        "create one with cloudmail.webhooks.signing.generate_secret()."
    )


def test_sign_headers_gives_the_three_headers() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    assert headers == {
        "webhook-id": "rep_1",
        "webhook-timestamp": str(NOW),
        "webhook-signature": sign(SECRET, "rep_1", NOW, BODY),
    }


def test_sign_headers_defaults_id_and_timestamp() -> None:
    headers = sign_headers(SECRET, BODY)

    assert headers["webhook-id"].startswith("msg_")
    assert headers["webhook-timestamp"].isdigit()
    assert verify([SECRET], headers, BODY) == headers["webhook-id"]


def test_valid_request_returns_the_webhook_id() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    assert verify([SECRET], headers, BODY, now=NOW) == "rep_1"


def test_header_lookup_is_case_insensitive() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)
    shouted = {name.upper(): value for name, value in headers.items()}
    mixed = {name.title(): value for name, value in headers.items()}

    assert verify([SECRET], shouted, BODY, now=NOW) == "rep_1"
    assert verify([SECRET], mixed, BODY, now=NOW) == "rep_1"


def test_wrong_secret_is_refused() -> None:
    headers = sign_headers(OTHER_SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verify([SECRET], headers, BODY, now=NOW)

    assert str(excinfo.value) == (
        "Webhook 'rep_1': no 'v1' signature in the 'webhook-signature' header "
        "matches any configured secret."
    )


def test_changed_body_is_refused() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    with pytest.raises(WebhookVerificationError, match="no 'v1' signature"):
        verify([SECRET], headers, BODY + b" ", now=NOW)


def test_changed_id_or_timestamp_is_refused() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    with pytest.raises(WebhookVerificationError, match="no 'v1' signature"):
        verify([SECRET], {**headers, "webhook-id": "rep_2"}, BODY, now=NOW)
    with pytest.raises(WebhookVerificationError, match="no 'v1' signature"):
        verify([SECRET], {**headers, "webhook-timestamp": str(NOW + 1)}, BODY, now=NOW)


def test_old_timestamp_is_refused() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW - 301)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verify([SECRET], headers, BODY, now=NOW)

    assert str(excinfo.value) == (
        f"The 'webhook-timestamp' header {NOW - 301} is too old: more than 300 "
        f"seconds before the receiver's clock ({NOW})."
    )


def test_future_timestamp_is_refused() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW + 301)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verify([SECRET], headers, BODY, now=NOW)

    assert str(excinfo.value) == (
        f"The 'webhook-timestamp' header {NOW + 301} is too new: more than 300 "
        f"seconds after the receiver's clock ({NOW})."
    )


def test_timestamps_at_the_tolerance_edge_are_accepted() -> None:
    for timestamp in (NOW - 300, NOW + 300):
        headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=timestamp)
        assert verify([SECRET], headers, BODY, now=NOW) == "rep_1"


def test_custom_tolerance() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW - 20)

    with pytest.raises(WebhookVerificationError, match="too old: more than 10 seconds"):
        verify([SECRET], headers, BODY, now=NOW, tolerance=10)


def test_non_numeric_timestamp_is_refused() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    for bad in ("1700000000.5", "-1700000000", "soon", "\u0661\u0667\u0660\u0660"):
        with pytest.raises(WebhookVerificationError) as excinfo:
            verify([SECRET], {**headers, "webhook-timestamp": bad}, BODY, now=NOW)
        assert str(excinfo.value) == (
            f"The 'webhook-timestamp' header {bad!r} is not whole Unix seconds."
        )


def test_rotated_secrets_accept_old_and_new() -> None:
    old = sign_headers(OTHER_SECRET, BODY, msg_id="rep_old", timestamp=NOW)
    new = sign_headers(SECRET, BODY, msg_id="rep_new", timestamp=NOW)

    assert verify([SECRET, OTHER_SECRET], old, BODY, now=NOW) == "rep_old"
    assert verify([SECRET, OTHER_SECRET], new, BODY, now=NOW) == "rep_new"


def test_message_signed_with_several_secrets() -> None:
    headers = sign_headers([OTHER_SECRET, SECRET], BODY, msg_id="rep_1", timestamp=NOW)
    signatures = headers["webhook-signature"].split(" ")

    assert signatures == [
        sign(OTHER_SECRET, "rep_1", NOW, BODY),
        sign(SECRET, "rep_1", NOW, BODY),
    ]
    assert verify([SECRET], headers, BODY, now=NOW) == "rep_1"
    assert verify([OTHER_SECRET], headers, BODY, now=NOW) == "rep_1"


def test_unknown_signature_versions_and_garbage_are_skipped() -> None:
    good = sign(SECRET, "rep_1", NOW, BODY)
    headers = {
        "webhook-id": "rep_1",
        "webhook-timestamp": str(NOW),
        "webhook-signature": f"v1a,abc v2,{good[3:]} v1,!!!notbase64 v1, {good}",
    }

    assert verify([SECRET], headers, BODY, now=NOW) == "rep_1"
    headers["webhook-signature"] = f"v2,{good[3:]} v1a,{good[3:]}"
    with pytest.raises(WebhookVerificationError, match="no 'v1' signature"):
        verify([SECRET], headers, BODY, now=NOW)


@pytest.mark.parametrize(
    "missing", ["webhook-id", "webhook-timestamp", "webhook-signature"]
)
def test_missing_header_is_refused(missing: str) -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)
    del headers[missing]

    with pytest.raises(WebhookVerificationError) as excinfo:
        verify([SECRET], headers, BODY, now=NOW)

    assert str(excinfo.value) == f"The {missing!r} header is missing or empty."


def test_empty_header_is_refused() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verify([SECRET], {**headers, "webhook-signature": "  "}, BODY, now=NOW)

    assert str(excinfo.value) == "The 'webhook-signature' header is missing or empty."


@pytest.mark.parametrize(
    "bad_secret",
    ["", "whsec_", "whsec_***", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_abc"],
)
def test_malformed_secret_is_refused(bad_secret: str) -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verify([SECRET, bad_secret], headers, BODY, now=NOW)

    assert str(excinfo.value) == (
        "Webhook secret number 2 of 2 is malformed: it must be 'whsec_' followed "
        "by base64."
    )


def test_no_secret_configured_is_refused() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    with pytest.raises(WebhookVerificationError) as excinfo:
        verify([], headers, BODY, now=NOW)

    assert str(excinfo.value) == (
        "No webhook secret is configured, so no request can be authenticated."
    )


def test_a_lone_secret_string_is_not_split_into_characters() -> None:
    headers = sign_headers(SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    assert verify(SECRET, headers, BODY, now=NOW) == "rep_1"


def test_verification_errors_are_permission_errors() -> None:
    headers = sign_headers(OTHER_SECRET, BODY, msg_id="rep_1", timestamp=NOW)

    with pytest.raises(PermissionError):
        verify([SECRET], headers, BODY, now=NOW)
