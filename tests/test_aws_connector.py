"""The AWS connector against moto's SQS server on 127.0.0.1.

Packing is checked on every ``SendMessageBatch`` call the connector makes (captured
with botocore's ``provide-client-params`` event), and on what the queue holds after.
``Failed`` entries are injected by a wrapped client that withholds some entries from
the real call and answers for them the way SQS does.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import CloudMail, manager
from cloudmail.connectors import BatchInfo, OutgoingMessage, aws
from cloudmail.connectors.aws import SQS_MAX_BYTES, AwsConnector
from cloudmail.devcloud import start_moto
from cloudmail.errors import ConfigurationError
from cloudmail.extension import DEFAULTS
from cloudmail.models import Batch, Recipient

REGION = "us-east-1"
CALLBACK = "http://127.0.0.1:9/cloudmail/callback/report"


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server, url = start_moto()
    yield url
    server.stop()


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials through boto3's own chain; nothing else from the host."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def sqs(moto_url: str) -> Any:
    return boto3.client("sqs", region_name=REGION, endpoint_url=moto_url)


@pytest.fixture()
def queue_url(sqs: Any) -> str:
    return sqs.create_queue(QueueName=f"cloudmail-{uuid.uuid4().hex[:12]}")["QueueUrl"]


@pytest.fixture()
def app_config(moto_url: str, queue_url: str) -> dict[str, object]:
    return {
        "CLOUDMAIL_PROVIDER": "aws",
        "CLOUDMAIL_AWS_QUEUE_URL": queue_url,
        "CLOUDMAIL_AWS_ENDPOINT_URL": moto_url,
        "CLOUDMAIL_AWS_REGION": REGION,
        "CLOUDMAIL_AWS_MAX_ATTEMPTS": 3,
        "CLOUDMAIL_CALLBACK_URL": CALLBACK,
    }


def bare_app(**config: Any) -> Flask:
    """Just the config the connector reads; no database."""
    app = Flask("bare")
    app.config.update(DEFAULTS)
    app.config.update(config)
    return app


def connector(moto_url: str, queue_url: str, **config: Any) -> AwsConnector:
    app = bare_app(
        CLOUDMAIL_AWS_QUEUE_URL=queue_url,
        CLOUDMAIL_AWS_ENDPOINT_URL=moto_url,
        CLOUDMAIL_AWS_REGION=REGION,
        **config,
    )
    instance = AwsConnector(app, {})
    instance.retry_base_seconds = 0.001
    return instance


def outgoing(rid: int, size: int, job: int = 7) -> OutgoingMessage:
    raw = (f"Subject: {rid}\r\n\r\n".encode() + b"x" * size)[:size]
    return OutgoingMessage(
        rid,
        f"cm-{job}-{rid}-1",
        (f"u{rid}@example.com",),
        "news@example.com",
        f"<{rid}@example.com>",
        raw,
    )


def batch_info(attempt: int = 1) -> BatchInfo:
    return BatchInfo(
        job_id=7, batch_id=3, number=1, attempt=attempt, callback_url=CALLBACK
    )


def capture_calls(instance: AwsConnector) -> list[list[dict[str, Any]]]:
    calls: list[list[dict[str, Any]]] = []
    instance.client.meta.events.register(
        "provide-client-params.sqs.SendMessageBatch",
        lambda params, **kw: calls.append([dict(e) for e in params["Entries"]]),
    )
    return calls


def drain(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Every message on the queue (received once, never deleted)."""
    found: list[dict[str, Any]] = []
    while True:
        got = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=300,
            MessageSystemAttributeNames=["All"],
        ).get("Messages", [])
        if not got:
            return found
        found.extend(got)


def queued_rids(messages: list[dict[str, Any]]) -> list[int]:
    return sorted(
        m["rid"] for msg in messages for m in json.loads(msg["Body"])["messages"]
    )


class FailingClient:
    """A wrapped SQS client: entries whose Id is in ``fail`` are answered ``Failed``.

    ``rounds`` says how many calls each listed entry fails before it goes through
    (None: always).
    """

    def __init__(
        self,
        real: Any,
        fail: set[str],
        rounds: int | None = 1,
        sender_fault: bool = False,
    ) -> None:
        self.real = real
        self.fail = fail
        self.rounds = rounds
        self.sender_fault = sender_fault
        self.seen: dict[str, int] = {}
        self.calls: list[list[str]] = []
        self.meta = real.meta

    def send_message_batch(
        self, QueueUrl: str, Entries: list[dict[str, Any]]
    ) -> dict[str, Any]:
        self.calls.append([e["Id"] for e in Entries])
        failed, through = [], []
        for entry in Entries:
            self.seen[entry["Id"]] = self.seen.get(entry["Id"], 0) + 1
            if entry["Id"] in self.fail and (
                self.rounds is None or self.seen[entry["Id"]] <= self.rounds
            ):
                failed.append(
                    {
                        "Id": entry["Id"],
                        "SenderFault": self.sender_fault,
                        "Code": "InternalError",
                        "Message": "We encountered an "
                        "internal error. Please try again.",
                    }
                )
            else:
                through.append(entry)
        answer = {"Successful": [], "Failed": failed}
        if through:
            answer["Successful"] = self.real.send_message_batch(
                QueueUrl=QueueUrl, Entries=through
            ).get("Successful", [])
        return answer


# -- packing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "count", "units", "calls"),
    [
        (1_000, 1200, 24, 3),  # 50 per unit, 10 units per call
        # 7 per unit (133 kB each as base64): each unit is near 1 MiB, so one per call
        (100_000, 40, 6, 6),
        (700_000, 3, 3, 3),  # one per unit (933 kB as base64), one unit per call
    ],
    ids=["1KB", "100KB", "700KB"],
)
def test_packing_never_exceeds_the_sqs_limits(
    moto_url: str,
    queue_url: str,
    sqs: Any,
    size: int,
    count: int,
    units: int,
    calls: int,
) -> None:
    instance = connector(moto_url, queue_url)
    seen = capture_calls(instance)

    handoff = instance.dispatch(
        batch_info(), (outgoing(rid, size) for rid in range(1, count + 1))
    )

    assert sorted(handoff.accepted) == list(range(1, count + 1))
    assert handoff.refused == {}
    assert (len(seen), sum(len(call) for call in seen)) == (calls, units)
    for call in seen:
        bodies = [len(e["MessageBody"].encode()) for e in call]
        assert len(call) <= 10
        assert sum(bodies) <= SQS_MAX_BYTES
        assert max(bodies) <= SQS_MAX_BYTES
        for entry in call:
            assert len(json.loads(entry["MessageBody"])["messages"]) <= 50
    messages = drain(sqs, queue_url)
    assert len(messages) == units
    assert queued_rids(messages) == list(range(1, count + 1))
    unit = json.loads(messages[0]["Body"])
    assert (unit["v"], unit["job"], unit["batch"], unit["callback"]) == (
        1,
        7,
        3,
        CALLBACK,
    )
    first = unit["messages"][0]
    assert base64.b64decode(first["raw"]) == outgoing(first["rid"], size).raw


def test_900kb_mail_fails_alone_as_message_too_large(
    app: Flask, db, sqs: Any, queue_url: str
) -> None:
    rows = [
        {"email": f"u{i}@example.com", "bio": "b" * (900_000 if i == 2 else 10)}
        for i in range(1, 4)
    ]
    job = manager.create_job(rows, subject="Hi", html="<p>{{ bio }}</p>")

    manager.start_job(job.id)

    too_large = db.session.execute(
        sa.select(Recipient.email, Recipient.reason, Recipient.error).where(
            Recipient.job_id == job.id, Recipient.status == "failed"
        )
    ).one()
    assert too_large.email == "u2@example.com"
    assert too_large.reason == "MessageTooLarge"
    assert too_large.error.endswith(
        "bytes as one SQS message; SQS takes at most 1,048,576. Make the mail or its "
        "attachments smaller and retry."
    )
    counters = manager.job_summary(job.id)["counters"]
    assert (counters["queued"], counters["failed"]) == (2, 1)
    messages = drain(sqs, queue_url)
    assert len(messages) == 1
    assert [m["to"] for m in json.loads(messages[0]["Body"])["messages"]] == [
        ["u1@example.com"],
        ["u3@example.com"],
    ]


# -- Failed entries and refusals ---------------------------------------------------


def test_failed_entries_are_retried_and_never_lost(
    moto_url: str, queue_url: str, sqs: Any
) -> None:
    instance = connector(moto_url, queue_url, CLOUDMAIL_AWS_MAX_ATTEMPTS=3)
    wrapped = FailingClient(instance.client, fail={"7-3-1", "7-3-4"}, rounds=2)
    instance._client = wrapped

    handoff = instance.dispatch(
        batch_info(), (outgoing(rid, 1000) for rid in range(1, 301))
    )

    # Round 1: six units, two failed; rounds 2 and 3: only those two again.
    assert wrapped.calls == [
        ["7-3-0", "7-3-1", "7-3-2", "7-3-3", "7-3-4", "7-3-5"],
        ["7-3-1", "7-3-4"],
        ["7-3-1", "7-3-4"],
    ]
    assert sorted(handoff.accepted) == list(range(1, 301))
    assert handoff.refused == {}
    messages = drain(sqs, queue_url)
    assert len(messages) == 6
    assert queued_rids(messages) == list(range(1, 301))


def test_sender_fault_is_not_retried(moto_url: str, queue_url: str, sqs: Any) -> None:
    instance = connector(moto_url, queue_url)
    wrapped = FailingClient(
        instance.client, fail={"7-3-0"}, rounds=None, sender_fault=True
    )
    instance._client = wrapped

    handoff = instance.dispatch(
        batch_info(), (outgoing(rid, 1000) for rid in range(1, 61))
    )

    assert wrapped.calls == [["7-3-0", "7-3-1"]]
    assert sorted(handoff.accepted) == list(range(51, 61))
    assert handoff.refused == {
        rid: "SQS refused the message: InternalError: We encountered an internal error. "
        "Please try again."
        for rid in range(1, 51)
    }


def test_unreachable_sqs_refuses_the_whole_batch(tmp_path: Path) -> None:
    instance = connector(
        "http://127.0.0.1:9",
        "http://127.0.0.1:9/123456789012/q",
        CLOUDMAIL_AWS_MAX_ATTEMPTS=1,
    )

    handoff = instance.dispatch(
        batch_info(), (outgoing(rid, 100_000) for rid in range(1, 151))
    )

    assert handoff.accepted == []
    assert sorted(handoff.refused) == list(range(1, 151))
    assert set(handoff.refused.values()) == {
        (
            "SQS refused SendMessageBatch: EndpointConnectionError: Could not connect "
            'to the endpoint URL: "http://127.0.0.1:9/"'
        )
    }


def test_unqueued_units_fail_the_batch_and_resume_sends_exactly_them(
    app: Flask, db, runner, sqs: Any, queue_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapped: list[FailingClient] = []
    real_client = aws.sqs_client

    def failing_client(config: dict[str, Any]) -> FailingClient:
        wrapped.append(
            FailingClient(
                real_client(config), fail={f"{job.id}-{batch_id}-1"}, rounds=None
            )
        )
        return wrapped[-1]

    monkeypatch.setattr(aws, "sqs_client", failing_client)
    monkeypatch.setattr(AwsConnector, "retry_base_seconds", 0.001)
    job = manager.create_job(
        ({"email": f"u{i}@example.com"} for i in range(120)),
        subject="Hi {{ email }}",
        html="<p>x</p>",
        batch_size=120,
    )
    manager.plan_batches(job.id)
    db.session.commit()
    batch_id = db.session.execute(
        sa.select(Batch.id).where(Batch.job_id == job.id)
    ).scalar_one()
    ids = (
        db.session.execute(
            sa.select(Recipient.id)
            .where(Recipient.job_id == job.id)
            .order_by(Recipient.id)
        )
        .scalars()
        .all()
    )

    manager.start_job(job.id)

    # Unit 1 (recipients 51 to 100) failed three rounds: only they went back to pending.
    assert (
        wrapped[0].calls
        == [[f"{job.id}-{batch_id}-{n}" for n in range(3)]]
        + [[f"{job.id}-{batch_id}-1"]] * 2
    )
    batch = db.session.execute(
        sa.select(Batch).where(Batch.id == batch_id)
    ).scalar_one()
    assert (batch.status, batch.last_error) == (
        "failed",
        "SQS failed the message 3 times (InternalError)",
    )
    pending = (
        db.session.execute(
            sa.select(Recipient.id)
            .where(Recipient.job_id == job.id, Recipient.status == "pending")
            .order_by(Recipient.id)
        )
        .scalars()
        .all()
    )
    assert pending == ids[50:100]
    summary = manager.job_summary(job.id)
    assert (
        summary["status"],
        summary["counters"]["queued"],
        summary["counters"]["pending"],
    ) == ("sending", 70, 50)
    first = drain(sqs, queue_url)
    assert queued_rids(first) == sorted(ids[:50] + ids[100:])

    # SQS recovers; resume hands the batch over again with exactly those 50.
    monkeypatch.setattr(aws, "sqs_client", real_client)
    result = runner.invoke(args=["cloudmail", "resume", str(job.id)])

    assert result.output == f"Job {job.id} resumed: 1 batches handed over.\n"
    again = drain(sqs, queue_url)
    assert len(again) == 1
    unit = json.loads(again[0]["Body"])
    assert [m["rid"] for m in unit["messages"]] == ids[50:100]
    assert {m["key"] for m in unit["messages"]} == {
        f"cm-{job.id}-{rid}-2" for rid in ids[50:100]
    }
    db.session.expire_all()
    batch = db.session.execute(
        sa.select(Batch).where(Batch.id == batch_id)
    ).scalar_one()
    assert (batch.status, batch.attempts, batch.last_error) == ("dispatched", 2, None)
    assert manager.job_summary(job.id)["counters"]["queued"] == 120


# -- FIFO ------------------------------------------------------------------------------


def test_fifo_queue_gets_a_group_per_job_and_a_deduplication_id_per_unit(
    moto_url: str, sqs: Any
) -> None:
    url = sqs.create_queue(
        QueueName=f"cm-{uuid.uuid4().hex[:10]}.fifo", Attributes={"FifoQueue": "true"}
    )["QueueUrl"]
    instance = connector(moto_url, url)
    assert instance.fifo

    instance.dispatch(batch_info(), (outgoing(rid, 1000) for rid in range(1, 121)))
    # The same attempt again (an RQ job run twice): SQS drops the duplicates.
    instance.dispatch(batch_info(), (outgoing(rid, 1000) for rid in range(1, 121)))
    # A new attempt of the batch is not a duplicate.
    instance.dispatch(
        batch_info(attempt=2), (outgoing(rid, 1000) for rid in range(1, 3))
    )

    messages = drain(sqs, url)
    fifo = [
        (m["Attributes"]["MessageGroupId"], m["Attributes"]["MessageDeduplicationId"])
        for m in messages
    ]
    assert fifo == [
        ("cloudmail-job-7", "7-3-0-a1"),
        ("cloudmail-job-7", "7-3-1-a1"),
        ("cloudmail-job-7", "7-3-2-a1"),
        ("cloudmail-job-7", "7-3-0-a2"),
    ]
    units = [json.loads(m["Body"])["unit"] for m in messages]
    assert units == ["7-3-0", "7-3-1", "7-3-2", "7-3-0"]


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"CLOUDMAIL_PROVIDER": "aws", "CLOUDMAIL_CALLBACK_URL": CALLBACK},
            (
                "CLOUDMAIL_PROVIDER is 'aws' but CLOUDMAIL_AWS_QUEUE_URL is not set; set it "
                "to the QueueUrl output of lambda/template.yaml."
            ),
        ),
        (
            {
                "CLOUDMAIL_PROVIDER": "aws",
                "CLOUDMAIL_AWS_QUEUE_URL": "https://sqs.x/1/q",
            },
            (
                "CLOUDMAIL_PROVIDER is 'aws' but CLOUDMAIL_CALLBACK_URL is not set; set it "
                "to 'https://<host>/cloudmail/callback/report'."
            ),
        ),
        (
            {"CLOUDMAIL_AWS_QUEUE_URL": "cloudmail"},
            (
                "CLOUDMAIL_AWS_QUEUE_URL is 'cloudmail'; it must be an http(s) URL such as "
                "'https://sqs.eu-west-1.amazonaws.com/123456789012/cloudmail'."
            ),
        ),
        (
            {"CLOUDMAIL_AWS_REGION": "Ireland"},
            "CLOUDMAIL_AWS_REGION is 'Ireland'; write a region code such as 'eu-west-1'.",
        ),
        (
            {"CLOUDMAIL_AWS_CONFIGURATION_SET": "events set"},
            (
                "CLOUDMAIL_AWS_CONFIGURATION_SET is 'events set'; an SES configuration set "
                "name has 1 to 64 letters, digits, '_' or '-'."
            ),
        ),
        (
            {"CLOUDMAIL_AWS_MAX_ATTEMPTS": 0},
            "CLOUDMAIL_AWS_MAX_ATTEMPTS is 0; it must be a whole number of at least 1.",
        ),
    ],
    ids=[
        "no-queue",
        "no-callback",
        "queue-not-url",
        "region",
        "configuration-set",
        "attempts",
    ],
)
def test_bad_aws_settings_fail_at_start_up(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    app = Flask("host", instance_path=str(tmp_path))
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://", **config)

    with pytest.raises(ConfigurationError) as info:
        CloudMail(app)

    assert str(info.value) == message


def test_region_comes_from_the_queue_url() -> None:
    assert (
        aws.region_from_queue_url("https://sqs.eu-west-1.amazonaws.com/1/q")
        == "eu-west-1"
    )
    assert aws.region_from_queue_url("http://127.0.0.1:4566/123456789012/q") is None
    client = aws.sqs_client(
        {
            **DEFAULTS,
            "CLOUDMAIL_AWS_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/1/q",
        }
    )
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 8}
