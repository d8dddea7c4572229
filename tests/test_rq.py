"""Dispatch through a real Redis and real RQ workers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REDIS_URL, ROOT
from flask import Flask
from rq import Queue, SimpleWorker

from cloudmail import manager, tasks
from cloudmail.dispatch import run_batch
from cloudmail.errors import DispatchError
from cloudmail.extension import get_state
from cloudmail.models import Batch, Recipient


@pytest.fixture
def app_config() -> dict[str, object]:
    return {"CLOUDMAIL_REDIS_URL": REDIS_URL, "CLOUDMAIL_BATCH_SIZE": 100}


@pytest.fixture
def queue(app: Flask):  # noqa: ANN201
    queue = get_state(app).queue(app)
    yield queue
    queue.empty()
    queue.delete(delete_jobs=True)


def _people(n: int) -> list[dict[str, str]]:
    return [
        {"email": f"person{i}@example.com", "name": f"Person {i}"} for i in range(n)
    ]


def _eml_count(outbox: Path, job_id: int) -> int:
    return len(list((outbox / f"job-{job_id}").glob("*.eml")))


def test_batches_go_through_rq_and_a_worker(
    app: Flask, queue: Queue, outbox: Path
) -> None:
    job = manager.create_job(_people(350), subject="Hi {{ name }}", html="x")

    handed = manager.start_job(job.id)

    assert handed == 4
    assert queue.count == 4
    assert manager.job_summary(job.id)["status"] == "queued"
    tasks.worker_app = app
    SimpleWorker([queue], connection=queue.connection).work(burst=True)
    summary = manager.job_summary(job.id)
    assert (summary["status"], summary["counters"]["sent"]) == ("done", 350)
    assert _eml_count(outbox, job.id) == 350


def test_the_same_rq_job_twice_sends_nothing_twice(
    app: Flask, queue: Queue, outbox: Path, db
) -> None:
    job = manager.create_job(_people(150), subject="x", html="x")
    manager.start_job(job.id)
    batch_ids = (
        db.session.execute(sa.select(Batch.id).where(Batch.job_id == job.id))
        .scalars()
        .all()
    )
    # A duplicated delivery of the RQ job (as after a worker crash and re-enqueue).
    for batch_id in batch_ids:
        queue.enqueue("cloudmail.tasks.send_batch", batch_id)

    tasks.worker_app = app
    SimpleWorker([queue], connection=queue.connection).work(burst=True)

    assert _eml_count(outbox, job.id) == 150
    attempts = db.session.execute(
        sa.select(sa.func.max(Recipient.attempts)).where(Recipient.job_id == job.id)
    ).scalar()
    assert attempts == 1
    assert manager.job_summary(job.id)["counters"]["sent"] == 150


def test_two_workers_racing_for_one_batch(
    app: Flask, queue: Queue, outbox: Path, db
) -> None:
    job = manager.create_job(_people(100), subject="x", html="x")
    manager.start_job(job.id)
    batch_id = db.session.execute(
        sa.select(Batch.id).where(Batch.job_id == job.id)
    ).scalar_one()
    results: list[str] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        with app.app_context():
            barrier.wait()
            results.append(run_batch(batch_id))
            get_state().db.session.remove()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(results) == ["done", "skipped"]
    assert _eml_count(outbox, job.id) == 100
    assert manager.job_summary(job.id)["counters"]["sent"] == 100


def test_dead_redis_loses_nothing(app: Flask, outbox: Path, db) -> None:
    job = manager.create_job(_people(250), subject="x", html="x")
    real_url = app.config["CLOUDMAIL_REDIS_URL"]
    app.config["CLOUDMAIL_REDIS_URL"] = "redis://127.0.0.1:1/0"
    get_state(app)._redis = None

    with pytest.raises(
        DispatchError,
        match=rf"Redis refused the batches of job {job.id} .*flask cloudmail resume {job.id}",
    ):
        manager.start_job(job.id)

    statuses = (
        db.session.execute(sa.select(Batch.status).where(Batch.job_id == job.id))
        .scalars()
        .all()
    )
    assert statuses == ["pending"] * 3
    assert manager.job_summary(job.id)["counters"]["pending"] == 250

    app.config["CLOUDMAIL_REDIS_URL"] = real_url
    get_state(app)._redis = None
    queue = get_state(app).queue(app)
    try:
        assert manager.resume_job(job.id) == 3
        tasks.worker_app = app
        SimpleWorker([queue], connection=queue.connection).work(burst=True)
    finally:
        queue.delete(delete_jobs=True)
    assert manager.job_summary(job.id)["counters"]["sent"] == 250
    assert _eml_count(outbox, job.id) == 250


def test_flask_cloudmail_worker_command_forks_and_sends(
    app: Flask, queue: Queue, outbox: Path, tmp_path: Path
) -> None:
    job = manager.create_job(_people(120), subject="Hi {{ name }}", html="x")
    manager.start_job(job.id)
    host = tmp_path / "hostapp.py"
    host.write_text(
        "from conftest import make_app\n"
        "from pathlib import Path\n"
        f"app = make_app(Path({str(tmp_path)!r}), {app.config['SQLALCHEMY_DATABASE_URI']!r},\n"
        f"    CLOUDMAIL_REDIS_URL={REDIS_URL!r}, CLOUDMAIL_QUEUE_NAME={queue.name!r},\n"
        f"    CLOUDMAIL_OUTBOX_DIR={str(outbox)!r})\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "tests"), str(ROOT)]),
    }

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "hostapp",
            "cloudmail",
            "worker",
            "--burst",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    get_state(app).db.session.expire_all()
    assert manager.job_summary(job.id)["counters"]["sent"] == 120
    assert _eml_count(outbox, job.id) == 120
