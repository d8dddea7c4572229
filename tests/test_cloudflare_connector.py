"""The Cloudflare connector against a local stand-in for the Worker's ``/enqueue``.

The stand-in is a real HTTP server on 127.0.0.1 that answers from a script (202, 503,
500, 400, a dropped connection, a slow answer), so packing, signing, retries and the
hand-over outcome are checked over the wire. The signature check is written here from
``docs/message-schema.md``, not borrowed from cloudmail, so a signing mistake cannot
check itself. The Worker itself is exercised in ``test_cloudflare_e2e.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from cloudmail import manager
from cloudmail.connectors import BatchInfo, OutgoingMessage, get_connector
from cloudmail.connectors.cloudflare import CloudflareConnector
from cloudmail.errors import ConfigurationError, DispatchError
from cloudmail.extension import validate_config
from cloudmail.models import Batch, Recipient

KEY = b"k" * 32
OLD_KEY = b"o" * 32
SECRET = "whsec_" + base64.b64encode(KEY).decode()
OLD_SECRET = "whsec_" + base64.b64encode(OLD_KEY).decode()
BATCH = BatchInfo(
    job_id=7,
    batch_id=3,
    number=0,
    attempt=1,
    callback_url="http://127.0.0.1:9/cloudmail/callback/report",
)


# -- the stand-in Worker -----------------------------------------------------------


class FakeWorker:
    """Records every POST; answers with the scripted replies, then 202."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.script: list[Any] = []
        self.url = ""

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]

    def accepted_rids(self) -> list[int]:
        rids = []
        for body in self.bodies():
            for unit in body["units"]:
                rids += [m["rid"] for m in unit["messages"]]
        return rids


@pytest.fixture(scope="module")
def worker_server() -> Iterator[FakeWorker]:
    worker = FakeWorker()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            worker.requests.append(
                ({k.lower(): v for k, v in self.headers.items()}, body)
            )
            reply = worker.script.pop(0) if worker.script else 202
            if reply == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if reply == "slow":
                time.sleep(1.0)
                reply = 202
            status, answer = (reply, {}) if isinstance(reply, int) else reply
            if status == 202:
                answer = {"v": 1, "units": len(json.loads(body)["units"])}
            data = json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left: what the slow answer is for

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield worker
    server.shutdown()
    server.server_close()


@pytest.fixture()
def worker(worker_server: FakeWorker) -> FakeWorker:
    worker_server.requests.clear()
    worker_server.script.clear()
    return worker_server


def bare_app(url: str, **config: Any) -> Flask:
    """An app holding only the connector's settings (no database needed)."""
    app = Flask("cloudflare-tests")
    app.config.update(
        CLOUDMAIL_CLOUDFLARE_WORKER_URL=url,
        CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET=SECRET,
        CLOUDMAIL_CLOUDFLARE_TIMEOUT=5,
        CLOUDMAIL_CLOUDFLARE_MAX_ATTEMPTS=4,
        CLOUDMAIL_CLOUDFLARE_BACKOFF=0.5,
        CLOUDMAIL_CLOUDFLARE_BACKOFF_MAX=3,
    )
    app.config.update(config)
    return app


def connector(
    app: Flask, sleeps: list[float] | None = None, **limits: int
) -> CloudflareConnector:
    subclass = type("Limited", (CloudflareConnector,), limits)
    made = subclass(app, {})
    made.sleep = sleeps.append if sleeps is not None else lambda _: None  # type: ignore[assignment]
    made.jitter = lambda low, high: high  # the longest wait, so the schedule is exact
    return made


def message(rid: int, size: int = 200) -> OutgoingMessage:
    raw = (
        f"From: news@example.com\r\nTo: r{rid}@example.com\r\n\r\n".encode()
        + b"x" * size
    )
    return OutgoingMessage(
        recipient_id=rid,
        key=f"cm-7-{rid}-1",
        to=(f"r{rid}@example.com",),
        sender="News <news@example.com>",
        message_id=f"<{rid}@example.com>",
        raw=raw,
    )


def signature_ok(headers: dict[str, str], body: bytes, key: bytes) -> bool:
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(
        hmac.new(key, content, hashlib.sha256).digest()
    ).decode()
    return any(
        part.partition(",")[0] == "v1"
        and hmac.compare_digest(part.partition(",")[2], expected)
        for part in headers["webhook-signature"].split()
    )


# -- packing and limits ------------------------------------------------------------


def test_units_hold_at_most_50_recipients_and_one_request_carries_them(
    worker: FakeWorker,
) -> None:
    handoff = connector(bare_app(worker.url)).dispatch(
        BATCH, [message(r) for r in range(1, 121)]
    )

    assert handoff.accepted == list(range(1, 121))
    assert handoff.refused == {}
    [body] = worker.bodies()
    assert (body["v"], body["job"], body["batch"]) == (1, 7, 3)
    assert [len(u["messages"]) for u in body["units"]] == [50, 50, 20]
    assert [u["unit"] for u in body["units"]] == ["7-3-0", "7-3-1", "7-3-2"]
    assert body["units"][0]["callback"] == BATCH.callback_url
    first = body["units"][0]["messages"][0]
    assert first == {
        "rid": 1,
        "key": "cm-7-1-1",
        "to": ["r1@example.com"],
        "from": "News <news@example.com>",
        "raw": base64.b64encode(message(1).raw).decode(),
    }


def test_units_stay_under_the_queue_message_limit(worker: FakeWorker) -> None:
    # 40,000 raw bytes are ~53,400 as base64: two fit in 127,000 bytes, three do not.
    handoff = connector(bare_app(worker.url)).dispatch(
        BATCH, [message(r, 40_000) for r in range(1, 6)]
    )

    assert handoff.accepted == [1, 2, 3, 4, 5]
    [body] = worker.requests
    units = json.loads(body[1])["units"]
    assert [len(u["messages"]) for u in units] == [2, 2, 1]
    for unit in units:
        assert len(json.dumps(unit, separators=(",", ":")).encode()) <= 127_000


def test_a_batch_over_the_request_limit_goes_in_several_requests(
    worker: FakeWorker,
) -> None:
    made = connector(
        bare_app(worker.url), max_unit_bytes=3_000, max_request_bytes=10_000
    )

    handoff = made.dispatch(BATCH, [message(r, 1_000) for r in range(1, 31)])

    assert handoff.accepted == list(range(1, 31))
    assert len(worker.requests) > 1
    assert worker.accepted_rids() == list(range(1, 31))
    for _, body in worker.requests:
        assert len(body) <= 10_000
        for unit in json.loads(body)["units"]:
            assert len(json.dumps(unit, separators=(",", ":")).encode()) <= 3_000
    # Unit numbers run on across requests: they are unique within the batch.
    ids = [u["unit"] for b in worker.bodies() for u in b["units"]]
    assert ids == [f"7-3-{n}" for n in range(len(ids))]


# -- signing -----------------------------------------------------------------------


def test_requests_are_signed_with_every_configured_secret(worker: FakeWorker) -> None:
    app = bare_app(
        worker.url, CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET=f"{SECRET} {OLD_SECRET}"
    )

    connector(app).dispatch(BATCH, [message(1)])

    [(headers, body)] = worker.requests
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"].startswith("enq_")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 10
    assert len(headers["webhook-signature"].split()) == 2
    assert signature_ok(headers, body, KEY)
    assert signature_ok(headers, body, OLD_KEY)
    assert not signature_ok(headers, body, b"x" * 32)


# -- retries -----------------------------------------------------------------------


def test_transient_failures_are_retried_with_the_same_body_and_backoff(
    worker: FakeWorker,
) -> None:
    worker.script = [
        (503, {"error": "queue_unavailable", "enqueued_units": 0}),
        500,
        "drop",
    ]
    sleeps: list[float] = []

    handoff = connector(bare_app(worker.url), sleeps).dispatch(
        BATCH, [message(1), message(2)]
    )

    assert handoff.accepted == [1, 2]
    assert handoff.refused == {}
    assert len(worker.requests) == 4
    assert len({body for _, body in worker.requests}) == 1
    assert len({headers["webhook-id"] for headers, _ in worker.requests}) == 1
    assert all(signature_ok(headers, body, KEY) for headers, body in worker.requests)
    assert sleeps == [0.5, 1.0, 2.0]


def test_backoff_is_capped_and_jittered_within_half_to_full_delay() -> None:
    made = CloudflareConnector(
        bare_app("http://127.0.0.1:9", CLOUDMAIL_CLOUDFLARE_BACKOFF=1), {}
    )

    waits = [made._backoff(n, None) for n in range(1, 8) for _ in range(20)]

    for n in range(1, 8):
        delay = min(3, 2 ** (n - 1))
        chunk = waits[(n - 1) * 20 : n * 20]
        assert all(delay / 2 <= w <= delay for w in chunk)
    assert made._backoff(1, retry_after=2) == pytest.approx(2)
    assert made._backoff(1, retry_after=60) == pytest.approx(3)


def test_a_slow_worker_is_retried_after_the_timeout(worker: FakeWorker) -> None:
    worker.script = ["slow"]
    app = bare_app(worker.url, CLOUDMAIL_CLOUDFLARE_TIMEOUT=0.3)

    handoff = connector(app).dispatch(BATCH, [message(1)])

    assert handoff.accepted == [1]
    assert len(worker.requests) == 2


def test_an_unreachable_worker_refuses_every_recipient_after_bounded_tries() -> None:
    sleeps: list[float] = []
    made = connector(bare_app("http://127.0.0.1:9"), sleeps)

    handoff = made.dispatch(BATCH, [message(1), message(2)])

    assert handoff.accepted == []
    assert sorted(handoff.refused) == [1, 2]
    assert handoff.refused[1].startswith(
        "The Worker at http://127.0.0.1:9/enqueue could not be reached"
    )
    assert sleeps == [0.5, 1.0, 2.0]


def test_a_refusal_is_not_retried(worker: FakeWorker) -> None:
    worker.script = [
        (403, {"error": "bad_signature", "reason": "No webhook-signature matches."})
    ]

    handoff = connector(bare_app(worker.url)).dispatch(BATCH, [message(1)])

    assert len(worker.requests) == 1
    assert handoff.refused == {
        1: "The Worker answered 403 bad_signature: No webhook-signature matches."
    }


def test_units_a_503_says_were_enqueued_count_as_accepted(worker: FakeWorker) -> None:
    busy = (
        503,
        {
            "error": "queue_unavailable",
            "reason": "The queue refused the units.",
            "enqueued_units": 1,
        },
    )
    worker.script = [busy] * 4

    handoff = connector(bare_app(worker.url)).dispatch(
        BATCH, [message(r) for r in range(1, 61)]
    )

    assert len(worker.requests) == 4
    assert handoff.accepted == list(range(1, 51))
    assert sorted(handoff.refused) == list(range(51, 61))
    assert handoff.refused[51] == (
        "The Worker answered 503 queue_unavailable: The queue refused the units."
    )


def test_requests_after_one_that_failed_for_good_are_not_sent(
    worker: FakeWorker,
) -> None:
    worker.script = [202, (400, {"error": "malformed", "reason": "bad"})]
    made = connector(
        bare_app(worker.url), max_unit_bytes=3_000, max_request_bytes=5_000
    )

    handoff = made.dispatch(BATCH, [message(r, 1_000) for r in range(1, 21)])

    assert len(worker.requests) == 2
    first = [m["rid"] for u in worker.bodies()[0]["units"] for m in u["messages"]]
    assert handoff.accepted == first
    assert sorted(handoff.refused) == [r for r in range(1, 21) if r not in first]


def test_missing_settings_fail_the_batch_with_a_dispatch_error() -> None:
    app = bare_app("http://127.0.0.1:9", CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET=None)

    with pytest.raises(DispatchError, match="CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET"):
        CloudflareConnector(app, {}).dispatch(BATCH, [message(1)])


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (
            {"CLOUDMAIL_PROVIDER": "cloudflare"},
            "CLOUDMAIL_PROVIDER is 'cloudflare' but",
        ),
        (
            {"CLOUDMAIL_CLOUDFLARE_WORKER_URL": "worker.example"},
            "must be the Worker's absolute URL",
        ),
        (
            {"CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET": "hunter2"},
            "not 'whsec_' followed by base64",
        ),
        (
            {"CLOUDMAIL_CLOUDFLARE_MAX_ATTEMPTS": 0},
            "CLOUDMAIL_CLOUDFLARE_MAX_ATTEMPTS is 0",
        ),
        (
            {"CLOUDMAIL_CLOUDFLARE_TIMEOUT": "30"},
            "CLOUDMAIL_CLOUDFLARE_TIMEOUT is '30'",
        ),
    ],
)
def test_unusable_settings_are_refused_at_start_up(
    config: dict[str, Any], error: str
) -> None:
    from cloudmail.extension import DEFAULTS

    with pytest.raises(ConfigurationError, match=error) as info:
        validate_config({**DEFAULTS, **config})
    assert "hunter2" not in str(info.value)


# -- with the database: refused units, oversized messages --------------------------


@pytest.fixture
def app_config(worker_server: FakeWorker) -> dict[str, object]:
    return {
        "CLOUDMAIL_PROVIDER": "cloudflare",
        "CLOUDMAIL_CLOUDFLARE_WORKER_URL": worker_server.url,
        "CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET": SECRET,
        "CLOUDMAIL_CLOUDFLARE_MAX_ATTEMPTS": 2,
        "CLOUDMAIL_CLOUDFLARE_BACKOFF": 0.01,
        "CLOUDMAIL_CALLBACK_URL": "http://127.0.0.1:9/cloudmail/callback/report",
    }


def _statuses(db, job_id: int) -> dict[int, tuple[str, int]]:
    rows = db.session.execute(
        sa.select(Recipient.id, Recipient.status, Recipient.attempts).where(
            Recipient.job_id == job_id
        )
    ).all()
    return {row.id: (row.status, row.attempts) for row in rows}


def test_refused_units_go_back_to_pending_and_a_retry_sends_exactly_those(
    app: Flask, db, worker: FakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CloudflareConnector, "max_request_bytes", 40_000)
    job = manager.create_job(
        ({"email": f"r{i}@example.com", "name": f"R {i}"} for i in range(120)),
        subject="Hi {{ name }}",
        html="<p>" + "y" * 200 + "</p>",
    )
    unavailable = (503, {"error": "queue_unavailable", "enqueued_units": 0})
    worker.script = [202, unavailable, unavailable]

    manager.start_job(job.id)

    # Three requests of 50, 50 and 20 recipients: the first is taken, the second
    # refused twice, the third never sent once the second failed for good.
    first, second, again = worker.bodies()
    assert again == second
    accepted = [m["rid"] for u in first["units"] for m in u["messages"]]
    statuses = _statuses(db, job.id)
    refused = sorted(set(statuses) - set(accepted))
    assert (len(accepted), len(refused)) == (50, 70)
    assert {statuses[rid] for rid in accepted} == {("queued", 1)}
    assert {statuses[rid] for rid in refused} == {("pending", 1)}
    batch = db.session.execute(
        sa.select(Batch).where(Batch.job_id == job.id)
    ).scalar_one()
    assert batch.status == "failed"
    assert batch.last_error == (
        "The Worker answered 503 queue_unavailable: Service Unavailable"
    )

    # Resuming the job reopens the failed batch and sends only its pending recipients.
    worker.requests.clear()
    assert manager.resume_job(job.id) == 1

    resent = worker.accepted_rids()
    assert sorted(resent) == sorted(refused)
    keys = {
        m["rid"]: m["key"]
        for b in worker.bodies()
        for u in b["units"]
        for m in u["messages"]
    }
    assert all(keys[rid] == f"cm-{job.id}-{rid}-2" for rid in refused)
    statuses = _statuses(db, job.id)
    assert {statuses[rid] for rid in refused} == {("queued", 2)}
    assert {statuses[rid] for rid in accepted} == {("queued", 1)}


def test_an_oversized_message_fails_that_recipient_only(
    app: Flask, db, worker: FakeWorker
) -> None:
    job = manager.create_job(
        [
            {"email": "small@example.com", "size": 10},
            {"email": "big@example.com", "size": 200_000},
            {"email": "other@example.com", "size": 10},
        ],
        subject="Hi",
        html="<p>{{ 'z' * (size | int) }}</p>",
    )

    manager.start_job(job.id)

    rows = {
        row.email: row
        for row in db.session.execute(
            sa.select(Recipient).where(Recipient.job_id == job.id)
        ).scalars()
    }
    assert rows["big@example.com"].status == "failed"
    assert rows["big@example.com"].reason == "MessageTooLarge"
    assert "Cloudflare Queue takes at most 127,000" in rows["big@example.com"].error
    assert (
        rows["small@example.com"].status == rows["other@example.com"].status == "queued"
    )
    assert sorted(worker.accepted_rids()) == sorted(
        [rows["small@example.com"].id, rows["other@example.com"].id]
    )
    batch = db.session.execute(
        sa.select(Batch).where(Batch.job_id == job.id)
    ).scalar_one()
    assert batch.status == "dispatched"
    assert manager.job_summary(job.id)["failed_by_reason"] == {"MessageTooLarge": 1}


def test_get_connector_builds_the_cloudflare_connector(app: Flask) -> None:
    assert isinstance(get_connector("cloudflare", app, {}), CloudflareConnector)
