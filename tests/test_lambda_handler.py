"""The Lambda consumer against moto's HTTP server and a local report receiver.

Everything talks over real HTTP on 127.0.0.1: boto3 to ``ThreadedMotoServer``, the
handler's reports to an ``http.server`` whose signature check follows the Standard
Webhooks text in ``docs/message-schema.md`` (written here, not borrowed from the
handler, so a signing mistake cannot check itself).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import importlib.util
import json
import logging
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ReadTimeoutError
from moto.server import ThreadedMotoServer

HANDLER_PATH = Path(__file__).resolve().parent.parent / "lambda" / "lambda_handler.py"
TABLE = "cloudmail-idempotency-test"
SENDER = "news@example.com"
SECRET_KEY = b"0123456789abcdef0123456789abcdef"
OLD_SECRET_KEY = b"old-secret-old-secret-old-secret"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()
OLD_SECRET = "whsec_" + base64.b64encode(OLD_SECRET_KEY).decode()


# -- servers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(
        ip_address="127.0.0.1", port=_free_port(), verbose=False
    )
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Receiver:
    """Records every POST; answers with the statuses queued in ``answers``."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self.url = ""

    def reports(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            receiver.requests.append(
                ({k.lower(): v for k, v in self.headers.items()}, body)
            )
            status = receiver.answers.pop(0) if receiver.answers else 204
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = (
        f"http://127.0.0.1:{server.server_address[1]}/cloudmail/callback/report"
    )
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture()
def receiver(receiver_server: Receiver) -> Receiver:
    receiver_server.requests.clear()
    receiver_server.answers.clear()
    return receiver_server


@pytest.fixture()
def lam(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    """The handler module, loaded by path after the environment points at moto."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "NO_PROXY": "127.0.0.1,localhost",
        "CLOUDMAIL_IDEMPOTENCY_TABLE": TABLE,
        "CLOUDMAIL_REPORT_SECRET": f"{SECRET} {OLD_SECRET}",
        "CLOUDMAIL_SAFETY_MARGIN_MS": "1000",
        "CLOUDMAIL_BACKOFF_BASE_MS": "5",
        "CLOUDMAIL_BACKOFF_MAX_MS": "20",
        "CLOUDMAIL_REPORT_TIMEOUT_SECONDS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "CLOUDMAIL_AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)

    # A clean moto for each test, then the table and the verified sender.
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    ).close()
    boto3.client("dynamodb").create_table(
        TableName=TABLE,
        AttributeDefinitions=[
            {"AttributeName": "idempotency_key", "AttributeType": "S"}
        ],
        KeySchema=[{"AttributeName": "idempotency_key", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    boto3.client("ses").verify_email_identity(EmailAddress=SENDER)

    spec = importlib.util.spec_from_file_location("lambda_handler", HANDLER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the module's string annotations through sys.modules.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


# -- helpers -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeContext:
    """Lambda context whose remaining time runs down with the clock."""

    def __init__(self, remaining_ms: float) -> None:
        self.deadline = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


def raw_mail(rid: int, sender: str = SENDER) -> bytes:
    return (
        f"From: News <{sender}>\r\nTo: user{rid}@example.com\r\n"
        f"Subject: Issue {rid}\r\nMessage-ID: <{rid}@example.com>\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\nHello {rid}\r\n"
    ).encode()


def unit_body(callback: str | None, rids: list[int], **raw: bytes) -> str:
    return json.dumps(
        {
            "v": 1,
            "job": 7,
            "batch": 3,
            "unit": "7-3-0",
            "callback": callback,
            "configuration_set": "cloudmail-events",
            "messages": [
                {
                    "rid": rid,
                    "key": f"cm-7-{rid}-1",
                    "to": [f"user{rid}@example.com"],
                    "from": f"News <{SENDER}>",
                    "raw": base64.b64encode(raw.get(str(rid), raw_mail(rid))).decode(),
                }
                for rid in rids
            ],
        }
    )


def sqs_event(*bodies: str) -> dict[str, Any]:
    return {
        "Records": [
            {"messageId": f"sqs-{n}", "body": body, "eventSource": "aws:sqs"}
            for n, body in enumerate(bodies)
        ]
    }


def sent_mails(moto_url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{moto_url}/moto-api/data.json") as response:
        return list(json.load(response)["ses"]["RawMessage"])


def verify_signature(headers: dict[str, str], body: bytes, keys: list[bytes]) -> bool:
    """Standard Webhooks check, as a receiver holding ``keys`` would make it."""
    webhook_id = headers["webhook-id"]
    timestamp = headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > 300:
        return False

    content = f"{webhook_id}.{timestamp}.".encode() + body
    expected = [
        base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
        for key in keys
    ]
    for signature in headers["webhook-signature"].split():
        version, _, value = signature.partition(",")
        if version == "v1" and any(hmac.compare_digest(value, e) for e in expected):
            return True
    return False


def sesv2_error(status: int, code: str, message: str) -> Callable[..., Any]:
    """A before-send hook answering like SES v2 does (rest-json error body)."""

    class Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **kwargs: Any) -> Iterator[bytes]:
            yield self.body

    def answer(request: Any, **kwargs: Any) -> AWSResponse:
        body = json.dumps({"message": message}).encode()
        headers = {"x-amzn-ErrorType": f"{code}:", "Content-Type": "application/json"}
        return AWSResponse(request.url, status, headers, Raw(body))

    return answer


def scripted(*answers: Callable[..., Any]) -> Callable[..., Any]:
    """A before-send hook giving ``answers`` in turn, then letting calls through."""
    calls = {"n": 0}

    def hook(request: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > len(answers):
            return None
        return answers[calls["n"] - 1](request, **kwargs)

    hook.calls = calls  # type: ignore[attr-defined]
    return hook


def sent_result(rid: int, message_id: str) -> dict[str, Any]:
    return {
        "rid": rid,
        "key": f"cm-7-{rid}-1",
        "status": "sent",
        "message_id": message_id,
        "error_code": None,
        "error": None,
    }


def ids_by_rid(moto_url: str) -> dict[int, str]:
    ids = {}
    for mail in sent_mails(moto_url):
        rid = int(mail["raw_data"].split("Message-ID: <", 1)[1].split("@", 1)[0])
        ids[rid] = mail["id"]
    return ids


# -- tests -------------------------------------------------------------------------


def test_every_message_is_sent_once_and_reported_signed(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    calls: list[dict[str, Any]] = []
    lam.sesv2.meta.events.register(
        "before-call.sesv2.SendEmail",
        lambda params, **kw: calls.append(json.loads(params["body"])),
    )

    answer = lam.handler(
        sqs_event(unit_body(receiver.url, [1, 2, 3])), FakeContext(60000)
    )

    assert answer == {"batchItemFailures": []}
    mails = sent_mails(moto_url)
    assert len(mails) == 3
    for rid, mail in zip([1, 2, 3], mails, strict=True):
        assert mail["raw_data"] == raw_mail(rid).decode()
        assert mail["source"] == SENDER
        # moto adds the To header's addresses to the envelope ones it was given.
        assert mail["destinations"] == [f"user{rid}@example.com"] * 2
    assert [c["EmailTags"] for c in calls] == [
        [
            {"Name": "cloudmail-job", "Value": "7"},
            {"Name": "cloudmail-batch", "Value": "3"},
            {"Name": "cloudmail-recipient", "Value": str(rid)},
        ]
        for rid in [1, 2, 3]
    ]
    assert {c["ConfigurationSetName"] for c in calls} == {"cloudmail-events"}
    assert [c["Destination"] for c in calls] == [
        {"ToAddresses": [f"user{rid}@example.com"]} for rid in [1, 2, 3]
    ]
    assert [base64.b64decode(c["Content"]["Raw"]["Data"]) for c in calls] == [
        raw_mail(rid) for rid in [1, 2, 3]
    ]
    assert all("FromEmailAddress" not in c for c in calls)

    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    assert verify_signature(headers, body, [SECRET_KEY])
    assert not verify_signature(headers, body, [OLD_SECRET_KEY])
    assert headers["content-type"] == "application/json"
    report = json.loads(body)
    assert headers["webhook-id"] == report["id"]
    assert report["id"].startswith("rep_")
    assert {k: v for k, v in report.items() if k != "id"} == {
        "v": 1,
        "source": "lambda",
        "job": 7,
        "batch": 3,
        "unit": "7-3-0",
        "results": [
            sent_result(rid, mail["id"])
            for rid, mail in zip([1, 2, 3], mails, strict=True)
        ],
    }


def test_redelivered_record_sends_nothing_twice_and_reports_again(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    event = sqs_event(unit_body(receiver.url, [1, 2, 3]))

    assert lam.handler(event, FakeContext(60000)) == {"batchItemFailures": []}
    assert lam.handler(event, FakeContext(60000)) == {"batchItemFailures": []}

    assert len(sent_mails(moto_url)) == 3
    first, second = receiver.reports()
    assert first["id"] != second["id"]
    assert second["results"] == first["results"]
    assert [r["message_id"] for r in second["results"]] == [
        m["id"] for m in sent_mails(moto_url)
    ]


def test_throttling_is_retried_and_sent_once(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    too_many = sesv2_error(429, "TooManyRequestsException", "Too many requests.")
    rate = sesv2_error(400, "Throttling", "Maximum sending rate exceeded.")
    hook = scripted(too_many, too_many, rate)
    lam.sesv2.meta.events.register("before-send.sesv2.SendEmail", hook)

    answer = lam.handler(sqs_event(unit_body(receiver.url, [1, 2])), FakeContext(60000))

    assert answer == {"batchItemFailures": []}
    # Two 429s and the rate-limit 400 for rid 1, then SES accepts: five calls.
    assert hook.calls["n"] == 5  # type: ignore[attr-defined]
    ids = ids_by_rid(moto_url)
    assert sorted(ids) == [1, 2]
    assert receiver.reports()[0]["results"] == [
        sent_result(1, ids[1]),
        sent_result(2, ids[2]),
    ]


def test_throttling_beyond_the_budget_hands_the_record_back(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    throttle = sesv2_error(429, "TooManyRequestsException", "Too many requests.")

    def throttle_after_first(request: Any, **kwargs: Any) -> Any:
        return throttle(request) if sent_mails(moto_url) else None

    lam.sesv2.meta.events.register("before-send.sesv2.SendEmail", throttle_after_first)
    event = sqs_event(unit_body(receiver.url, [1, 2, 3]), unit_body(receiver.url, [4]))

    started = time.monotonic()
    answer = lam.handler(event, FakeContext(1300))

    assert time.monotonic() - started < 1.5
    assert answer == {
        "batchItemFailures": [{"itemIdentifier": "sqs-0"}, {"itemIdentifier": "sqs-1"}]
    }
    ids = ids_by_rid(moto_url)
    assert sorted(ids) == [1]
    assert [r["results"] for r in receiver.reports()] == [[sent_result(1, ids[1])]]
    # The throttled key was released: only rid 1 holds a claim.
    items = boto3.client("dynamodb").scan(TableName=TABLE)["Items"]
    assert [i["idempotency_key"]["S"] for i in items] == ["cm-7-1-1"]

    lam.sesv2.meta.events.unregister(
        "before-send.sesv2.SendEmail", throttle_after_first
    )
    assert lam.handler(event, FakeContext(60000)) == {"batchItemFailures": []}

    ids = ids_by_rid(moto_url)
    assert sorted(ids) == [1, 2, 3, 4]
    assert len(sent_mails(moto_url)) == 4
    assert [r["results"] for r in receiver.reports()[1:]] == [
        [sent_result(rid, ids[rid]) for rid in [1, 2, 3]],
        [sent_result(4, ids[4])],
    ]


def test_rejected_recipient_is_reported_failed_and_the_others_sent(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    body = unit_body(receiver.url, [1, 2, 3], **{"2": raw_mail(2, "spam@example.com")})

    assert lam.handler(sqs_event(body), FakeContext(60000)) == {"batchItemFailures": []}

    ids = ids_by_rid(moto_url)
    assert sorted(ids) == [1, 3]
    rejected = {
        "rid": 2,
        "key": "cm-7-2-1",
        "status": "failed",
        "message_id": None,
        "error_code": "MessageRejected",
        "error": "Did not have authority to send from email spam@example.com",
    }
    expected = [sent_result(1, ids[1]), rejected, sent_result(3, ids[3])]
    assert receiver.reports()[0]["results"] == expected

    # The failure is final for this key: a redelivery repeats it without a new call.
    assert lam.handler(sqs_event(body), FakeContext(60000)) == {"batchItemFailures": []}
    assert len(sent_mails(moto_url)) == 2
    assert receiver.reports()[1]["results"] == expected


def test_paused_account_hands_the_whole_record_back(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    paused = sesv2_error(
        400, "SendingPausedException", "Sending is paused for this account."
    )
    lam.sesv2.meta.events.register("before-send.sesv2.SendEmail", paused)
    event = sqs_event(unit_body(receiver.url, [1, 2]), unit_body(receiver.url, [3]))

    answer = lam.handler(event, FakeContext(60000))

    assert answer == {
        "batchItemFailures": [{"itemIdentifier": "sqs-0"}, {"itemIdentifier": "sqs-1"}]
    }
    assert sent_mails(moto_url) == []
    assert receiver.requests == []
    assert boto3.client("dynamodb").scan(TableName=TABLE)["Items"] == []

    lam.sesv2.meta.events.unregister("before-send.sesv2.SendEmail", paused)
    assert lam.handler(event, FakeContext(60000)) == {"batchItemFailures": []}
    assert sorted(ids_by_rid(moto_url)) == [1, 2, 3]


def test_unreachable_callback_neither_raises_nor_resends(
    lam: ModuleType, moto_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"http://127.0.0.1:{_free_port()}/cloudmail/callback/report"

    with caplog.at_level(logging.ERROR, logger="lambda_handler"):
        answer = lam.handler(sqs_event(unit_body(closed, [1, 2])), FakeContext(60000))

    assert answer == {"batchItemFailures": []}
    ids = ids_by_rid(moto_url)
    assert sorted(ids) == [1, 2]
    assert any(
        "not delivered after 3 attempts" in r.getMessage() for r in caplog.records
    )

    # SQS redelivers (here with a reachable callback): reported from the store.
    event = sqs_event(unit_body(receiver.url, [1, 2]))
    assert lam.handler(event, FakeContext(60000)) == {"batchItemFailures": []}
    assert len(sent_mails(moto_url)) == 2
    assert receiver.reports()[0]["results"] == [
        sent_result(1, ids[1]),
        sent_result(2, ids[2]),
    ]


def test_failing_callback_is_retried_with_the_same_report(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    receiver.answers.extend([503, 500])

    answer = lam.handler(sqs_event(unit_body(receiver.url, [1])), FakeContext(60000))

    assert answer == {"batchItemFailures": []}
    assert len(receiver.requests) == 3
    assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1
    assert all(verify_signature(h, b, [SECRET_KEY]) for h, b in receiver.requests)
    assert len(sent_mails(moto_url)) == 1


def test_claim_left_by_a_crash_is_reported_ambiguous_and_not_sent(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    boto3.client("dynamodb").put_item(
        TableName=TABLE,
        Item={
            "idempotency_key": {"S": "cm-7-1-1"},
            "state": {"S": "sending"},
            "owner": {"S": "crashed-invocation"},
            "rid": {"N": "1"},
            "expires_at": {"N": str(int(time.time()) + 3600)},
        },
    )

    answer = lam.handler(sqs_event(unit_body(receiver.url, [1, 2])), FakeContext(60000))

    assert answer == {"batchItemFailures": []}
    ids = ids_by_rid(moto_url)
    assert sorted(ids) == [2]
    first, second = receiver.reports()[0]["results"]
    assert (first["status"], first["error_code"], first["message_id"]) == (
        "failed",
        "AmbiguousSend",
        None,
    )
    assert "not sent again under this key" in first["error"]
    assert second == sent_result(2, ids[2])


def test_lost_ses_answer_is_reported_ambiguous_and_never_retried(
    lam: ModuleType, moto_url: str, receiver: Receiver
) -> None:
    def lost(request: Any, **kwargs: Any) -> None:
        raise ReadTimeoutError(endpoint_url=request.url)

    hook = scripted(lost)
    lam.sesv2.meta.events.register("before-send.sesv2.SendEmail", hook)
    event = sqs_event(unit_body(receiver.url, [1, 2]))

    assert lam.handler(event, FakeContext(60000)) == {"batchItemFailures": []}
    assert lam.handler(event, FakeContext(60000)) == {"batchItemFailures": []}

    # One call for rid 1 (lost), one for rid 2; the redelivery calls SES no more.
    assert hook.calls["n"] == 2  # type: ignore[attr-defined]
    ids = ids_by_rid(moto_url)
    assert sorted(ids) == [2]
    for report in receiver.reports():
        first, second = report["results"]
        assert (first["status"], first["error_code"]) == ("failed", "AmbiguousSend")
        assert second == sent_result(2, ids[2])
    item = boto3.client("dynamodb").get_item(
        TableName=TABLE, Key={"idempotency_key": {"S": "cm-7-1-1"}}
    )["Item"]
    assert item["state"] == {"S": "sending"}


@pytest.mark.parametrize(
    "body",
    [
        "this is not JSON",
        json.dumps({"v": 2, "job": 7, "batch": 3, "unit": "7-3-0", "messages": []}),
        json.dumps({"v": 1, "job": 7, "batch": 3, "unit": "7-3-0", "messages": [{}]}),
    ],
    ids=["not-json", "unknown-version", "missing-fields"],
)
def test_malformed_body_is_dropped_with_an_error_log(
    lam: ModuleType,
    moto_url: str,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    body: str,
) -> None:
    event = sqs_event(body, unit_body(receiver.url, [1]))

    with caplog.at_level(logging.ERROR, logger="lambda_handler"):
        answer = lam.handler(event, FakeContext(60000))

    # Dropped, not retried; the record after it is processed normally.
    assert answer == {"batchItemFailures": []}
    assert sorted(ids_by_rid(moto_url)) == [1]
    assert len(receiver.requests) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("SQS message sqs-0: dropped, not a batch message v1: ")
