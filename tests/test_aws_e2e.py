"""The whole AWS path on loopback, with real parts only.

CSV -> job -> Redis -> RQ worker -> AwsConnector -> moto SQS (ThreadedMotoServer) ->
:class:`cloudmail.devcloud.SqsPoller` -> ``lambda/lambda_handler.py`` -> moto SES ->
signed report -> the app served by werkzeug on 127.0.0.1 -> every recipient ``sent``.

Faults are injected where they happen in production: SES answers through a
``before-send`` hook on the handler's own client, the callback by not listening.
"""

from __future__ import annotations

import base64
import csv
import itertools
import json
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from botocore.awsrequest import AWSResponse
from conftest import REDIS_URL, ROOT, SHARED
from flask import Flask
from rq import SimpleWorker
from werkzeug.serving import make_server

from cloudmail import dispatch, manager, tasks
from cloudmail.devcloud import (
    DevResources,
    SqsPoller,
    load_handler,
    provision,
    start_moto,
)
from cloudmail.extension import get_state
from cloudmail.models import Batch, Recipient, utcnow

REGION = "us-east-1"
SENDER = "news@example.com"
SECRET = "whsec_" + base64.b64encode(b"e2e-secret-e2e-secret-e2e-secret").decode()
VISIBILITY = 2  # seconds before a handed-back record is delivered again
SUBJECT = "Welcome, {{ firstname }}"
HTML = "<p>Hi {{ name }} ({{ username }})</p>"


# -- the cloud and the app ---------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server, url = start_moto()
    yield url
    server.stop()


@pytest.fixture()
def cloud(
    moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> DevResources:
    """A clean moto with the queue, table and sender; the Lambda's environment."""
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    ).close()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "NO_PROXY": "127.0.0.1,localhost",
        "CLOUDMAIL_AWS_ENDPOINT_URL": moto_url,
        "CLOUDMAIL_REPORT_SECRET": SECRET,
        "CLOUDMAIL_SAFETY_MARGIN_MS": "1000",
        "CLOUDMAIL_BACKOFF_BASE_MS": "5",
        "CLOUDMAIL_BACKOFF_MAX_MS": "20",
        "CLOUDMAIL_REPORT_TIMEOUT_SECONDS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)

    resources = provision(
        moto_url,
        region=REGION,
        queue_name=f"cm-e2e-{time.time_ns()}",
        table="cm-e2e-idempotency",
        sender=SENDER,
        visibility_timeout=VISIBILITY,
        # A slow machine may hand records back often; none may be
        # dead-lettered here.
        max_receive_count=1000,
    )
    monkeypatch.setenv("CLOUDMAIL_IDEMPOTENCY_TABLE", resources.table)
    return resources


@pytest.fixture()
def callback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def app_config(cloud: DevResources, callback_port: int) -> dict[str, object]:
    return {
        "CLOUDMAIL_PROVIDER": "aws",
        "CLOUDMAIL_AWS_QUEUE_URL": cloud.queue_url,
        "CLOUDMAIL_AWS_ENDPOINT_URL": cloud.endpoint_url,
        "CLOUDMAIL_AWS_REGION": REGION,
        "CLOUDMAIL_CALLBACK_URL": f"http://127.0.0.1:{callback_port}/cloudmail/callback/report",
        "CLOUDMAIL_REPORT_SECRETS": [SECRET],
        "CLOUDMAIL_REDIS_URL": REDIS_URL,
        "CLOUDMAIL_BATCH_SIZE": 100,
        "CLOUDMAIL_SENDER": f"Cloudmail Tests <{SENDER}>",
    }


@pytest.fixture()
def serve(app: Flask, callback_port: int) -> Iterator[Callable[[], None]]:
    """Start the app on the callback port (a test may call it late, or never)."""
    servers = []

    def start() -> None:
        server = make_server("127.0.0.1", callback_port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def lam(cloud: DevResources, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.delitem(sys.modules, "lambda_handler", raising=False)
    return load_handler(ROOT / "lambda" / "lambda_handler.py", {})


@pytest.fixture()
def bodies() -> list[str]:
    """Every SQS body the handler was given, in order."""
    return []


@pytest.fixture()
def invocation_timeout() -> float:
    """Seconds an emulated Lambda invocation may take (a test may shorten it)."""
    return 30


@pytest.fixture()
def poller(
    cloud: DevResources, lam: ModuleType, bodies: list[str], invocation_timeout: float
) -> Iterator[SqsPoller]:
    def handler(event: dict[str, Any], context: Any) -> Any:
        bodies.extend(record["body"] for record in event["Records"])
        return lam.handler(event, context)

    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=cloud.endpoint_url)
    poller = SqsPoller(
        sqs, cloud.queue_url, handler, region=REGION, timeout_seconds=invocation_timeout
    ).start()
    yield poller
    poller.stop()


@pytest.fixture()
def recipients_csv(tmp_path: Path) -> Path:
    """The shared sample's header and first 300 rows (records, not lines)."""
    with open(SHARED / "moodle_users_5k.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(itertools.islice(csv.reader(f), 301))
    path = tmp_path / "moodle_300.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


# -- helpers -----------------------------------------------------------------------


def run_worker(app: Flask) -> None:
    queue = get_state(app).queue(app)
    tasks.worker_app = app
    try:
        SimpleWorker([queue], connection=queue.connection).work(burst=True)
    finally:
        queue.delete(delete_jobs=True)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def job_status(db, job_id: int) -> str:
    status = manager.job_summary(job_id)["status"]
    db.session.rollback()  # end the read transaction, SQLite writers wait on it
    return status


def sent_mails(moto_url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{moto_url}/moto-api/data.json") as response:
        return list(json.load(response)["ses"]["RawMessage"])


def mails_by_address(moto_url: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for mail in sent_mails(moto_url):
        parsed = BytesParser(policy=policy.default).parsebytes(
            mail["raw_data"].encode()
        )
        found.setdefault(parsed["To"].addresses[0].addr_spec, []).append(
            {"id": mail["id"], "mail": parsed}
        )
    return found


def recipients(db, job_id: int) -> list[Any]:
    rows = db.session.execute(
        sa.select(
            Recipient.id,
            Recipient.email,
            Recipient.status,
            Recipient.reason,
            Recipient.error,
            Recipient.variables,
            Recipient.provider_message_id,
        )
        .where(
            Recipient.job_id == job_id,
            Recipient.status.in_(("queued", "sent", "failed")),
        )
        .order_by(Recipient.id)
    ).all()
    db.session.rollback()
    return rows


def queue_is_drained(cloud: DevResources, poller: SqsPoller) -> bool:
    attributes = poller.sqs.get_queue_attributes(
        QueueUrl=cloud.queue_url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
        ],
    )["Attributes"]
    return all(value == "0" for value in attributes.values())


def redeliver(cloud: DevResources, poller: SqsPoller, bodies: list[str]) -> None:
    """Put the given bodies on the queue again, as SQS's at-least-once delivery may."""
    for start in range(0, len(bodies), 10):
        poller.sqs.send_message_batch(
            QueueUrl=cloud.queue_url,
            Entries=[
                {"Id": str(n), "MessageBody": body}
                for n, body in enumerate(bodies[start : start + 10])
            ],
        )


def ses_answer(status: int, code: str, message: str) -> Callable[..., AWSResponse]:
    """A before-send answer shaped like SES v2's rest-json errors."""

    class Raw:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **kwargs: Any) -> Iterator[bytes]:
            yield self.body

    def answer(request: Any) -> AWSResponse:
        body = json.dumps({"message": message}).encode()
        headers = {"x-amzn-ErrorType": f"{code}:", "Content-Type": "application/json"}
        return AWSResponse(request.url, status, headers, Raw(body))

    return answer


def recipient_of(request: Any) -> int:
    tags = json.loads(request.body)["EmailTags"]
    return int(next(t["Value"] for t in tags if t["Name"] == "cloudmail-recipient"))


# -- tests -------------------------------------------------------------------------


def test_a_job_goes_the_whole_aws_path_and_redelivery_sends_nothing_twice(
    app: Flask,
    db,
    cloud: DevResources,
    serve: Callable[[], None],
    poller: SqsPoller,
    bodies: list[str],
    recipients_csv: Path,
) -> None:
    serve()
    job = manager.create_job(recipients_csv, subject=SUBJECT, html=HTML)
    valid = job.pending

    assert manager.start_job(job.id) == 3
    run_worker(app)
    wait_for(lambda: job_status(db, job.id) == "done", "the job to finish")

    # Every valid recipient is sent with its SES message id, and got one mail.
    summary = manager.job_summary(job.id)
    # Eight of the 300 rows are rejected on import: 4 duplicates, 2 empty, 2 malformed.
    assert valid == 292
    assert (summary["counters"]["sent"], summary["counters"]["failed"]) == (valid, 0)
    mails = mails_by_address(cloud.endpoint_url)
    rows = recipients(db, job.id)
    assert len(rows) == len(mails) == len(sent_mails(cloud.endpoint_url)) == valid
    for row in rows:
        (got,) = mails[row.email]
        variables = json.loads(row.variables)
        assert (row.status, row.provider_message_id) == ("sent", got["id"])
        assert got["mail"]["Subject"] == f"Welcome, {variables['firstname']}"
        assert got["mail"]["From"] == f"Cloudmail Tests <{SENDER}>"
        html = got["mail"].get_body(("html",)).get_content()
        assert f"({variables['username']})" in html
    # Six units went through SQS: 50 + 49, 50 + 48 and 50 + 45 (batches of 100 rows).
    assert len(bodies) == 6
    assert poller.stats.handed_back == 0
    assert sorted(
        rid
        for body in bodies
        for rid in (m["rid"] for m in json.loads(body)["messages"])
    ) == [r.id for r in rows]

    # SQS delivers every unit once more: nothing is sent again, nothing changes.
    redeliver(cloud, poller, list(bodies))
    wait_for(
        lambda: len(bodies) == 12 and queue_is_drained(cloud, poller),
        "the redelivered units",
    )
    assert len(sent_mails(cloud.endpoint_url)) == valid
    assert recipients(db, job.id) == rows


@pytest.mark.parametrize("invocation_timeout", [3])
def test_ses_throttling_is_retried_and_a_rejected_recipient_fails(
    app: Flask,
    db,
    cloud: DevResources,
    serve: Callable[[], None],
    poller: SqsPoller,
    lam: ModuleType,
    invocation_timeout: float,
) -> None:
    serve()
    people = [
        {
            "email": f"person{i}@example.com",
            "name": f"Person {i}",
            "firstname": "P",
            "username": f"p{i}",
        }
        for i in range(120)
    ]
    job = manager.create_job(people, subject=SUBJECT, html=HTML)
    ids = (
        db.session.execute(
            sa.select(Recipient.id)
            .where(Recipient.job_id == job.id)
            .order_by(Recipient.id)
        )
        .scalars()
        .all()
    )
    briefly, long, rejected = set(ids[::7]), ids[60], ids[30]
    throttle = ses_answer(429, "TooManyRequestsException", "Too many requests.")
    rate = ses_answer(400, "Throttling", "Maximum sending rate exceeded.")
    refuse = ses_answer(
        400,
        "MessageRejected",
        "Email address is on the account-level suppression list.",
    )
    calls: dict[int, int] = {}
    long_until: list[float] = []

    def ses(request: Any, **kwargs: Any) -> AWSResponse | None:
        rid = recipient_of(request)
        calls[rid] = calls.get(rid, 0) + 1
        if rid == rejected:
            return refuse(request)
        if rid in briefly and calls[rid] <= 2:
            return (throttle if calls[rid] == 1 else rate)(request)
        if rid == long:
            # Throttled past one invocation's budget: its record goes back to SQS.
            long_until[:] = long_until or [time.monotonic() + invocation_timeout]
            if time.monotonic() < long_until[0]:
                return throttle(request)
        return None

    lam.sesv2.meta.events.register("before-send.sesv2.SendEmail", ses)
    manager.start_job(job.id)
    run_worker(app)
    wait_for(lambda: job_status(db, job.id) == "done", "the job to finish")

    summary = manager.job_summary(job.id)
    assert (summary["counters"]["sent"], summary["counters"]["failed"]) == (119, 1)
    assert summary["failed_by_reason"] == {"MessageRejected": 1}
    rows = {row.id: row for row in recipients(db, job.id)}
    assert (rows[rejected].status, rows[rejected].reason, rows[rejected].error) == (
        "failed",
        "MessageRejected",
        "Email address is on the account-level suppression list.",
    )
    mails = mails_by_address(cloud.endpoint_url)
    assert len(sent_mails(cloud.endpoint_url)) == 119
    for rid, row in rows.items():
        if rid != rejected:
            assert [m["id"] for m in mails[row.email]] == [row.provider_message_id]
    assert all(calls[rid] == 3 for rid in briefly - {rejected, long})
    assert calls[long] > 3
    assert poller.stats.handed_back >= 1


def test_unreachable_callback_sends_once_and_redelivery_recovers_the_report(
    app: Flask,
    db,
    cloud: DevResources,
    serve: Callable[[], None],
    poller: SqsPoller,
    bodies: list[str],
) -> None:
    people = [
        {
            "email": f"person{i}@example.com",
            "name": f"Person {i}",
            "firstname": "P",
            "username": f"p{i}",
        }
        for i in range(80)
    ]
    job = manager.create_job(people, subject=SUBJECT, html=HTML)

    manager.start_job(job.id)
    run_worker(app)
    wait_for(lambda: len(bodies) == 2 and queue_is_drained(cloud, poller), "the units")

    # SES took every mail, but cloudmail heard nothing: the recipients wait, queued.
    assert len(sent_mails(cloud.endpoint_url)) == 80
    assert {row.status for row in recipients(db, job.id)} == {"queued"}
    assert job_status(db, job.id) == "sending"

    # The callback is back and SQS delivers the units again: reported, not resent.
    serve()
    redeliver(cloud, poller, list(bodies))
    wait_for(lambda: job_status(db, job.id) == "done", "the job to finish")
    mails = mails_by_address(cloud.endpoint_url)
    assert len(sent_mails(cloud.endpoint_url)) == 80
    for row in recipients(db, job.id):
        assert (row.status, row.provider_message_id) == (
            "sent",
            mails[row.email][0]["id"],
        )


def test_unreachable_callback_then_recovery_re_reports_without_resending(
    app: Flask,
    db,
    cloud: DevResources,
    serve: Callable[[], None],
    poller: SqsPoller,
    bodies: list[str],
) -> None:
    people = [
        {
            "email": f"r{i}@example.com",
            "name": f"R {i}",
            "firstname": "R",
            "username": f"r{i}",
        }
        for i in range(60)
    ]
    job = manager.create_job(people, subject=SUBJECT, html=HTML)
    manager.start_job(job.id)
    run_worker(app)
    wait_for(lambda: len(bodies) >= 2 and queue_is_drained(cloud, poller), "the units")
    assert {row.status for row in recipients(db, job.id)} == {"queued"}

    # No redelivery this time: an admin recovers the stuck batch once the callback is
    # back. The same keys go to SQS again; the Lambda re-reports, SES sends nothing.
    serve()
    db.session.execute(
        sa.update(Batch)
        .where(Batch.job_id == job.id)
        .values(dispatched_at=utcnow() - timedelta(hours=1))
    )
    db.session.commit()
    assert len(dispatch.recover_stale()) == 1
    wait_for(lambda: job_status(db, job.id) == "done", "the job to finish")

    assert len(sent_mails(cloud.endpoint_url)) == 60
    assert {row.status for row in recipients(db, job.id)} == {"sent"}
