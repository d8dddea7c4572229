"""Import + batch planning + enqueue of a large recipient list, against the floor.

    .venv/bin/python bench/bench_import.py --rows 1000000

Needs PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379). It generates a
clean CSV with ../shared/tools/make_recipients.py (kept in bench/data/), creates a
scratch database, runs cloudmail's create_job (stream, validate, COPY, de-duplicate,
suppress, count) and start_job (plan batches, enqueue them on RQ in one pipeline), and
prints rows/s and peak RSS per stage. The floor is a bare ``COPY ... FROM STDIN`` of
the same file into a bare table. Each measurement runs in its own child process so
peak RSS is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import uuid
from pathlib import Path

import psycopg
from common import make_csv, peak_rss_mb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def floor(csv_path: str, database: str, queue: multiprocessing.Queue) -> None:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}") as conn:
        conn.execute(
            "CREATE TABLE bare (id text, username text, email text, firstname text, "
            "lastname text, idnumber text, institution text, department text, "
            "phone1 text, city text, country text, lang text, suspended text, "
            "lastaccess text)"
        )
        start = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy("COPY bare FROM STDIN WITH (FORMAT csv, HEADER)") as copy,
        ):
            with open(csv_path, "rb") as f:
                while chunk := f.read(1 << 20):
                    copy.write(chunk)
        conn.commit()
        queue.put({"copy_s": time.perf_counter() - start, "rss_mb": peak_rss_mb()})


def cloudmail_run(csv_path: str, database: str, queue: multiprocessing.Queue) -> None:
    sys.path.insert(0, str(ROOT))
    from flask import Flask

    from cloudmail import CloudMail, manager
    from cloudmail.extension import get_state
    from cloudmail.models import Base

    app = Flask("bench", instance_path=str(HERE / "data" / "instance"))
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        CLOUDMAIL_SENDER="Bench <bench@example.com>",
        CLOUDMAIL_REDIS_URL="redis://127.0.0.1:6379/0",
        CLOUDMAIL_QUEUE_NAME=f"cloudmail-bench-{uuid.uuid4().hex[:8]}",
    )
    CloudMail(app)
    with app.app_context():
        Base.metadata.create_all(get_state().db.engine)
        rq_queue = get_state().queue(app)
        start = time.perf_counter()
        job = manager.create_job(
            csv_path,
            subject="Hello {{ firstname }}",
            html="<p>Hi {{ name }} ({{ username }})</p>",
        )
        imported = time.perf_counter()
        import_rss = peak_rss_mb()
        handed = manager.start_job(job.id)
        enqueued = time.perf_counter()
        rq_jobs = rq_queue.count
        rq_queue.delete(delete_jobs=True)
        queue.put(
            {
                "rows": job.total,
                "pending": job.pending,
                "import_s": imported - start,
                "import_rss_mb": import_rss,
                "plan_enqueue_s": enqueued - imported,
                "batches": handed,
                "rq_jobs": rq_jobs,
                "rss_mb": peak_rss_mb(),
            }
        )


def run_in_child(target, *args):  # noqa: ANN001, ANN201
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()

    csv_path = make_csv(args.rows)
    database = f"cloudmail_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        base = run_in_child(floor, str(csv_path), database)
        ours = run_in_child(cloudmail_run, str(csv_path), database)
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    total = ours["import_s"] + ours["plan_enqueue_s"]
    print(
        f"file: {csv_path.name} ({csv_path.stat().st_size / 1e6:.0f} MB, {ours['rows']:,} rows)"
    )
    print(
        f"floor  bare COPY into a bare table: {base['copy_s']:.2f} s "
        f"({ours['rows'] / base['copy_s']:,.0f} rows/s), peak RSS {base['rss_mb']:.0f} MB"
    )
    print(
        f"cloudmail import (parse, validate, COPY, dedupe, suppress, count): "
        f"{ours['import_s']:.2f} s ({ours['rows'] / ours['import_s']:,.0f} rows/s), "
        f"peak RSS {ours['import_rss_mb']:.0f} MB"
    )
    print(
        f"cloudmail plan + enqueue: {ours['plan_enqueue_s']:.2f} s for {ours['batches']} batches "
        f"({ours['rq_jobs']} RQ jobs on the queue)"
    )
    print(
        f"cloudmail total: {total:.2f} s ({ours['rows'] / total:,.0f} rows/s), "
        f"peak RSS {ours['rss_mb']:.0f} MB; ratio to the floor: {total / base['copy_s']:.1f}x"
    )


if __name__ == "__main__":
    main()
