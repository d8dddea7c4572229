"""SES events through ``POST /cloudmail/callback/ses``, against the floor.

    .venv/bin/python bench/bench_callbacks.py --events 200000 --clients 8

Needs PostgreSQL (127.0.0.1:5432, user postgres, trust) and gunicorn in the venv. The
script creates a database of its own, a job whose recipients were all reported sent,
and a realistic stream of SNS notifications signed with its own key (mostly Delivery;
hard and soft bounces; complaints after a delivery; about 5% redelivered copies),
half SignatureVersion 1 and half 2. The app is served by gunicorn (gthread workers) on
loopback; ``--clients`` threads post the stream over keep-alive connections. The app
downloads "SNS's" certificate through ``CLOUDMAIL_SNS_FETCH``, which reads ours from a
file: everything else (URL checks, signature, store, apply) is cloudmail's real path.

The floor, in the same run and with the same number of clients: the same event rows
inserted with one plain ``INSERT ... ON CONFLICT DO NOTHING`` per event (autocommit)
into a bare copy of ``cloudmail_events``.

At the end the job's counters are checked against a recount and the expected outcome
of every recipient.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:cloudmail-bench"
CERT_URL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-bench.pem"
PATH = "/cloudmail/callback/ses"


# --- The app gunicorn serves (``bench_callbacks:served_app()``) ---


def served_app() -> Any:
    """The Flask app under test; gunicorn calls this in each worker."""
    from flask import Flask

    from cloudmail import CloudMail

    cert = Path(os.environ["BENCH_CERT_PATH"]).read_bytes()
    app = Flask("bench")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ["BENCH_DB_URL"],
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 8},
        CLOUDMAIL_SENDER="Bench <bench@example.com>",
        CLOUDMAIL_SNS_TOPIC_ARNS=[TOPIC],
        CLOUDMAIL_SNS_FETCH=lambda url: cert,
    )
    CloudMail(app)
    return app


# --- Setting up ---


def make_key_and_cert(folder: Path) -> tuple[bytes, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    path = folder / "sns-cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, path


def create_database() -> tuple[str, str]:
    name = f"cloudmail_bench_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def seed(db_url: str, recipients: int) -> tuple[int, list[tuple[int, str]]]:
    """A job whose recipients were all reported sent, each with its SES message id."""
    import sqlalchemy as sa
    from flask import Flask

    from cloudmail import CloudMail, manager, tracking
    from cloudmail.extension import get_state
    from cloudmail.models import Base

    app = Flask("bench-seed")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=db_url,
        CLOUDMAIL_SENDER="b@example.com",
        CLOUDMAIL_BATCH_SIZE=5000,
    )
    CloudMail(app)
    with app.app_context():
        session = get_state().db.session
        Base.metadata.create_all(get_state().db.engine)
        job = manager.create_job(
            ({"email": f"user{i}@example.com"} for i in range(recipients)),
            subject="Hello",
            html="<p>Hello</p>",
            provider="aws",
        )
        session.execute(
            sa.text(
                "UPDATE cloudmail_recipients SET status = 'sent', attempts = 1, "
                "provider_message_id = 'ses-' || id WHERE job_id = :job"
            ),
            {"job": job.id},
        )
        session.execute(
            sa.text("UPDATE cloudmail_jobs SET status = 'sending' WHERE id = :job"),
            {"job": job.id},
        )
        tracking.recount(session, job.id)
        session.commit()
        rows = session.execute(
            sa.text(
                "SELECT id, email FROM cloudmail_recipients WHERE job_id = :job ORDER BY id"
            ),
            {"job": job.id},
        ).all()
        get_state().db.engine.dispose()
        return job.id, [(r.id, r.email) for r in rows]


# --- The event stream ---


def plan_events(
    job_id: int, recipients: list[tuple[int, str]], seed_: int
) -> tuple[list[dict], Counter]:
    """Events per recipient, and the state each recipient must end in."""
    rng = random.Random(seed_)
    events, expected = [], Counter()
    for rid, email in recipients:
        roll = rng.random()
        if roll < 0.02:  # hard bounce, never delivered
            kinds = [("Bounce", "Permanent", "General")]
            expected["bounced"] += 1
        elif roll < 0.03:  # soft bounce after SES gave up
            kinds = [("Bounce", "Transient", "MailboxFull")]
            expected["bounced"] += 1
        elif roll < 0.035:  # delivered, then marked as spam
            kinds = [("Delivery", None, None), ("Complaint", None, None)]
            expected["complained"] += 1
        else:
            kinds = [("Delivery", None, None)]
            expected["delivered"] += 1
        for kind, bounce_type, subtype in kinds:
            events.append(
                {
                    "job": job_id,
                    "rid": rid,
                    "email": email,
                    "type": kind,
                    "bounce_type": bounce_type,
                    "subtype": subtype,
                    "sns_id": str(uuid.UUID(int=rng.getrandbits(128))),
                }
            )
    rng.shuffle(events)
    duplicates = rng.sample(events, k=len(events) // 20)  # SNS redelivers about 5%
    for copy in duplicates:
        events.insert(rng.randrange(len(events)), copy)
    return events, expected


def _ses_message(event: dict) -> str:
    stamp = "2026-01-05T10:00:01.000Z"
    mail = {
        "timestamp": "2026-01-05T10:00:00.000Z",
        "source": "news@example.com",
        "sendingAccountId": "123456789012",
        "messageId": f"ses-{event['rid']}",
        "destination": [event["email"]],
        "headersTruncated": False,
        "tags": {
            "ses:configuration-set": ["cloudmail-events"],
            "ses:from-domain": ["example.com"],
            "cloudmail-job": [str(event["job"])],
            "cloudmail-recipient": [str(event["rid"])],
        },
    }
    if event["type"] == "Delivery":
        detail = {
            "delivery": {
                "timestamp": stamp,
                "processingTimeMillis": 412,
                "recipients": [event["email"]],
                "smtpResponse": "250 2.0.0 OK",
                "reportingMTA": "a8-70.smtp-out.amazonses.com",
            }
        }
    elif event["type"] == "Bounce":
        detail = {
            "bounce": {
                "bounceType": event["bounce_type"],
                "bounceSubType": event["subtype"],
                "timestamp": stamp,
                "feedbackId": "0100018c-bench",
                "bouncedRecipients": [
                    {
                        "emailAddress": event["email"],
                        "action": "failed",
                        "status": "5.1.1",
                        "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                    }
                ],
            }
        }
    else:
        detail = {
            "complaint": {
                "timestamp": stamp,
                "feedbackId": "0100018c-complaint",
                "complaintFeedbackType": "abuse",
                "complainedRecipients": [{"emailAddress": event["email"]}],
            }
        }
    return json.dumps({"eventType": event["type"], "mail": mail, **detail})


_KEY: Any = None


def _init_signer(key_pem: bytes) -> None:
    global _KEY
    from cryptography.hazmat.primitives import serialization

    _KEY = serialization.load_pem_private_key(key_pem, password=None)


def _sign(event: dict) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    version = "1" if int(event["sns_id"][-1], 16) % 2 else "2"
    message = {
        "Type": "Notification",
        "MessageId": event["sns_id"],
        "TopicArn": TOPIC,
        "Subject": "Amazon SES Email Event Notification",
        "Message": _ses_message(event),
        "Timestamp": "2026-01-05T10:00:02.000Z",
    }
    signed = "".join(
        f"{name}\n{message[name]}\n"
        for name in ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
    )
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = _KEY.sign(signed.encode(), padding.PKCS1v15(), algorithm)
    message.update(
        SignatureVersion=version,
        Signature=base64.b64encode(signature).decode(),
        SigningCertURL=CERT_URL,
        UnsubscribeURL="https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe",
    )
    return json.dumps(message).encode()


def sign_all(events: list[dict], key_pem: bytes) -> list[bytes]:
    with multiprocessing.Pool(initializer=_init_signer, initargs=(key_pem,)) as pool:
        return pool.map(_sign, events, chunksize=500)


# --- Running ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(
    db_url: str, cert_path: Path, port: int, workers: int, threads: int
) -> subprocess.Popen:
    env = {
        **os.environ,
        "BENCH_DB_URL": db_url,
        "BENCH_CERT_PATH": str(cert_path),
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--chdir",
            str(HERE),
            "-k",
            "gthread",
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "--keep-alive",
            "30",
            "bench_callbacks:served_app()",
        ],
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("gunicorn did not start within 60 seconds")


def run_clients(
    bodies: list[bytes], clients: int, send: Any
) -> tuple[float, list[float], Counter]:
    """Post every body from ``clients`` threads; return seconds, latencies, statuses."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()

    def worker(chunk: list[bytes]) -> None:
        own, seen = [], Counter()
        state: dict[str, Any] = {}
        for body in chunk:
            started = time.perf_counter()
            status = send(state, body)
            own.append(time.perf_counter() - started)
            seen[status] += 1
        with lock:
            latencies.extend(own)
            statuses.update(seen)
        send(state, None)

    threads = [
        threading.Thread(target=worker, args=(bodies[i::clients],))
        for i in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies, statuses


def http_sender(port: int) -> Any:
    headers = {
        "Content-Type": "text/plain; charset=UTF-8",
        "x-amz-sns-message-type": "Notification",
    }

    def send(state: dict[str, Any], body: bytes | None) -> int:
        if body is None:
            if "conn" in state:
                state["conn"].close()
            return 0
        for _ in range(3):
            conn = state.get("conn") or http.client.HTTPConnection(
                "127.0.0.1", port, timeout=60
            )
            state["conn"] = conn
            try:
                conn.request("POST", PATH, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                return response.status
            except (http.client.HTTPException, OSError):
                conn.close()
                state.pop("conn", None)
        return 599

    return send


def floor_sender(dsn: str) -> Any:
    """One plain INSERT ... ON CONFLICT DO NOTHING per event, the rows the route stores."""
    statement = (
        "INSERT INTO bench_floor_events (source, event_id, recipient, kind, message_id, job_id,"
        " status, attempts, payload, occurred_at, received_at) VALUES ('ses', %s, %s, %s, %s,"
        " %s, 'applied', 1, %s, %s, now()) ON CONFLICT (source, event_id, recipient) DO NOTHING"
    )

    def send(state: dict[str, Any], body: bytes | None) -> int:
        if body is None:
            if "conn" in state:
                state["conn"].close()
            return 0
        conn = state.get("conn") or psycopg.connect(dsn, autocommit=True)
        state["conn"] = conn
        envelope = json.loads(body)
        ses = json.loads(envelope["Message"])
        mail = ses["mail"]
        conn.execute(
            statement,
            (
                envelope["MessageId"],
                mail["destination"][0],
                ses["eventType"].lower(),
                mail["messageId"],
                int(mail["tags"]["cloudmail-job"][0]),
                body.decode(),
                mail["timestamp"],
            ),
        )
        return 200

    return send


def summary(
    label: str, seconds: float, latencies: list[float], statuses: Counter
) -> str:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    return (
        f"{label}: {len(latencies):,} events in {seconds:.1f} s = "
        f"{len(latencies) / seconds:,.0f} events/s; latency p50 {p50:.1f} ms, "
        f"p99 {p99:.1f} ms; statuses {dict(sorted(statuses.items()))}"
    )


def check(dsn: str, job_id: int, expected: Counter, unique: int) -> str:
    with psycopg.connect(dsn) as conn:
        kept = conn.execute(
            "SELECT delivered, bounced, complained, sent FROM cloudmail_jobs "
            "WHERE id = %s",
            (job_id,),
        ).fetchone()
        fresh = dict(
            conn.execute(
                "SELECT status, count(*) FROM cloudmail_recipients WHERE "
                "job_id = %s GROUP BY status",
                (job_id,),
            ).fetchall()
        )
        stored = conn.execute(
            "SELECT status, count(*) FROM cloudmail_events GROUP BY status"
        ).fetchall()
        floor_rows = conn.execute("SELECT count(*) FROM bench_floor_events").fetchone()[
            0
        ]
    counters = dict(zip(("delivered", "bounced", "complained", "sent"), kept))
    wanted = {
        "delivered": expected["delivered"],
        "bounced": expected["bounced"],
        "complained": expected["complained"],
        "sent": 0,
    }
    recount = {k: fresh.get(k, 0) for k in wanted}
    ok = (
        counters == wanted == recount
        and sum(n for _, n in stored) == unique == floor_rows
    )
    return (
        f"check: counters {counters}, recount {'equal' if counters == recount else recount}, "
        f"expected {'equal' if counters == wanted else wanted}; events stored "
        f"{dict(stored)} ({unique:,} unique posted); floor rows {floor_rows:,} -> "
        f"{'OK' if ok else 'MISMATCH'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", type=int, default=200_000, help="about how many events"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=3, help="gunicorn workers")
    parser.add_argument(
        "--threads", type=int, default=4, help="threads per gunicorn worker"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-callbacks-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    name, db_url = create_database()
    dsn = f"postgresql://postgres@127.0.0.1:5432/{name}"
    server = None
    try:
        t0 = time.perf_counter()
        recipients = max(1, int(args.events / 1.055))
        job_id, rows = seed(db_url, recipients)
        events, expected = plan_events(job_id, rows, args.seed)
        key_pem, cert_path = make_key_and_cert(tmp)
        bodies = sign_all(events, key_pem)
        unique = len({e["sns_id"] for e in events})
        print(
            f"setup: {recipients:,} recipients reported sent; {len(bodies):,} SNS "
            f"notifications ({len(bodies) - unique:,} redelivered copies) signed in "
            f"{time.perf_counter() - t0:.0f} s; expected {dict(expected)}",
            flush=True,
        )

        port = free_port()
        server = start_gunicorn(db_url, cert_path, port, args.workers, args.threads)
        seconds, latencies, statuses = run_clients(
            bodies, args.clients, http_sender(port)
        )
        print(
            f"gunicorn {args.workers} workers x {args.threads} threads (gthread), "
            f"{args.clients} clients, PostgreSQL, loopback",
            flush=True,
        )
        print(
            summary(
                "callback route POST /cloudmail/callback/ses",
                seconds,
                latencies,
                statuses,
            ),
            flush=True,
        )

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE bench_floor_events (LIKE cloudmail_events INCLUDING ALL)"
            )
        seconds, latencies, statuses = run_clients(
            bodies, args.clients, floor_sender(dsn)
        )
        print(
            summary(
                "floor: one INSERT ... ON CONFLICT DO NOTHING per event",
                seconds,
                latencies,
                statuses,
            ),
            flush=True,
        )
        print(check(dsn, job_id, expected, unique), flush=True)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        if not args.keep:
            with psycopg.connect(ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
