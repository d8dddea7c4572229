"""RQ job functions. They take ids, never ORM objects, and run in an app context."""

from __future__ import annotations

import logging
import os

from flask import Flask, current_app, has_app_context

logger = logging.getLogger(__name__)

#: Set by ``flask cloudmail worker`` so jobs can run outside a request.
worker_app: Flask | None = None
_engine_pid: int | None = None


def send_batch(batch_id: int) -> str:
    """Send one batch (see :func:`cloudmail.dispatch.run_batch`)."""
    app = current_app._get_current_object() if has_app_context() else worker_app  # type: ignore[attr-defined]
    if app is None:
        raise RuntimeError(
            "cloudmail's RQ jobs need the Flask app; run the worker with "
            "'flask cloudmail worker', or set cloudmail.tasks.worker_app."
        )

    with app.app_context():
        _fresh_connections_after_fork(app)
        from .dispatch import run_batch

        return run_batch(batch_id)


def _fresh_connections_after_fork(app: Flask) -> None:
    # A forking RQ worker runs each job in a child process; database connections
    # inherited from the parent must not be shared with it.
    global _engine_pid
    if _engine_pid == os.getpid():
        return

    from .extension import get_state

    get_state(app).db.engine.dispose(close=False)
    _engine_pid = os.getpid()
