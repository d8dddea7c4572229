"""Fixtures are AWS's documented examples (headers trimmed), from
https://docs.aws.amazon.com/ses/latest/dg/event-publishing-retrieving-sns-examples.html
(configuration-set event publishing) and
https://docs.aws.amazon.com/ses/latest/dg/notification-examples.html
(identity notifications), with cloudmail's tags added where noted.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import pytest

from cloudmail.errors import WebhookError
from cloudmail.webhooks.ses_events import (
    DIAGNOSTIC_MAX_LENGTH,
    SesEvent,
    parse_ses_events,
)

UTC = dt.UTC
EXAMPLE_ID = "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"


def utc(
    year: int,
    month: int,
    day: int,
    hour: int,
    minute: int,
    second: int,
    microsecond: int = 0,
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


def example_mail(
    timestamp: str, destination: list[str], **extra: Any
) -> dict[str, Any]:
    mail = {
        "timestamp": timestamp,
        "source": "sender@example.com",
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/sender@example.com",
        "sendingAccountId": "123456789012",
        "messageId": EXAMPLE_ID,
        "destination": destination,
        "headersTruncated": False,
        "tags": {
            "ses:configuration-set": ["ConfigSet"],
            "ses:source-ip": ["192.0.2.0"],
            "ses:from-domain": ["example.com"],
            "ses:caller-identity": ["ses_user"],
        },
    }
    mail.update(extra)
    return mail


# --- configuration-set event publishing (eventType) ---

EVENT_BOUNCE: dict[str, Any] = {
    "eventType": "Bounce",
    "bounce": {
        "bounceType": "Permanent",
        "bounceSubType": "General",
        "bouncedRecipients": [
            {
                "emailAddress": "recipient@example.com",
                "action": "failed",
                "status": "5.1.1",
                "diagnosticCode": "smtp; 550 5.1.1 user unknown",
            }
        ],
        "timestamp": "2017-08-05T00:41:02.669Z",
        "feedbackId": "01000157c44f053b-61b59c11-9236-11e6-8f96-7be8aexample-000000",
        "reportingMTA": "dsn; mta.example.com",
    },
    "mail": example_mail("2017-08-05T00:40:02.012Z", ["recipient@example.com"]),
}

EVENT_COMPLAINT: dict[str, Any] = {
    "eventType": "Complaint",
    "complaint": {
        "complainedRecipients": [{"emailAddress": "recipient@example.com"}],
        "timestamp": "2017-08-05T00:41:02.669Z",
        "feedbackId": "01000157c44f053b-61b59c11-9236-11e6-8f96-7be8aexample-000000",
        "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36",
        "complaintFeedbackType": "abuse",
        "arrivalDate": "2017-08-05T00:41:02.669Z",
    },
    "mail": example_mail("2017-08-05T00:40:01.123Z", ["recipient@example.com"]),
}

EVENT_DELIVERY: dict[str, Any] = {
    "eventType": "Delivery",
    "mail": example_mail(
        "2016-10-19T23:20:52.240Z",
        ["recipient@example.com"],
        tags={
            "ses:configuration-set": ["ConfigSet"],
            "ses:source-ip": ["192.0.2.0"],
            "ses:from-domain": ["example.com"],
            "ses:caller-identity": ["ses_user"],
            "ses:outgoing-ip": ["192.0.2.0"],
            "myCustomTag1": ["myCustomTagValue1"],
            "myCustomTag2": ["myCustomTagValue2"],
        },
    ),
    "delivery": {
        "timestamp": "2016-10-19T23:21:04.133Z",
        "processingTimeMillis": 11893,
        "recipients": ["recipient@example.com"],
        "smtpResponse": "250 2.6.0 Message received",
        "reportingMTA": "mta.example.com",
    },
}

EVENT_SEND: dict[str, Any] = {
    "eventType": "Send",
    "mail": example_mail("2016-10-14T05:02:16.645Z", ["recipient@example.com"]),
    "send": {},
}

EVENT_REJECT: dict[str, Any] = {
    "eventType": "Reject",
    "mail": example_mail("2016-10-14T17:38:15.211Z", ["sender@example.com"]),
    "reject": {"reason": "Bad content"},
}

EVENT_OPEN: dict[str, Any] = {
    "eventType": "Open",
    "mail": example_mail("2017-08-09T21:59:49.927Z", ["recipient@example.com"]),
    "open": {
        "ipAddress": "192.0.2.1",
        "timestamp": "2017-08-09T22:00:19.652Z",
        "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 10_3_3 like Mac OS X)",
    },
}

EVENT_CLICK: dict[str, Any] = {
    "eventType": "Click",
    "click": {
        "ipAddress": "192.0.2.1",
        "link": "http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html",
        "linkTags": {"samplekey0": ["samplevalue0"], "samplekey1": ["samplevalue1"]},
        "timestamp": "2017-08-09T23:51:25.570Z",
        "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36",
    },
    "mail": example_mail("2017-08-09T23:50:05.795Z", ["recipient@example.com"]),
}

EVENT_RENDERING_FAILURE: dict[str, Any] = {
    "eventType": "Rendering Failure",
    "mail": example_mail(
        "2018-01-22T18:43:06.197Z",
        ["recipient@example.com"],
        tags={"ses:configuration-set": ["ConfigSet"]},
    ),
    "failure": {
        "errorMessage": (
            "Attribute 'attributeName' is not present in the rendering data."
        ),
        "templateName": "MyTemplate",
    },
}

EVENT_DELIVERY_DELAY: dict[str, Any] = {
    "eventType": "DeliveryDelay",
    "mail": example_mail(
        "2020-06-16T00:15:40.641Z",
        ["recipient@example.com"],
        tags={"ses:configuration-set": ["ConfigSet"]},
    ),
    "deliveryDelay": {
        "timestamp": "2020-06-16T00:25:40.095Z",
        "delayType": "TransientCommunicationFailure",
        "expirationTime": "2020-06-16T00:25:40.914Z",
        "delayedRecipients": [
            {
                "emailAddress": "recipient@example.com",
                "status": "4.4.1",
                "diagnosticCode": "smtp; 421 4.4.1 Unable to connect to remote host",
            }
        ],
    },
}

EVENT_SUBSCRIPTION: dict[str, Any] = {
    "eventType": "Subscription",
    "mail": {
        **example_mail("2022-01-12T01:00:14.340Z", ["recipient@example.com"]),
        "messageId": "EXAMPLEe4bccb684-777bc8de-afa7-4970-92b0-f515137b1497-000000",
    },
    "subscription": {
        "contactList": "ContactListName",
        "timestamp": "2022-01-12T01:00:17.910Z",
        "source": "UnsubscribeHeader",
        "newTopicPreferences": {
            "unsubscribeAll": True,
            "topicSubscriptionStatus": [
                {"topicName": "ExampleTopicName", "subscriptionStatus": "OptOut"}
            ],
        },
        "oldTopicPreferences": {
            "unsubscribeAll": False,
            "topicSubscriptionStatus": [
                {"topicName": "ExampleTopicName", "subscriptionStatus": "OptOut"}
            ],
        },
    },
}

# --- identity notifications (notificationType), which carry no tags ---


def identity_mail(message_id: str, destination: list[str]) -> dict[str, Any]:
    return {
        "timestamp": "2016-01-27T14:59:38.237Z",
        "messageId": message_id,
        "source": "john@example.com",
        "sourceArn": "arn:aws:ses:us-east-1:888888888888:identity/example.com",
        "sourceIp": "127.0.3.0",
        "sendingAccountId": "123456789012",
        "destination": destination,
    }


THREE = ["jane@example.com", "mary@example.com", "richard@example.com"]

NOTIFICATION_BOUNCE_WITH_DSN: dict[str, Any] = {
    "notificationType": "Bounce",
    "bounce": {
        "bounceType": "Permanent",
        "reportingMTA": "dns; email.example.com",
        "bouncedRecipients": [
            {
                "emailAddress": "jane@example.com",
                "status": "5.1.1",
                "action": "failed",
                "diagnosticCode": "smtp; 550 5.1.1 <jane@example.com>... User",
            }
        ],
        "bounceSubType": "General",
        "timestamp": "2016-01-27T14:59:38.237Z",
        "feedbackId": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa068a-000000",
        "remoteMtaIp": "127.0.2.0",
    },
    "mail": identity_mail(
        "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000", THREE
    ),
}

NOTIFICATION_BOUNCE_WITHOUT_DSN: dict[str, Any] = {
    "notificationType": "Bounce",
    "bounce": {
        "bounceType": "Permanent",
        "bounceSubType": "General",
        "bouncedRecipients": [
            {"emailAddress": "jane@example.com"},
            {"emailAddress": "richard@example.com"},
        ],
        "timestamp": "2016-01-27T14:59:38.237Z",
        "feedbackId": "00000137860315fd-869464a4-8680-4114-98d3-716fe35851f9-000000",
        "remoteMtaIp": "127.0.2.0",
    },
    "mail": identity_mail(
        "00000137860315fd-34208509-5b74-41f3-95c5-22c1edc3c924-000000", THREE
    ),
}

NOTIFICATION_COMPLAINT_WITH_FEEDBACK: dict[str, Any] = {
    "notificationType": "Complaint",
    "complaint": {
        "userAgent": "AnyCompany Feedback Loop (V0.01)",
        "complainedRecipients": [{"emailAddress": "richard@example.com"}],
        "complaintFeedbackType": "abuse",
        "arrivalDate": "2016-01-27T14:59:38.237Z",
        "timestamp": "2016-01-27T14:59:38.237Z",
        "feedbackId": "000001378603177f-18c07c78-fa81-4a58-9dd1-fedc3cb8f49a-000000",
    },
    "mail": identity_mail(
        "000001378603177f-7a5433e7-8edb-42ae-af10-f0181f34d6ee-000000", THREE
    ),
}

NOTIFICATION_COMPLAINT_WITHOUT_FEEDBACK: dict[str, Any] = {
    "notificationType": "Complaint",
    "complaint": {
        "complainedRecipients": [{"emailAddress": "richard@example.com"}],
        "timestamp": "2016-01-27T14:59:38.237Z",
        "feedbackId": "0000013786031775-fea503bc-7497-49e1-881b-a0379bb037d3-000000",
    },
    "mail": identity_mail(
        "0000013786031775-163e3910-53eb-4c8e-a04a-f29debf88a84-000000", THREE
    ),
}

NOTIFICATION_DELIVERY: dict[str, Any] = {
    "notificationType": "Delivery",
    "mail": identity_mail(
        "0000014644fe5ef6-9a483358-9170-4cb4-a269-f5dcdf415321-000000",
        ["jane@example.com"],
    ),
    "delivery": {
        "timestamp": "2016-01-27T14:59:38.237Z",
        "recipients": ["jane@example.com"],
        "processingTimeMillis": 546,
        "reportingMTA": "a8-70.smtp-out.amazonses.com",
        "smtpResponse": "250 ok:  Message 64111812 accepted",
        "remoteMtaIp": "127.0.2.0",
    },
}

AWS_EXAMPLE_TAGS = {
    "ses:configuration-set": "ConfigSet",
    "ses:source-ip": "192.0.2.0",
    "ses:from-domain": "example.com",
    "ses:caller-identity": "ses_user",
}


def with_cloudmail_tags(payload: dict[str, Any], rid: str = "1001") -> dict[str, Any]:
    tagged = copy.deepcopy(payload)
    tagged["mail"]["tags"].update(
        {
            "cloudmail-job": ["123"],
            "cloudmail-batch": ["45"],
            "cloudmail-recipient": [rid],
        }
    )
    return tagged


def only(events: list[SesEvent]) -> SesEvent:
    assert len(events) == 1
    return events[0]


# --- event publishing, one type at a time ---


def test_bounce_event() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_BOUNCE)))

    assert event == SesEvent(
        kind="bounce",
        message_id=EXAMPLE_ID,
        recipient="recipient@example.com",
        timestamp=utc(2017, 8, 5, 0, 41, 2, 669000),
        permanent=True,
        bounce_type="Permanent",
        bounce_subtype="General",
        diagnostic="smtp; 550 5.1.1 user unknown",
        tags=AWS_EXAMPLE_TAGS,
    )
    assert event.raw == EVENT_BOUNCE


def test_transient_bounce_is_not_permanent() -> None:
    payload = copy.deepcopy(EVENT_BOUNCE)
    payload["bounce"].update(bounceType="Transient", bounceSubType="MailboxFull")

    event = only(parse_ses_events(payload))

    assert (event.permanent, event.bounce_type, event.bounce_subtype) == (
        False,
        "Transient",
        "MailboxFull",
    )


def test_complaint_event() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_COMPLAINT)))

    assert event == SesEvent(
        kind="complaint",
        message_id=EXAMPLE_ID,
        recipient="recipient@example.com",
        timestamp=utc(2017, 8, 5, 0, 41, 2, 669000),
        diagnostic="abuse",
        tags=AWS_EXAMPLE_TAGS,
    )


def test_complaint_without_complained_recipients_uses_destination() -> None:
    payload = copy.deepcopy(EVENT_COMPLAINT)
    del payload["complaint"]["complainedRecipients"]
    payload["mail"]["destination"] = ["a@example.com", "b@example.com"]

    events = parse_ses_events(payload)

    assert [e.recipient for e in events] == ["a@example.com", "b@example.com"]
    assert [e.diagnostic for e in events] == ["abuse", "abuse"]


def test_delivery_event_with_custom_tags() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_DELIVERY)))

    assert event.kind == "delivery"
    assert event.recipient == "recipient@example.com"
    assert event.timestamp == utc(2016, 10, 19, 23, 21, 4, 133000)
    assert event.diagnostic is None
    assert event.permanent is False
    assert event.tags == {
        **AWS_EXAMPLE_TAGS,
        "ses:outgoing-ip": "192.0.2.0",
        "myCustomTag1": "myCustomTagValue1",
        "myCustomTag2": "myCustomTagValue2",
    }


def test_send_event_uses_the_mail_timestamp() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_SEND)))

    assert (event.kind, event.recipient, event.timestamp, event.diagnostic) == (
        "send",
        "recipient@example.com",
        utc(2016, 10, 14, 5, 2, 16, 645000),
        None,
    )


def test_reject_event() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_REJECT)))

    assert (event.kind, event.recipient, event.timestamp, event.diagnostic) == (
        "reject",
        "sender@example.com",
        utc(2016, 10, 14, 17, 38, 15, 211000),
        "Bad content",
    )


def test_open_event() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_OPEN)))

    assert (event.kind, event.recipient, event.timestamp) == (
        "open",
        "recipient@example.com",
        utc(2017, 8, 9, 22, 0, 19, 652000),
    )


def test_click_event() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_CLICK)))

    assert (event.kind, event.recipient, event.timestamp) == (
        "click",
        "recipient@example.com",
        utc(2017, 8, 9, 23, 51, 25, 570000),
    )
    assert event.raw["click"]["link"].endswith("send-email-smtp.html")


def test_rendering_failure_event() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_RENDERING_FAILURE)))

    assert event == SesEvent(
        kind="rendering_failure",
        message_id=EXAMPLE_ID,
        recipient="recipient@example.com",
        timestamp=utc(2018, 1, 22, 18, 43, 6, 197000),
        diagnostic="Attribute 'attributeName' is not present in the rendering data.",
        tags={"ses:configuration-set": "ConfigSet"},
    )


def test_delivery_delay_event() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_DELIVERY_DELAY)))

    assert event == SesEvent(
        kind="delivery_delay",
        message_id=EXAMPLE_ID,
        recipient="recipient@example.com",
        timestamp=utc(2020, 6, 16, 0, 25, 40, 95000),
        diagnostic="smtp; 421 4.4.1 Unable to connect to remote host",
        tags={"ses:configuration-set": "ConfigSet"},
    )


def test_delivery_delay_without_diagnostic_code_falls_back_to_delay_type() -> None:
    payload = copy.deepcopy(EVENT_DELIVERY_DELAY)
    del payload["deliveryDelay"]["delayedRecipients"][0]["diagnosticCode"]

    assert only(parse_ses_events(payload)).diagnostic == "TransientCommunicationFailure"


def test_subscription_event() -> None:
    event = only(parse_ses_events(json.dumps(EVENT_SUBSCRIPTION)))

    assert (event.kind, event.message_id, event.recipient, event.timestamp) == (
        "subscription",
        "EXAMPLEe4bccb684-777bc8de-afa7-4970-92b0-f515137b1497-000000",
        "recipient@example.com",
        utc(2022, 1, 12, 1, 0, 17, 910000),
    )
    assert event.raw["subscription"]["newTopicPreferences"]["unsubscribeAll"] is True


# --- several recipients ---


def test_bounce_with_several_recipients_gives_one_event_each() -> None:
    payload = copy.deepcopy(EVENT_BOUNCE)
    payload["mail"]["destination"] = THREE
    payload["bounce"]["bouncedRecipients"] = [
        {"emailAddress": "jane@example.com", "diagnosticCode": "smtp; 550 5.1.1 jane"},
        {"emailAddress": "mary@example.com", "diagnosticCode": "smtp; 550 5.2.2 full"},
    ]

    events = parse_ses_events(payload)

    assert [(e.recipient, e.diagnostic) for e in events] == [
        ("jane@example.com", "smtp; 550 5.1.1 jane"),
        ("mary@example.com", "smtp; 550 5.2.2 full"),
    ]
    assert {e.message_id for e in events} == {EXAMPLE_ID}


def test_delivery_with_several_recipients() -> None:
    payload = copy.deepcopy(EVENT_DELIVERY)
    payload["mail"]["destination"] = THREE
    payload["delivery"]["recipients"] = ["jane@example.com", "mary@example.com"]

    events = parse_ses_events(payload)

    assert [e.recipient for e in events] == ["jane@example.com", "mary@example.com"]


@pytest.mark.parametrize(
    "payload", [EVENT_SEND, EVENT_OPEN, EVENT_CLICK, EVENT_REJECT, EVENT_SUBSCRIPTION]
)
def test_destination_based_events_with_several_recipients(
    payload: dict[str, Any],
) -> None:
    payload = copy.deepcopy(payload)
    payload["mail"]["destination"] = THREE

    events = parse_ses_events(payload)

    assert [e.recipient for e in events] == THREE
    assert len({e.kind for e in events}) == 1


def test_delivery_delay_with_several_recipients() -> None:
    payload = copy.deepcopy(EVENT_DELIVERY_DELAY)
    payload["deliveryDelay"]["delayedRecipients"].append(
        {"emailAddress": "other@example.com", "status": "4.2.2"}
    )

    events = parse_ses_events(payload)

    assert [(e.recipient, e.diagnostic) for e in events] == [
        ("recipient@example.com", "smtp; 421 4.4.1 Unable to connect to remote host"),
        ("other@example.com", "TransientCommunicationFailure"),
    ]


# --- tags ---


def test_cloudmail_tags_are_extracted() -> None:
    event = only(parse_ses_events(with_cloudmail_tags(EVENT_BOUNCE)))

    assert event.tags == {
        **AWS_EXAMPLE_TAGS,
        "cloudmail-job": "123",
        "cloudmail-batch": "45",
        "cloudmail-recipient": "1001",
    }
    assert (event.job_id, event.batch_id, event.recipient_id) == (123, 45, 1001)


def test_first_tag_value_is_taken() -> None:
    payload = copy.deepcopy(EVENT_SEND)
    payload["mail"]["tags"] = {
        "cloudmail-job": ["7", "8"],
        "empty": [],
        "odd": [1, "x"],
    }

    assert only(parse_ses_events(payload)).tags == {"cloudmail-job": "7", "odd": "x"}


def test_missing_or_non_numeric_cloudmail_tags_give_none() -> None:
    event = only(parse_ses_events(with_cloudmail_tags(EVENT_SEND, rid="abc")))

    assert (event.job_id, event.recipient_id) == (123, None)
    assert only(parse_ses_events(EVENT_OPEN)).job_id is None


# --- identity notifications ---


def test_identity_bounce_with_dsn() -> None:
    event = only(parse_ses_events(json.dumps(NOTIFICATION_BOUNCE_WITH_DSN)))

    assert event == SesEvent(
        kind="bounce",
        message_id="00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000",
        recipient="jane@example.com",
        timestamp=utc(2016, 1, 27, 14, 59, 38, 237000),
        permanent=True,
        bounce_type="Permanent",
        bounce_subtype="General",
        diagnostic="smtp; 550 5.1.1 <jane@example.com>... User",
        tags={},
    )


def test_identity_bounce_without_dsn_has_two_recipients() -> None:
    events = parse_ses_events(json.dumps(NOTIFICATION_BOUNCE_WITHOUT_DSN))

    assert [(e.kind, e.recipient, e.diagnostic, e.permanent) for e in events] == [
        ("bounce", "jane@example.com", None, True),
        ("bounce", "richard@example.com", None, True),
    ]
    assert all(e.tags == {} for e in events)


def test_identity_complaint_with_feedback_report() -> None:
    event = only(parse_ses_events(json.dumps(NOTIFICATION_COMPLAINT_WITH_FEEDBACK)))

    assert (event.kind, event.recipient, event.diagnostic, event.tags) == (
        "complaint",
        "richard@example.com",
        "abuse",
        {},
    )


def test_identity_complaint_without_feedback_report() -> None:
    event = only(parse_ses_events(json.dumps(NOTIFICATION_COMPLAINT_WITHOUT_FEEDBACK)))

    assert (event.kind, event.recipient, event.diagnostic) == (
        "complaint",
        "richard@example.com",
        None,
    )
    assert event.timestamp == utc(2016, 1, 27, 14, 59, 38, 237000)


def test_identity_delivery() -> None:
    event = only(parse_ses_events(json.dumps(NOTIFICATION_DELIVERY).encode()))

    assert event == SesEvent(
        kind="delivery",
        message_id="0000014644fe5ef6-9a483358-9170-4cb4-a269-f5dcdf415321-000000",
        recipient="jane@example.com",
        timestamp=utc(2016, 1, 27, 14, 59, 38, 237000),
    )


@pytest.mark.parametrize("ses_type", ["Open", "Send", "DeliveryDelay", "Gossip"])
def test_identity_notification_of_an_unknown_type_is_refused(ses_type: str) -> None:
    payload = {**NOTIFICATION_DELIVERY, "notificationType": ses_type}

    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events(payload)

    assert str(excinfo.value) == (
        f"The SES notificationType {ses_type!r} is unknown; expected one of "
        "Bounce, Complaint, Delivery."
    )


# --- setup notices ---


def test_event_destination_validation_notice_gives_no_event() -> None:
    notice = "Successfully validated SNS topic for Amazon SES event publishing."

    assert parse_ses_events(notice) == []


def test_identity_topic_notice_gives_no_event() -> None:
    notice = {
        "notificationType": "AmazonSnsSubscriptionSucceeded",
        "message": "You have successfully subscribed your Amazon SNS topic "
        "'arn:aws:sns:us-east-1:123456789012:bounces' to receive 'Bounce' "
        "notifications from Amazon SES for identity 'example.com'.",
    }

    assert parse_ses_events(json.dumps(notice)) == []


# --- malformed payloads ---


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events({**EVENT_SEND, "eventType": "Teleport"})

    assert str(excinfo.value) == (
        "The SES eventType 'Teleport' is unknown; expected one of Send, Delivery, "
        "Bounce, Complaint, Reject, DeliveryDelay, Open, Click, Rendering Failure, "
        "Subscription."
    )


def test_payload_without_a_type_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events({"mail": EVENT_SEND["mail"]})

    assert str(excinfo.value) == (
        "The SES payload has neither 'eventType' nor 'notificationType'."
    )


def test_non_json_payload_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events("hello there")

    assert str(excinfo.value) == "The SES payload is not JSON."


def test_json_array_payload_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events("[]")

    assert str(excinfo.value) == "The SES payload is a JSON list, not an object."


def test_missing_message_id_is_refused() -> None:
    payload = copy.deepcopy(EVENT_SEND)
    del payload["mail"]["messageId"]

    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events(payload)

    assert str(excinfo.value) == "The SES 'Send' payload has no 'mail.messageId'."


def test_missing_mail_is_refused() -> None:
    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events({"eventType": "Send", "send": {}})

    assert str(excinfo.value) == (
        "The SES payload's 'mail' field is missing or not an object."
    )


def test_bounce_without_recipients_is_refused() -> None:
    payload = copy.deepcopy(EVENT_BOUNCE)
    payload["bounce"]["bouncedRecipients"] = []

    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events(payload)

    assert str(excinfo.value) == "The SES 'Bounce' payload names no recipient."


def test_bad_timestamp_is_refused() -> None:
    payload = copy.deepcopy(EVENT_SEND)
    payload["mail"]["timestamp"] = "yesterday"

    with pytest.raises(WebhookError) as excinfo:
        parse_ses_events(payload)

    assert str(excinfo.value) == (
        "The SES timestamp 'yesterday' is not an ISO 8601 date and time."
    )


def test_missing_timestamp_is_refused() -> None:
    payload = copy.deepcopy(EVENT_SEND)
    del payload["mail"]["timestamp"]

    with pytest.raises(WebhookError, match="has no timestamp"):
        parse_ses_events(payload)


# --- timestamps and diagnostics ---


def test_timestamps_are_converted_to_utc() -> None:
    payload = copy.deepcopy(EVENT_OPEN)
    payload["open"]["timestamp"] = "2017-08-10T00:00:19.652+02:00"

    event = only(parse_ses_events(payload))

    assert event.timestamp == utc(2017, 8, 9, 22, 0, 19, 652000)
    assert event.timestamp.tzinfo is UTC


def test_naive_timestamps_are_taken_as_utc() -> None:
    payload = copy.deepcopy(EVENT_SEND)
    payload["mail"]["timestamp"] = "2016-10-14T05:02:16.645"

    assert only(parse_ses_events(payload)).timestamp == utc(
        2016, 10, 14, 5, 2, 16, 645000
    )


def test_long_diagnostic_is_truncated() -> None:
    payload = copy.deepcopy(EVENT_BOUNCE)
    payload["bounce"]["bouncedRecipients"][0]["diagnosticCode"] = "x" * 5000

    diagnostic = only(parse_ses_events(payload)).diagnostic

    assert diagnostic == "x" * (DIAGNOSTIC_MAX_LENGTH - 1) + "…"
    assert len(diagnostic) == DIAGNOSTIC_MAX_LENGTH


def test_events_do_not_share_tag_dicts() -> None:
    payload = copy.deepcopy(EVENT_SEND)
    payload["mail"]["destination"] = THREE
    events = parse_ses_events(payload)

    events[0].tags["changed"] = "yes"

    assert "changed" not in events[1].tags
