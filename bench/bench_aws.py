"""A large job from CSV to every message on SQS, against the floor.

    .venv/bin/python bench/bench_aws.py --rows 1000000

Needs PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379); moto's server
runs in a child process on loopback. The measured path is cloudmail's own:
create_job (stream, validate, COPY), start_job (plan, enqueue on RQ), then
``--workers`` RQ workers (separate processes) that claim each batch, render every
recipient's mail, pack the units and queue them with SendMessageBatch through the AWS
connector. A consumer drains the queue as it fills (moto slows down as a queue grows,
real SQS does not); the job is "on SQS" when the workers are done, and "drained" when
the consumer has received every recipient.

The floor, in the same run: the same file parsed with the csv module and COPYed into a
bare table, and its bytes pushed with raw SendMessageBatch calls (1 MiB per call).
Peak RSS is reported per process: this script, each worker, and moto.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
import psycopg
from common import make_csv, peak_rss_mb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
REGION = "us-east-1"
SUBJECT = "Welcome, {{ firstname }}"
HTML = (
    "<html><body><h1>Hello {{ firstname }} {{ lastname }}</h1><p>Your account "
    "<b>{{ username }}</b> at {{ institution }} is ready.</p><p>Log in from "
    "{{ city }}, {{ country }}.</p></body></html>"
)
MIB = 1_048_576

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_app(config: dict[str, Any]) -> Any:
    from flask import Flask

    from cloudmail import CloudMail

    app = Flask("bench", instance_path=str(HERE / "data" / "instance"))
    app.config.update(config)
    CloudMail(app)
    return app


# -- the worker (child process) ----------------------------------------------------


def worker_main(config_json: str) -> None:
    from rq import SimpleWorker

    from cloudmail import tasks
    from cloudmail.extension import get_state

    app = make_app(json.loads(config_json))
    tasks.worker_app = app
    with app.app_context():
        queue = get_state(app).queue(app)
        SimpleWorker([queue], connection=queue.connection).work(
            burst=True, logging_level="WARNING"
        )
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


# -- the consumer ------------------------------------------------------------------


class Drain:
    """Receives and deletes every message, counting units, recipients and bytes."""

    def __init__(self, endpoint: str, queue_url: str, threads: int) -> None:
        self.queue_url = queue_url
        self.clients = [
            boto3.session.Session().client(
                "sqs", region_name=REGION, endpoint_url=endpoint
            )
            for _ in range(threads)
        ]
        self.units = self.recipients = self.bytes = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.run, args=(c,), daemon=True)
            for c in self.clients
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def run(self, sqs: Any) -> None:
        while not self.stop.is_set():
            got = sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            ).get("Messages", [])
            if not got:
                continue
            sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(got)
                ],
            )
            with self.lock:
                self.units += len(got)
                self.recipients += sum(m["Body"].count('"rid":') for m in got)
                self.bytes += sum(len(m["Body"]) for m in got)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


# -- the run -----------------------------------------------------------------------


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/moto-api/data.json").close()
            return process, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto's server did not start")


def moto_peak_mb(process: subprocess.Popen[bytes]) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measured(
    args: argparse.Namespace,
    csv_path: Path,
    database: str,
    endpoint: str,
    stages: dict[str, float],
) -> dict[str, Any]:
    """cloudmail's path; fills ``stages`` with seconds per stage."""
    from cloudmail import manager
    from cloudmail.extension import get_state
    from cloudmail.models import Base

    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=endpoint)
    queue_url = sqs.create_queue(
        QueueName=f"bench-{uuid.uuid4().hex[:8]}",
        Attributes={"VisibilityTimeout": "600"},
    )["QueueUrl"]
    config = {
        "SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        "CLOUDMAIL_SENDER": "Bench <news@example.com>",
        "CLOUDMAIL_PROVIDER": "aws",
        "CLOUDMAIL_AWS_QUEUE_URL": queue_url,
        "CLOUDMAIL_AWS_ENDPOINT_URL": endpoint,
        "CLOUDMAIL_AWS_REGION": REGION,
        # No Lambda runs here: nothing is sent or reported, only queued.
        "CLOUDMAIL_CALLBACK_URL": "http://127.0.0.1:9/cloudmail/callback/report",
        "CLOUDMAIL_REDIS_URL": REDIS_URL,
        "CLOUDMAIL_QUEUE_NAME": f"cloudmail-bench-{uuid.uuid4().hex[:8]}",
        "CLOUDMAIL_BATCH_SIZE": args.batch_size,
    }
    app = make_app(config)
    with app.app_context():
        Base.metadata.create_all(get_state().db.engine)

        start = time.perf_counter()
        job = manager.create_job(csv_path, subject=SUBJECT, html=HTML)
        stages["import (create_job)"] = time.perf_counter() - start
        to_send = job.pending

        start = time.perf_counter()
        batches = manager.start_job(job.id)
        stages["plan + enqueue on RQ"] = time.perf_counter() - start

        drain = Drain(endpoint, queue_url, args.consumers)
        drain.start()
        start = time.perf_counter()
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "worker", json.dumps(config)],
                stdout=subprocess.PIPE,
            )
            for _ in range(args.workers)
        ]
        worker_rss = [
            json.loads(w.communicate()[0].decode().strip().splitlines()[-1])[
                "peak_rss_mb"
            ]
            for w in workers
        ]
        stages["workers: render, pack, SendMessageBatch"] = time.perf_counter() - start
        while drain.recipients < to_send:
            time.sleep(0.05)
        stages["drain lag after the workers"] = (
            time.perf_counter()
            - start
            - stages["workers: render, pack, SendMessageBatch"]
        )
        drain.close()

        counters = manager.job_summary(job.id)["counters"]
        get_state().db.session.remove()
        get_state().db.engine.dispose()
        get_state(app).queue(app).delete(delete_jobs=True)
    return {
        "to_send": to_send,
        "batches": batches,
        "queued": counters["queued"],
        "units": drain.units,
        "bytes": drain.bytes,
        "recipients": drain.recipients,
        "worker_rss": worker_rss,
    }


def floor(
    csv_path: Path, database: str, endpoint: str, stages: dict[str, float]
) -> int:
    """Parse + COPY into a bare table, then the file's bytes through SendMessageBatch."""
    start = time.perf_counter()
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}") as conn:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            columns = ", ".join(f'"{name}" text' for name in header)
            conn.execute(f"CREATE TABLE bare ({columns})")
            with conn.cursor() as cur, cur.copy("COPY bare FROM STDIN") as copy:
                for row in reader:
                    copy.write_row(row)
        conn.commit()
    stages["floor: parse + COPY into a bare table"] = time.perf_counter() - start

    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=endpoint)
    queue_url = sqs.create_queue(QueueName=f"floor-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    drain = Drain(endpoint, queue_url, 2)
    drain.start()
    start = time.perf_counter()
    pushed = 0
    with open(csv_path, "rb") as f:
        while chunk := f.read(MIB // 4 - 1024):
            # Four ~256 KiB messages per call keep it under SendMessageBatch's 1 MiB.
            entries = [{"Id": "0", "MessageBody": chunk.decode("utf-8", "replace")}]
            for n in range(1, 4):
                more = f.read(MIB // 4 - 1024)
                if more:
                    entries.append(
                        {"Id": str(n), "MessageBody": more.decode("utf-8", "replace")}
                    )
            sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
            pushed += sum(len(e["MessageBody"]) for e in entries)
    stages["floor: file bytes via raw SendMessageBatch"] = time.perf_counter() - start
    drain.close()
    return pushed


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker_main(sys.argv[2])
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2, help="draining threads")
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()

    csv_path = make_csv(args.rows)
    database = f"cloudmail_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    moto, endpoint = start_moto()
    stages: dict[str, float] = {}
    try:
        result = measured(args, csv_path, database, endpoint, stages)
        pushed = floor(csv_path, database, endpoint, stages)
        moto_rss = moto_peak_mb(moto)
    finally:
        moto.terminate()
        moto.wait()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    path_total = sum(v for k, v in stages.items() if not k.startswith("floor"))
    floor_total = sum(v for k, v in stages.items() if k.startswith("floor"))
    out = io.StringIO()
    out.write(
        f"bench_aws: {args.rows:,} rows from {csv_path.name} "
        f"({csv_path.stat().st_size / MIB:,.1f} MiB), {args.workers} RQ workers, "
        f"batches of {args.batch_size}, PostgreSQL + Redis + moto SQS\n"
    )
    for name, seconds in stages.items():
        if name == "floor: parse + COPY into a bare table":
            out.write("\n")
        out.write(f"  {name:<44}{seconds:>9.1f} s\n")
    out.write(
        f"  {'cloudmail path, total':<44}{path_total:>9.1f} s  "
        f"({result['to_send'] / path_total:,.0f} recipients/s)\n"
    )
    out.write(f"  {'floor, total':<44}{floor_total:>9.1f} s\n")
    out.write(f"  ratio path / floor: {path_total / floor_total:.1f}x\n\n")
    out.write(
        f"  recipients to send {result['to_send']:,}; queued {result['queued']:,}; "
        f"received from SQS {result['recipients']:,} in {result['units']:,} units "
        f"({result['bytes'] / MIB:,.0f} MiB; floor pushed {pushed / MIB:,.0f} MiB)\n"
    )
    out.write(
        f"  peak RSS: bench process {peak_rss_mb():,.0f} MiB; workers "
        f"{', '.join(f'{r:,.0f}' for r in result['worker_rss'])} MiB; "
        f"moto {moto_rss:,.0f} MiB\n"
    )
    print(out.getvalue(), end="")


if __name__ == "__main__":
    main()
