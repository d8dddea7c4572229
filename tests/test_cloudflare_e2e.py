"""The Cloudflare path end to end, every part real and on loopback.

cloudmail (served by werkzeug in a thread) dispatches a job with the ``cloudflare``
connector → the Worker in workerd (``node lambda/dev/serve.mjs``: miniflare with a
real Queue producer and consumer and D1) → its queue consumer → SES v2 on moto's
server, through a small proxy that throttles one recipient once → signed reports back
to cloudmail's callback route. Nothing here is skipped: without ``node_modules`` the
fixture runs ``npm ci``, and without Node it fails saying so.
"""

from __future__ import annotations

import base64
import collections
import csv
import http.client
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from conftest import ROOT, SHARED
from flask import Flask
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

from cloudmail import manager
from cloudmail.extension import get_state
from cloudmail.models import Recipient
from cloudmail.webhooks.signing import generate_secret, sign_headers

LAMBDA = ROOT / "lambda"
SENDER = "news@example.com"
ENQUEUE_SECRET = generate_secret()
REPORT_SECRET = generate_secret()
ROWS = 300
DEADLINE_SECONDS = 60

pytestmark = pytest.mark.slow


# -- moto, and a proxy in front of it that throttles -------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class ThrottlingProxy:
    """Forwards to moto, but answers 429 to the first SendEmail for ``throttle``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.throttle: set[str] = set()
        self.sends: collections.Counter[str] = collections.Counter()
        self.throttled: list[str] = []
        self.lock = threading.Lock()
        self.url = ""

    def decide(self, path: str, body: bytes) -> bool:
        """Count a SendEmail call; return True when it must be throttled."""
        if not path.startswith("/v2/email/outbound-emails"):
            return False
        [address] = json.loads(body)["Destination"]["ToAddresses"]
        with self.lock:
            self.sends[address] += 1
            if address in self.throttle:
                self.throttle.discard(address)
                self.throttled.append(address)
                return True
        return False


@pytest.fixture(scope="module")
def proxy_server(moto_url: str) -> Iterator[ThrottlingProxy]:
    proxy = ThrottlingProxy(moto_url)
    upstream = moto_url.removeprefix("http://")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if proxy.decide(self.path, body):
                self.answer(
                    429,
                    {"x-amzn-ErrorType": "TooManyRequestsException:"},
                    b'{"message":"Maximum sending rate exceeded."}',
                )
                return
            conn = http.client.HTTPConnection(upstream, timeout=30)
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in ("connection", "keep-alive")
            }
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            conn.close()
            hop = ("content-length", "connection", "transfer-encoding")
            keep = {k: v for k, v in response.getheaders() if k.lower() not in hop}
            self.answer(response.status, keep, data)

        def answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header(
                "Content-Type", headers.get("Content-Type", "application/json")
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield proxy
    server.shutdown()
    server.server_close()


@pytest.fixture()
def proxy(proxy_server: ThrottlingProxy, moto_url: str) -> ThrottlingProxy:
    """A clean moto with the sender verified, and a proxy with nothing throttled."""
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    ).close()
    boto3.client(
        "ses",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).verify_email_identity(EmailAddress=SENDER)
    proxy_server.throttle.clear()
    proxy_server.sends.clear()
    proxy_server.throttled.clear()
    return proxy_server


def sent_mails(moto_url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{moto_url}/moto-api/data.json") as response:
        return list(json.load(response)["ses"]["RawMessage"])


# -- the Worker in workerd ---------------------------------------------------------


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """``lambda/node_modules`` from the lock file, installed here when missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("The Cloudflare end-to-end test needs Node 20+ and npm on PATH.")
    modules = LAMBDA / "node_modules"
    if not (modules / "miniflare").is_dir() or not (modules / "aws4fetch").is_dir():
        command = ["npm", "ci", "--no-audit", "--no-fund"]
        done = subprocess.run(
            command,
            cwd=LAMBDA,
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            pytest.fail(f"'npm ci' in {LAMBDA} failed:\n{done.stderr[-2000:]}")
    return modules


class Worker:
    def __init__(self, process: subprocess.Popen[str], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture()
def worker(
    node_modules: Path, proxy: ThrottlingProxy, tmp_path: Path
) -> Iterator[Worker]:
    """A fresh Worker per test: its D1 store (the idempotency keys) lives in memory."""
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        "SES_ENDPOINT": proxy.url,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "CLOUDMAIL_ENQUEUE_SECRET": ENQUEUE_SECRET,
        "CLOUDMAIL_REPORT_SECRET": REPORT_SECRET,
        "RETRY_BASE_SECONDS": "1",
        "RETRY_MAX_SECONDS": "2",
    }
    for name in ("AWS_SESSION_TOKEN", "CLOUDMAIL_WORKER_PERSIST", "PORT"):
        env.pop(name, None)
    with log.open("w") as stderr:
        process = subprocess.Popen(
            ["node", "dev/serve.mjs", "--port", "0"],
            cwd=LAMBDA,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    ready: list[str] = []
    stdout = process.stdout
    assert stdout is not None
    reader = threading.Thread(
        target=lambda: ready.append(stdout.readline()), daemon=True
    )
    reader.start()
    reader.join(timeout=30)
    if not ready or not ready[0].startswith("READY http://127.0.0.1:"):
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        pytest.fail(f"The Worker did not start: {ready!r}\n{log.read_text()[-3000:]}")

    yield Worker(process, ready[0].split()[1], log)

    process.terminate()
    try:
        code = process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("The Worker did not stop within 15 s of SIGTERM.")
    finally:
        process.stdout.close()  # type: ignore[union-attr]
    assert code == 143, f"The Worker exited with {code}:\n{log.read_text()[-3000:]}"


# -- cloudmail, served on loopback -------------------------------------------------


@pytest.fixture
def app_config(worker: Worker) -> dict[str, object]:
    return {
        "CLOUDMAIL_PROVIDER": "cloudflare",
        "CLOUDMAIL_CLOUDFLARE_WORKER_URL": worker.url,
        "CLOUDMAIL_CLOUDFLARE_ENQUEUE_SECRET": ENQUEUE_SECRET,
        "CLOUDMAIL_REPORT_SECRETS": [REPORT_SECRET],
        "CLOUDMAIL_SENDER": f"Cloudmail Tests <{SENDER}>",
        "CLOUDMAIL_BATCH_SIZE": 100,
    }


@pytest.fixture
def served(app: Flask) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 and point the callback URL at it."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    app.config["CLOUDMAIL_CALLBACK_URL"] = (
        f"http://127.0.0.1:{server.server_port}/cloudmail/callback/report"
    )
    yield app.config["CLOUDMAIL_CALLBACK_URL"]
    server.shutdown()
    thread.join()


def sample_csv(tmp_path: Path) -> Path:
    """The first ROWS records of the shared Moodle sample, as a CSV of its own."""
    source = SHARED / "moodle_users_5k.csv"
    with source.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        rows = [next(reader) for _ in range(ROWS + 1)]
    path = tmp_path / "moodle_first_300.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def wait_for(job_id: int, done: Any, worker: Worker) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_SECONDS
    session = get_state().db.session
    while True:
        session.rollback()  # see the report thread's commits
        summary = manager.job_summary(job_id)
        if done(summary):
            return summary
        if time.monotonic() > deadline:
            pytest.fail(
                f"Job {job_id} did not finish in {DEADLINE_SECONDS} s: "
                f"{summary}\nWorker log:\n{worker.logs()}"
            )
        time.sleep(0.25)


# -- tests -------------------------------------------------------------------------


def test_a_job_goes_through_the_worker_and_every_recipient_is_sent_once(
    served: str,
    db,
    worker: Worker,
    proxy: ThrottlingProxy,
    moto_url: str,
    tmp_path: Path,
) -> None:
    job = manager.create_job(
        sample_csv(tmp_path),
        subject="Welcome, {{ firstname }}",
        html="<p>Hi {{ name }} ({{ username }})</p>",
    )
    valid = job.pending
    session = db.session
    emails = dict(
        session.execute(
            sa.select(Recipient.id, Recipient.email)
            .where(Recipient.job_id == job.id, Recipient.status == "pending")
            .order_by(Recipient.id)
        ).all()
    )
    throttled = list(emails.values())[10]  # mid-unit: the rest of its unit waits too
    proxy.throttle.add(throttled)

    assert manager.start_job(job.id) == 3

    summary = wait_for(job.id, lambda s: s["status"] == "done", worker)
    counters = summary["counters"]
    assert valid == len(emails) > 250
    assert (
        counters["sent"],
        counters["failed"],
        counters["queued"],
        counters["pending"],
    ) == (
        valid,
        0,
        0,
        0,
    )
    assert counters["sent"] + counters["rejected"] == counters["total"] == ROWS

    # moto holds exactly one mail per valid recipient, and each is the id reported.
    mails = sent_mails(moto_url)
    by_address: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for mail in mails:
        headers = BytesHeaderParser(policy=policy.default).parsebytes(
            mail["raw_data"].encode()
        )
        by_address[headers["To"].addresses[0].addr_spec].append(
            {**mail, "headers": headers}
        )
    assert len(mails) == valid
    assert sorted(by_address) == sorted(emails.values())
    assert {len(sent) for sent in by_address.values()} == {1}
    rows = session.execute(
        sa.select(
            Recipient.email, Recipient.provider_message_id, Recipient.variables
        ).where(Recipient.job_id == job.id, Recipient.status == "sent")
    ).all()
    for row in rows:
        [mail] = by_address[row.email]
        assert mail["id"] == row.provider_message_id
        assert (
            mail["headers"]["Subject"]
            == f"Welcome, {json.loads(row.variables)['firstname']}"
        )

    # The throttled send was answered 429 once, retried by the Worker, sent once.
    assert proxy.throttled == [throttled]
    assert proxy.sends[throttled] == 2
    assert {n for address, n in proxy.sends.items() if address != throttled} == {1}
    assert "will retry after TooManyRequestsException" in worker.logs()


def _unit(address: str, n: int) -> dict[str, Any]:
    raw = (
        f"From: {SENDER}\r\nTo: {address}\r\nSubject: direct {n}\r\n\r\nhello\r\n"
    ).encode()
    return {
        "v": 1,
        "job": 900,
        "batch": 1,
        "unit": f"900-1-{n}",
        "callback": None,
        "configuration_set": None,
        "messages": [
            {
                "rid": n,
                "key": f"cm-900-{n}-1",
                "to": [address],
                "from": SENDER,
                "raw": base64.b64encode(raw).decode(),
            }
        ],
    }


def _enqueue(
    worker: Worker, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json", **headers}
    request = urllib.request.Request(
        f"{worker.url}/enqueue", data=body, method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_forged_or_stale_enqueue_is_refused_and_sends_nothing(
    worker: Worker, moto_url: str
) -> None:
    def body(address: str, n: int) -> bytes:
        return json.dumps(
            {"v": 1, "job": 900, "batch": 1, "units": [_unit(address, n)]}
        ).encode()

    forged = body("forged@example.com", 1)
    stale = body("stale@example.com", 2)
    unsigned = body("unsigned@example.com", 3)
    good = body("good@example.com", 4)

    status, answer = _enqueue(worker, forged, sign_headers(generate_secret(), forged))
    assert (status, answer["error"]) == (403, "bad_signature")
    old = int(time.time()) - 600
    status, answer = _enqueue(
        worker, stale, sign_headers(ENQUEUE_SECRET, stale, timestamp=old)
    )
    assert (status, answer["error"]) == (403, "stale_timestamp")
    status, answer = _enqueue(worker, unsigned, {})
    assert (status, answer["error"]) == (401, "missing_signature")
    # The same signature over other bytes does not carry over either.
    headers = sign_headers(ENQUEUE_SECRET, good)
    status, answer = _enqueue(worker, forged, headers)
    assert (status, answer["error"]) == (403, "bad_signature")

    # A correctly signed request goes through; once its mail is at moto, nothing else is.
    status, answer = _enqueue(worker, good, headers)
    assert (status, answer["units"], answer["messages"]) == (202, 1, 1)
    deadline = time.monotonic() + 20
    while not sent_mails(moto_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # anything wrongly enqueued would have been consumed by now
    mails = sent_mails(moto_url)
    assert len(mails) == 1
    assert "To: good@example.com" in mails[0]["raw_data"]
