"""``POST /cloudmail/callback/ses``: SNS deliveries of SES events, end to end.

SNS messages are signed here with our own RSA key and a self-signed certificate; the
app downloads "SNS's" certificate through ``CLOUDMAIL_SNS_FETCH``, which answers with
ours. URL checks run before that fetch, so every spoofed URL is refused unchanged.
The helpers and fixtures below are shared with test_tracking.py,
test_suppressions.py and test_events_replay.py.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from flask import Flask

from cloudmail import manager, tracking
from cloudmail.extension import get_state
from cloudmail.models import Batch, Event, Job, Recipient, Suppression
from cloudmail.webhooks.signing import generate_secret, sign_headers
from test_sns_verify import make_cert_pem, sns_string_to_sign

TOPIC = "arn:aws:sns:eu-west-1:123456789012:cloudmail-ses-events"
FOREIGN_TOPIC = "arn:aws:sns:eu-west-1:999999999999:someone-else"
CERT_URL = (
    "https://sns.eu-west-1.amazonaws.com/"
    "SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem"
)
SUBSCRIBE_URL = (
    "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription"
    f"&TopicArn={TOPIC}&Token=2336412f37fb687f5d51e6e241d164b05333"
)
SECRET = generate_secret()
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CERT_PEM = make_cert_pem(KEY)
URL = "/cloudmail/callback/ses"


class FakeSns:
    """Answers certificate URLs with our certificate; records every URL fetched."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: Exception | None = None

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        if self.fail is not None:
            raise self.fail
        if url.endswith(".pem"):
            return CERT_PEM
        return b"<ConfirmSubscriptionResponse/>"


@pytest.fixture
def fetch() -> FakeSns:
    return FakeSns()


@pytest.fixture
def app_config(fetch: FakeSns) -> dict[str, object]:
    return {
        "CLOUDMAIL_SNS_TOPIC_ARNS": [TOPIC],
        "CLOUDMAIL_SNS_FETCH": fetch,
        "CLOUDMAIL_REPORT_SECRETS": [SECRET],
    }


# --- Building SES payloads and signed SNS messages ---

DETAIL_KEYS = {
    "Send": "send",
    "Delivery": "delivery",
    "Bounce": "bounce",
    "Complaint": "complaint",
    "Reject": "reject",
    "DeliveryDelay": "deliveryDelay",
    "Open": "open",
    "Click": "click",
    "Rendering Failure": "failure",
    "Subscription": "subscription",
}
STAMP = "2026-01-05T10:00:01.000Z"


def ses_detail(
    event_type: str, recipients: list[str], **options: Any
) -> dict[str, Any]:
    """The event's own object, shaped as in AWS's SES example pages."""
    if event_type == "Delivery":
        return {
            "timestamp": STAMP,
            "processingTimeMillis": 546,
            "recipients": recipients,
            "smtpResponse": "250 ok",
            "reportingMTA": "a8-70.smtp-out.amazonses.com",
        }
    if event_type == "Bounce":
        return {
            "bounceType": options.get("bounce_type", "Permanent"),
            "bounceSubType": options.get("bounce_subtype", "General"),
            "bouncedRecipients": [
                {
                    "emailAddress": r,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                }
                for r in recipients
            ],
            "timestamp": STAMP,
            "feedbackId": "0100015-feedback",
        }
    if event_type == "Complaint":
        detail: dict[str, Any] = {
            "timestamp": STAMP,
            "feedbackId": "0100015-complaint",
            "complaintFeedbackType": "abuse",
        }
        if options.get("listed", True):
            detail["complainedRecipients"] = [{"emailAddress": r} for r in recipients]
        return detail
    if event_type == "Reject":
        return {"reason": "Bad content"}
    if event_type == "DeliveryDelay":
        return {
            "delayType": "TransientCommunicationFailure",
            "expirationTime": STAMP,
            "delayedRecipients": [
                {
                    "emailAddress": r,
                    "status": "4.4.1",
                    "diagnosticCode": "smtp; 421 4.4.1 timed out",
                }
                for r in recipients
            ],
            "timestamp": STAMP,
        }
    if event_type == "Open":
        return {
            "ipAddress": "192.0.2.1",
            "timestamp": STAMP,
            "userAgent": "Mozilla/5.0",
        }
    if event_type == "Click":
        return {
            "ipAddress": "192.0.2.1",
            "link": "https://example.com/",
            "timestamp": STAMP,
            "linkTags": {},
            "userAgent": "Mozilla/5.0",
        }
    if event_type == "Rendering Failure":
        return {"errorMessage": "Attribute 'name' is not present", "templateName": "t"}
    if event_type == "Subscription":
        return {
            "contactList": "news",
            "timestamp": STAMP,
            "source": "UnsubscribeHeader",
            "newTopicPreferences": {"unsubscribeAll": True},
        }
    return {}


def ses_payload(
    event_type: str,
    message_id: str,
    recipients: list[str],
    *,
    identity: bool = False,
    job_id: int | None = None,
    rid: int | None = None,
    foreign: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """An SES payload: configuration-set format, or with ``identity`` the identity one.

    Configuration-set events carry SES's own tags and, unless ``foreign``,
    cloudmail's job and recipient tags; identity notifications carry no tags.
    """
    mail: dict[str, Any] = {
        "timestamp": "2026-01-05T10:00:00.000Z",
        "source": "news@example.com",
        "sendingAccountId": "123456789012",
        "messageId": message_id,
        "destination": recipients,
        "headersTruncated": False,
    }
    key = "notificationType" if identity else "eventType"
    if not identity:
        tags = {
            "ses:configuration-set": ["cloudmail-events"],
            "ses:from-domain": ["example.com"],
        }
        if not foreign and job_id is not None:
            tags["cloudmail-job"] = [str(job_id)]
            if rid is not None:
                tags["cloudmail-recipient"] = [str(rid)]
        mail["tags"] = tags
    return {
        key: event_type,
        "mail": mail,
        DETAIL_KEYS[event_type]: ses_detail(event_type, recipients, **options),
    }


def signed(
    message: dict[str, Any], version: str = "1", key: rsa.RSAPrivateKey = KEY
) -> dict[str, Any]:
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = key.sign(sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
    return {
        **message,
        "SignatureVersion": version,
        "Signature": base64.b64encode(signature).decode(),
        "SigningCertURL": message.get("SigningCertURL", CERT_URL),
    }


def notification(
    payload: dict[str, Any] | str,
    *,
    sns_id: str | None = None,
    topic: str = TOPIC,
    subject: str | None = "Amazon SES Email Event Notification",
    version: str = "1",
    **fields: Any,
) -> dict[str, Any]:
    message = {
        "Type": "Notification",
        "MessageId": sns_id or str(uuid.uuid4()),
        "TopicArn": topic,
        "Message": payload if isinstance(payload, str) else json.dumps(payload),
        "Timestamp": "2026-01-05T10:00:02.000Z",
        "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe&x=1",
        **fields,
    }
    if subject is not None:
        message["Subject"] = subject
    return signed(message, version)


def confirmation(
    message_type: str = "SubscriptionConfirmation",
    topic: str = TOPIC,
    subscribe_url: str = SUBSCRIBE_URL,
) -> dict[str, Any]:
    return signed(
        {
            "Type": message_type,
            "MessageId": str(uuid.uuid4()),
            "Token": "2336412f37fb687f5d51e6e241d164b05333",
            "TopicArn": topic,
            "Message": f"You have chosen to subscribe to the topic {topic}.",
            "SubscribeURL": subscribe_url,
            "Timestamp": "2026-01-05T10:00:00.000Z",
        }
    )


def post(client, message: dict[str, Any] | bytes):  # noqa: ANN001, ANN201
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return client.post(
        URL,
        data=body,
        content_type="text/plain; charset=UTF-8",
        headers={"x-amz-sns-message-type": "Notification"},
    )


# --- Jobs and reports ---


def queued_job(count: int = 3, prefix: str = "r") -> tuple[int, int, list[int]]:
    """A job whose recipients were handed to a (pretend) cloud connector."""
    session = get_state().db.session
    job = manager.create_job(
        ({"email": f"{prefix}{i}@example.com"} for i in range(count)),
        subject="x",
        html="x",
        provider="aws",
    )
    tracking.move_job(session, job.id, "queued")
    manager.plan_batches(job.id)
    session.flush()
    batch = session.execute(sa.select(Batch).where(Batch.job_id == job.id)).scalar_one()
    batch.status = "dispatched"
    ids = tracking.move_recipients(
        session, job.id, "pending", "queued", values={"attempts": 1}, returning=True
    )
    session.commit()
    return job.id, batch.id, sorted(ids)  # type: ignore[arg-type]


def report(
    client,
    job_id: int,
    batch_id: int,
    sent: dict[int, str | None],  # noqa: ANN001, ANN201
    report_id: str | None = None,
):
    """Post a signed report saying each rid of ``sent`` was sent with that message id."""
    report_id = report_id or f"rep_{uuid.uuid4().hex[:12]}"
    body = json.dumps(
        {
            "v": 1,
            "id": report_id,
            "source": "lambda",
            "job": job_id,
            "batch": batch_id,
            "results": [
                {
                    "rid": rid,
                    "key": f"cm-{job_id}-{rid}-1",
                    "status": "sent",
                    "message_id": mid,
                }
                for rid, mid in sent.items()
            ],
        }
    ).encode()
    headers = sign_headers(SECRET, body, msg_id=report_id)
    return client.post(
        "/cloudmail/callback/report",
        data=body,
        headers=headers,
        content_type="application/json",
    )


def sent_job(client, count: int = 3) -> tuple[int, list[int], list[str]]:  # noqa: ANN001
    """A job whose recipients were all reported sent, message id ``ses-<rid>``."""
    job_id, batch_id, ids = queued_job(count)
    assert (
        report(client, job_id, batch_id, {rid: f"ses-{rid}" for rid in ids}).status_code
        == 200
    )
    return job_id, ids, [f"r{i}@example.com" for i in range(count)]


def status_of(rid: int) -> str:
    session = get_state().db.session
    return session.execute(
        sa.select(Recipient.status).where(Recipient.id == rid)
    ).scalar_one()


def counters(job_id: int) -> dict[str, int]:
    counts = manager.job_summary(job_id)["counters"]
    return {state: n for state, n in counts.items() if n and state != "total"}


def event_rows() -> list[tuple[str, str, str]]:
    """(kind, recipient, status) of every stored SES event, oldest first."""
    session = get_state().db.session
    return [
        tuple(r)
        for r in session.execute(
            sa.select(Event.kind, Event.recipient, Event.status)
            .where(Event.source == "ses")
            .order_by(Event.id)
        ).all()
    ]


def suppressed() -> list[tuple[str, str, str]]:
    session = get_state().db.session
    return [
        tuple(r)
        for r in session.execute(
            sa.select(
                Suppression.email_key, Suppression.category, Suppression.reason
            ).order_by(Suppression.email_key)
        ).all()
    ]


REFUSED = {"ok": False, "error": "forbidden"}
MALFORMED = {"ok": False, "error": "malformed"}


# --- Signatures ---


@pytest.mark.parametrize("version", ["1", "2"])
def test_valid_signature_v1_and_v2_is_applied(
    app: Flask, client, fetch: FakeSns, version: str
) -> None:
    job_id, ids, emails = sent_job(client, 1)

    response = post(
        client,
        notification(
            ses_payload(
                "Delivery", f"ses-{ids[0]}", emails[:1], job_id=job_id, rid=ids[0]
            ),
            version=version,
        ),
    )

    assert response.status_code == 200
    assert response.get_json() == {"ok": True}
    assert status_of(ids[0]) == "delivered"
    assert counters(job_id) == {"delivered": 1}
    assert fetch.calls == [CERT_URL]


def test_certificate_is_fetched_once_and_cached(
    app: Flask, client, fetch: FakeSns
) -> None:
    job_id, ids, emails = sent_job(client, 2)

    for rid, email in zip(ids, emails):
        payload = ses_payload("Delivery", f"ses-{rid}", [email], job_id=job_id, rid=rid)
        assert post(client, notification(payload)).status_code == 200

    assert fetch.calls == [CERT_URL]
    assert counters(job_id) == {"delivered": 2}


@pytest.mark.parametrize(
    "field", ["Message", "Subject", "Timestamp", "MessageId", "Type"]
)
def test_changed_field_is_refused(
    app: Flask, client, caplog: pytest.LogCaptureFixture, field: str
) -> None:
    job_id, ids, emails = sent_job(client, 1)
    message = notification(
        ses_payload("Bounce", f"ses-{ids[0]}", emails[:1], job_id=job_id, rid=ids[0])
    )
    changed = {
        "Message": message["Message"].replace("Permanent", "Transient"),
        "Subject": "Something else",
        "Timestamp": "2026-01-05T10:00:03.000Z",
        "MessageId": str(uuid.uuid4()),
        "Type": "SubscriptionConfirmation" if field == "Type" else None,
    }[field]
    message[field] = changed
    if field == "Type":  # a relabelled message must still be refused, not confirmed
        message.update(SubscribeURL=SUBSCRIBE_URL, Token="x")

    response = post(client, message)

    assert response.status_code == 403
    assert response.get_json() == REFUSED
    assert "the signature does not match its content" in caplog.text
    assert event_rows() == []
    assert status_of(ids[0]) == "sent"


def test_message_signed_by_another_key_is_refused(app: Flask, client) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = {
        "Type": "Notification",
        "MessageId": "m-1",
        "TopicArn": TOPIC,
        "Message": "{}",
        "Timestamp": "2026-01-05T10:00:02.000Z",
    }

    response = post(client, signed(message, key=other))

    assert response.status_code == 403
    assert event_rows() == []


def test_foreign_topic_with_valid_signature_is_refused_before_any_fetch(
    app: Flask, client, fetch: FakeSns, caplog: pytest.LogCaptureFixture
) -> None:
    job_id, ids, emails = sent_job(client, 1)
    payload = ses_payload(
        "Delivery", f"ses-{ids[0]}", emails[:1], job_id=job_id, rid=ids[0]
    )

    response = post(client, notification(payload, topic=FOREIGN_TOPIC))

    assert response.status_code == 403
    assert response.get_json() == REFUSED
    assert fetch.calls == []
    assert (
        f"SNS topic '{FOREIGN_TOPIC}' is not one of the allowed topic ARNs"
        in caplog.text
    )
    assert status_of(ids[0]) == "sent"


def test_no_allowed_topics_refuses_everything(
    app: Flask, client, fetch: FakeSns, caplog: pytest.LogCaptureFixture
) -> None:
    app.config["CLOUDMAIL_SNS_TOPIC_ARNS"] = []

    response = post(client, b"not even json")

    assert response.status_code == 403
    assert response.get_json() == REFUSED
    assert fetch.calls == []
    assert "CLOUDMAIL_SNS_TOPIC_ARNS is not set" in caplog.text


SPOOFED_CERT_URLS = [
    "http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-1.pem",
    "https://sns.eu-west-1.amazonaws.com.evil.example/SimpleNotificationService-1.pem",
    "https://sns-eu-west-1.amazonaws.com/SimpleNotificationService-1.pem",
    "https://evilsns.eu-west-1.amazonaws.com/SimpleNotificationService-1.pem",
    "https://s3.amazonaws.com/sns.eu-west-1.amazonaws.com/SimpleNotificationService-1.pem",
    "https://my-bucket.s3.eu-west-1.amazonaws.com/SimpleNotificationService-1.pem",
    "https://sns.eu-west-1.amazonaws.com@evil.example/SimpleNotificationService-1.pem",
    "https://evil.example/sns.eu-west-1.amazonaws.com/SimpleNotificationService-1.pem",
    "https://sns.eu-west-1.amazonaws.com:8443/SimpleNotificationService-1.pem",
    "https://sns.eu-west-1.amazonaws.com/../../evil.example/x.pem",
    "https://sns.eu-west-1.amazonaws.com\\@evil.example/x.pem",
    "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-1.pem?redirect=evil",
    "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-1.pem#frag",
    "https://sns.eu-west-1.amazonaws%2ecom/SimpleNotificationService-1.pem",
    "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-1.txt",
]


@pytest.mark.parametrize("cert_url", SPOOFED_CERT_URLS)
def test_spoofed_cert_url_is_refused_without_fetching(
    app: Flask, client, fetch: FakeSns, cert_url: str
) -> None:
    job_id, ids, emails = sent_job(client, 1)
    payload = ses_payload(
        "Delivery", f"ses-{ids[0]}", emails[:1], job_id=job_id, rid=ids[0]
    )

    response = post(client, notification(payload, SigningCertURL=cert_url))

    assert response.status_code == 403
    assert response.get_json() == REFUSED
    assert fetch.calls == []
    assert event_rows() == []


def test_certificate_download_failure_answers_500_so_sns_retries(
    app: Flask, client, fetch: FakeSns
) -> None:
    job_id, ids, emails = sent_job(client, 1)
    fetch.fail = urllib.error.URLError("timed out")
    message = notification(
        ses_payload("Delivery", f"ses-{ids[0]}", emails[:1], job_id=job_id, rid=ids[0])
    )

    first = post(client, message)
    fetch.fail = None
    retry = post(client, message)

    assert (first.status_code, first.get_json()) == (
        500,
        {"ok": False, "error": "not processed"},
    )
    assert retry.status_code == 200
    assert status_of(ids[0]) == "delivered"


# --- Subscriptions ---


def test_subscription_confirmation_for_allowed_topic_is_confirmed(
    app: Flask, client, fetch: FakeSns, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloudmail")

    response = post(client, confirmation())

    assert response.status_code == 200
    assert fetch.calls == [CERT_URL, SUBSCRIBE_URL]
    assert f"SNS topic {TOPIC}: subscription confirmed" in caplog.text


@pytest.mark.parametrize(
    "forgery", ["foreign-topic", "tampered", "spoofed-subscribe-url"]
)
def test_subscription_confirmation_is_refused(
    app: Flask, client, fetch: FakeSns, forgery: str
) -> None:
    if forgery == "foreign-topic":
        message = confirmation(topic=FOREIGN_TOPIC)
    elif forgery == "tampered":
        message = {
            **confirmation(),
            "SubscribeURL": SUBSCRIBE_URL.replace("Token=", "Token=1"),
        }
    else:
        message = confirmation(
            subscribe_url="https://evil.example/?Action=ConfirmSubscription"
        )

    response = post(client, message)

    assert response.status_code == 403
    assert response.get_json() == REFUSED
    assert SUBSCRIBE_URL not in fetch.calls
    assert [url for url in fetch.calls if not url.endswith(".pem")] == []


def test_unsubscribe_confirmation_is_logged(
    app: Flask, client, fetch: FakeSns, caplog: pytest.LogCaptureFixture
) -> None:
    response = post(client, confirmation("UnsubscribeConfirmation"))

    assert response.status_code == 200
    assert f"SNS topic {TOPIC}: the endpoint was unsubscribed" in caplog.text
    assert fetch.calls == [CERT_URL]


# --- Malformed requests ---


def test_raw_message_delivery_is_refused_with_the_reason(
    app: Flask, client, fetch: FakeSns, caplog: pytest.LogCaptureFixture
) -> None:
    payload = ses_payload("Delivery", "ses-1", ["r0@example.com"], job_id=1, rid=1)

    response = post(client, json.dumps(payload).encode())

    assert response.status_code == 400
    assert response.get_json() == MALFORMED
    assert (
        "raw message delivery is not supported; turn it off on the subscription"
        in caplog.text
    )
    assert fetch.calls == []
    assert event_rows() == []


@pytest.mark.parametrize(
    "body", [b"not json", b"[1, 2]", b'{"Message": "x"}', b'{"Type": "Gossip"}']
)
def test_malformed_envelope_is_400(app: Flask, client, body: bytes) -> None:
    response = post(client, body)

    assert response.status_code == 400
    assert response.get_json() == MALFORMED


def test_verified_message_with_malformed_ses_payload_is_400(
    app: Flask, client, caplog: pytest.LogCaptureFixture
) -> None:
    response = post(client, notification({"eventType": "Gossip", "mail": {}}))

    assert response.status_code == 400
    assert "its SES payload is malformed" in caplog.text
    assert event_rows() == []


def test_ses_setup_notice_is_accepted_and_not_stored(app: Flask, client) -> None:
    notice = "Successfully validated SNS topic for Amazon SES event publishing."

    response = post(client, notification(notice))

    assert response.status_code == 200
    assert event_rows() == []


# --- Every event type, both formats, one and several recipients ---

# eventType -> (recipient status after it, suppression reason or None)
OUTCOMES = {
    "Send": ("sent", None),
    "Delivery": ("delivered", None),
    "Bounce": ("bounced", "bounce"),
    "Complaint": ("complained", "complaint"),
    "Reject": ("failed", None),
    "DeliveryDelay": ("sent", None),
    "Open": ("sent", None),
    "Click": ("sent", None),
    "Rendering Failure": ("failed", None),
    "Subscription": ("sent", None),
}
KINDS = {
    "Send": "send",
    "Delivery": "delivery",
    "Bounce": "bounce",
    "Complaint": "complaint",
    "Reject": "reject",
    "DeliveryDelay": "delivery_delay",
    "Open": "open",
    "Click": "click",
    "Rendering Failure": "rendering_failure",
    "Subscription": "subscription",
}
CASES = [(t, False) for t in OUTCOMES] + [
    (t, True) for t in ("Bounce", "Complaint", "Delivery")
]


@pytest.mark.parametrize("several", [False, True], ids=["one", "several"])
@pytest.mark.parametrize(
    ("event_type", "identity"),
    CASES,
    ids=[f"{t}-{'identity' if i else 'event'}" for t, i in CASES],
)
def test_every_event_type_in_both_formats(
    app: Flask, client, event_type: str, identity: bool, several: bool
) -> None:
    # Several recipients of one SES message share its message id.
    job_id, batch_id, ids = queued_job(3)
    count = 2 if several else 1
    emails = [f"r{i}@example.com" for i in range(count)]
    sent = {rid: "ses-shared" if rid in ids[:count] else f"ses-{rid}" for rid in ids}
    assert report(client, job_id, batch_id, sent).status_code == 200

    payload = ses_payload(
        event_type, "ses-shared", emails, identity=identity, job_id=job_id
    )
    response = post(client, notification(payload))

    status, reason = OUTCOMES[event_type]
    assert response.status_code == 200
    assert [status_of(rid) for rid in ids] == [status] * count + ["sent"] * (3 - count)
    assert counters(job_id) == (
        {"sent": 3} if status == "sent" else {status: count, "sent": 3 - count}
    )
    assert event_rows() == [(KINDS[event_type], email, "applied") for email in emails]
    assert suppressed() == ([(email, "", reason) for email in emails] if reason else [])


@pytest.mark.parametrize(
    ("bounce_type", "subtype"),
    [
        ("Permanent", "NoEmail"),
        ("Transient", "MailboxFull"),
        ("Undetermined", "Undetermined"),
    ],
)
def test_bounce_types_and_subtypes(
    app: Flask, client, bounce_type: str, subtype: str
) -> None:
    job_id, ids, emails = sent_job(client, 1)
    payload = ses_payload(
        "Bounce",
        f"ses-{ids[0]}",
        emails,
        job_id=job_id,
        rid=ids[0],
        bounce_type=bounce_type,
        bounce_subtype=subtype,
    )

    assert post(client, notification(payload)).status_code == 200

    session = get_state().db.session
    row = session.execute(
        sa.select(Recipient.status, Recipient.reason, Recipient.error).where(
            Recipient.id == ids[0]
        )
    ).one()
    assert tuple(row) == (
        "bounced",
        f"{bounce_type}/{subtype}",
        "smtp; 550 5.1.1 user unknown",
    )
    assert suppressed() == (
        [(emails[0], "", "bounce")] if bounce_type == "Permanent" else []
    )


def test_complaint_without_complained_recipients_uses_the_destination(
    app: Flask, client
) -> None:
    job_id, ids, emails = sent_job(client, 1)
    payload = ses_payload(
        "Complaint", f"ses-{ids[0]}", emails, job_id=job_id, rid=ids[0], listed=False
    )

    assert post(client, notification(payload)).status_code == 200

    assert status_of(ids[0]) == "complained"
    assert suppressed() == [(emails[0], "", "complaint")]


# --- Duplicates ---


def test_duplicate_notification_changes_nothing(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 2)
    message = notification(
        ses_payload("Bounce", f"ses-{ids[0]}", emails[:1], job_id=job_id, rid=ids[0])
    )

    responses = [post(client, message).status_code for _ in range(3)]

    assert responses == [200, 200, 200]
    assert counters(job_id) == {"bounced": 1, "sent": 1}
    assert event_rows() == [("bounce", emails[0], "applied")]
    assert suppressed() == [(emails[0], "", "bounce")]


def test_same_event_under_a_new_sns_message_id_counts_once(app: Flask, client) -> None:
    # SES may publish an event twice; SNS gives each copy its own MessageId.
    job_id, ids, emails = sent_job(client, 1)
    payload = ses_payload(
        "Delivery", f"ses-{ids[0]}", emails, job_id=job_id, rid=ids[0]
    )

    assert post(client, notification(payload)).status_code == 200
    assert post(client, notification(payload)).status_code == 200

    assert counters(job_id) == {"delivered": 1}
    assert [row[2] for row in event_rows()] == ["applied", "applied"]


def test_event_for_mail_cloudmail_did_not_send_is_ignored(app: Flask, client) -> None:
    job_id, ids, emails = sent_job(client, 1)
    payload = ses_payload(
        "Bounce",
        "someone-elses-message",
        ["x@example.com"],
        job_id=job_id,
        foreign=True,
    )

    assert post(client, notification(payload)).status_code == 200

    assert event_rows() == [("bounce", "x@example.com", "ignored")]
    assert suppressed() == []
    assert counters(job_id) == {"sent": 1}


def test_responses_carry_no_internals(
    app: Flask, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, ids, emails = sent_job(client, 1)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("password=hunter2 at db.internal:5432")

    monkeypatch.setattr(tracking, "move_recipient", broken)
    response = post(
        client,
        notification(
            ses_payload("Delivery", f"ses-{ids[0]}", emails, job_id=job_id, rid=ids[0])
        ),
    )

    assert response.status_code == 500
    assert (
        response.get_data(as_text=True).strip()
        == '{"error":"not processed","ok":false}'
    )
    assert db_job(job_id).delivered == 0


def db_job(job_id: int) -> Job:
    session = get_state().db.session
    session.expire_all()
    return session.get(Job, job_id)
