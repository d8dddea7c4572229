"""Time the admin pages on a job of 1,000,000 recipients in PostgreSQL.

    python bench/bench_pages.py [--rows 1000000] [--repeat 30]

Creates the database ``cloudmail_bench_pages`` (dropped first if it exists) on the
server of ``CLOUDMAIL_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``),
fills it with ``INSERT ... SELECT generate_series`` (a finished job: delivered, sent,
bounced, complained, failed and rejected rows, their ``updated_at`` spread over an
hour), then requests each page through Flask's test client (routing, queries and
template rendering; no network) and prints the median and 95th percentile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import psycopg
import sqlalchemy as sa
from flask import Flask

from cloudmail import CloudMail, views
from cloudmail.extension import get_state
from cloudmail.models import Base, Job

ADMIN_URL = os.environ.get(
    "CLOUDMAIL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"
)
DB_NAME = "cloudmail_bench_pages"
BATCH = 2000

FILL = """
INSERT INTO cloudmail_recipients
    (job_id, batch_no, line, email, email_key, name, variables, status, reason, error,
     attempts, provider_message_id, updated_at)
SELECT :job, CASE WHEN s.status = 'rejected' THEN NULL ELSE (g / :batch) END, g + 1,
       'user' || lpad(g::text, 7, '0') || '@example.com',
       'user' || lpad(g::text, 7, '0') || '@example.com',
       'User ' || g, '{"firstname": "User", "institution": "North Campus"}', s.status,
       CASE s.status WHEN 'failed' THEN 'render_error' WHEN 'rejected' THEN 'malformed'
                     WHEN 'bounced' THEN 'permanent' END,
       CASE WHEN s.status IN ('failed', 'rejected') THEN 'Benchmark row.' END,
       CASE WHEN s.status = 'rejected' THEN 0 ELSE 1 END,
       CASE WHEN s.status IN ('sent', 'delivered', 'bounced', 'complained')
            THEN 'bench-' || g END,
       CASE WHEN s.status <> 'rejected'
            THEN :start + (g * interval '3.6 milliseconds') END
FROM generate_series(0, :rows - 1) AS g
CROSS JOIN LATERAL (SELECT CASE
    WHEN g % 100 < 80 THEN 'delivered' WHEN g % 100 < 94 THEN 'sent'
    WHEN g % 100 < 96 THEN 'bounced' WHEN g % 100 = 96 THEN 'complained'
    WHEN g % 100 < 99 THEN 'failed' ELSE 'rejected' END AS status) AS s
"""


def create_database() -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{DB_NAME}"


def make_app(url: str) -> Flask:
    app = Flask("bench", instance_path=tempfile.mkdtemp())
    app.config.update(
        SECRET_KEY="bench",
        SQLALCHEMY_DATABASE_URI=url,
        CLOUDMAIL_SENDER="Bench <bench@example.com>",
        CLOUDMAIL_ADMIN_CHECK=lambda: True,
    )
    CloudMail(app)
    return app


def fill(app: Flask, rows: int) -> int:
    """Create one finished job of ``rows`` recipients, its batches and 200 other jobs."""
    with app.app_context():
        engine = get_state().db.engine
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            start = conn.execute(sa.text("SELECT now() - interval '2 hours'")).scalar()
            for i in range(200):
                conn.execute(
                    sa.insert(Job).values(
                        name=f"Older job {i}",
                        kind="bulk" if i % 3 else "observer",
                        status="done",
                        provider="outbox",
                        sender="bench@example.com",
                        subject_template="s",
                        html_template="h",
                        batch_size=BATCH,
                        total=100,
                        delivered=100,
                    )
                )
            job_id = conn.execute(
                sa.insert(Job)
                .values(
                    name="One million",
                    kind="bulk",
                    status="done",
                    provider="outbox",
                    sender="bench@example.com",
                    subject_template="Hello {{ name }}",
                    html_template="<p>Hello {{ name }}</p>",
                    batch_size=BATCH,
                    started_at=start,
                    finished_at=start + timedelta(seconds=rows * 0.0036),
                )
                .returning(Job.id)
            ).scalar_one()
            began = time.perf_counter()
            conn.execute(
                sa.text(FILL),
                {"job": job_id, "rows": rows, "batch": BATCH, "start": start},
            )
            conn.execute(
                sa.text("""
                INSERT INTO cloudmail_batches (job_id, number, status, size, attempts,
                    provider_ref, created_at, updated_at, dispatched_at, finished_at)
                SELECT :job, n, 'done', :batch, 1, 'bench-ref-' || n, :start, :start,
                       :start + n * interval '7 seconds', :start + n * interval '7 seconds'
                FROM generate_series(0, :last) AS n
            """),
                {
                    "job": job_id,
                    "batch": BATCH,
                    "start": start,
                    "last": (rows - 1) // BATCH,
                },
            )
            counts = dict(
                conn.execute(
                    sa.text(
                        "SELECT status, count(*) FROM cloudmail_recipients GROUP BY status"
                    )
                ).all()
            )
            conn.execute(
                sa.update(Job)
                .where(Job.id == job_id)
                .values(total=rows, **{k: v for k, v in counts.items()})
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE"))
        print(
            f"filled {rows:,} recipients in {time.perf_counter() - began:.1f} s: {counts}"
        )
    return job_id


def timed(label: str, call: Callable[[], object], repeat: int) -> None:
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    print(
        f"{label:<44} median {statistics.median(samples):8.1f} ms   "
        f"p95 {p95:8.1f} ms   (n={repeat})"
    )


def get(client, url: str) -> Callable[[], object]:  # noqa: ANN001
    def call() -> object:
        response = client.get(url)
        if response.status_code != 200:
            raise RuntimeError(f"{url} answered {response.status_code}")
        return response.get_data()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    app = make_app(create_database())
    job_id = fill(app, args.rows)
    client = app.test_client()
    deep = int(args.rows * 0.9)
    with app.app_context():
        deep_id = (
            get_state()
            .db.session.execute(
                sa.text(
                    "SELECT id FROM cloudmail_recipients WHERE job_id = :j ORDER BY id "
                    "OFFSET :n LIMIT 1"
                ),
                {"j": job_id, "n": deep},
            )
            .scalar_one()
        )
        failed_deep = (
            get_state()
            .db.session.execute(
                sa.text(
                    "SELECT id FROM cloudmail_recipients WHERE job_id = :j AND status = 'failed' "
                    "ORDER BY id OFFSET 18000 LIMIT 1"
                ),
                {"j": job_id},
            )
            .scalar_one()
        )
        job = get_state().db.session.get(Job, job_id)
        timed(
            "chart query, uncached (1M rows)",
            lambda: views._compute_timeline(job),
            max(3, args.repeat // 6),
        )

    base = f"/cloudmail/jobs/{job_id}"
    print(f"job {job_id}: {args.rows:,} recipients; {args.repeat} requests per page")
    timed("GET /jobs (list, 201 jobs)", get(client, "/cloudmail/jobs"), args.repeat)
    timed(
        "GET /jobs?status=done&kind=observer",
        get(client, "/cloudmail/jobs?status=done&kind=observer"),
        args.repeat,
    )
    timed("GET /jobs/<id> (detail)", get(client, base), args.repeat)
    cold = get(client, base)
    timed(
        "GET /jobs/<id> (detail, caches emptied)",
        lambda: (views._cache.clear(), cold()),
        max(3, args.repeat // 3),
    )
    timed(
        "GET /jobs/<id>/recipients (first page)",
        get(client, f"{base}/recipients"),
        args.repeat,
    )
    timed(
        "GET recipients after=90% (deep page)",
        get(client, f"{base}/recipients?after={deep_id}"),
        args.repeat,
    )
    timed(
        "GET recipients status=failed, deep",
        get(client, f"{base}/recipients?status=failed&after={failed_deep}"),
        args.repeat,
    )
    timed(
        "GET recipients q=user09123 (search)",
        get(client, f"{base}/recipients?q=user09123"),
        args.repeat,
    )
    timed(
        "GET recipients q=user0912345@example.com",
        get(client, f"{base}/recipients?q=user0912345@example.com"),
        args.repeat,
    )
    timed("GET /jobs/<id>/rejects", get(client, f"{base}/rejects"), args.repeat)
    timed(
        "GET /jobs/<id>/progress.json",
        get(client, f"{base}/progress.json"),
        args.repeat,
    )
    timed(
        "GET /jobs/progress.json?id=<id>",
        get(client, f"/cloudmail/jobs/progress.json?id={job_id}"),
        args.repeat,
    )


if __name__ == "__main__":
    main()
