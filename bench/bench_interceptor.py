"""What one intercepted mail costs the request, beside a synchronous SMTP send.

    .venv/bin/python bench/bench_interceptor.py --mails 2000

Both sides send the same message with Flask-Mailman's ``send_mail`` in one process:

- SMTP: Flask-Mailman's SMTP backend to a local aiosmtpd sink (connect, EHLO, MAIL,
  RCPT, DATA, QUIT per mail, as ``send_mail`` does);
- cloudmail: ``MAIL_BACKEND = "cloudmail.observers.interceptor.EmailBackend"`` with
  Redis at 127.0.0.1:6379, so the request pays for the hand-off only (no worker runs;
  the queued items are removed afterwards).

Prints the median and p95 per mail of each and the ratio of the medians (target: the
hand-off at least ten times cheaper).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from aiosmtpd.controller import Controller
from flask import Flask
from flask_mailman import Mail

from cloudmail import CloudMail
from cloudmail.extension import get_state
from cloudmail.models import Base

REDIS_URL = "redis://127.0.0.1:6379/0"
SUBJECT = "Réinitialisation de votre mot de passe"
BODY = "Bonjour Zoë,\n\nVoici votre lien : https://example.com/reset/abc123\n\n" * 8


class Sink:
    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 OK"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def smtp_app(port: int) -> Flask:
    app = Flask("bench-smtp")
    app.config.update(
        MAIL_BACKEND="smtp",
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT=port,
        MAIL_DEFAULT_SENDER="Shop <shop@example.com>",
    )
    Mail(app)
    return app


def cloudmail_app(folder: str) -> Flask:
    app = Flask("bench-cloudmail", instance_path=folder)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{folder}/bench.db",
        MAIL_BACKEND="cloudmail.observers.interceptor.EmailBackend",
        MAIL_DEFAULT_SENDER="Shop <shop@example.com>",
        CLOUDMAIL_SENDER="Shop <shop@example.com>",
        CLOUDMAIL_REDIS_URL=REDIS_URL,
        CLOUDMAIL_QUEUE_NAME=f"bench-{uuid.uuid4().hex[:8]}",
    )
    Mail(app)
    CloudMail(app)
    with app.app_context():
        Base.metadata.create_all(get_state().db.engine)
    return app


def measure(app: Flask, mails: int, warmup: int) -> list[float]:
    mailman = app.extensions["mailman"]
    send: Callable[..., int] = mailman.send_mail
    timings = []
    with app.app_context():
        for i in range(warmup + mails):
            start = time.perf_counter()
            sent = send(SUBJECT, BODY, None, [f"Zoë Ångström <zoe{i}@example.com>"])
            elapsed = time.perf_counter() - start
            if sent != 1:
                raise RuntimeError(f"send_mail returned {sent} on mail {i}")
            if i >= warmup:
                timings.append(elapsed)
    return timings


def summary(timings: list[float]) -> tuple[float, float]:
    ordered = sorted(timings)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.95)] * 1000


def clean_up(app: Flask) -> None:
    with app.app_context():
        state = get_state()
        connection = state.redis(app)
        base = f"cloudmail:handoff:{app.config['CLOUDMAIL_QUEUE_NAME']}"
        connection.delete(base, f"{base}:processing", f"{base}:drain-scheduled")
        queue = state.queue(app)
        queue.empty()
        queue.delete(delete_jobs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()

    port = free_port()
    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    controller.start()
    with tempfile.TemporaryDirectory() as folder:
        fast = cloudmail_app(str(Path(folder)))
        try:
            smtp = summary(measure(smtp_app(port), args.mails, args.warmup))
            handoff = summary(measure(fast, args.mails, args.warmup))
        finally:
            controller.stop()
            clean_up(fast)

    print(f"mails per side:            {args.mails} (after {args.warmup} warm-up)")
    print(f"SMTP send to aiosmtpd:     median {smtp[0]:.3f} ms, p95 {smtp[1]:.3f} ms")
    print(
        f"cloudmail hand-off:        median {handoff[0]:.3f} ms, p95 {handoff[1]:.3f} ms"
    )
    print(f"ratio (median SMTP/hand-off): {smtp[0] / handoff[0]:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
