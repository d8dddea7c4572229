"""The embedded default: every message written as an ``.eml`` file.

Nothing leaves the machine, so a newcomer can run a whole job without an account. Each
file is ``<outbox>/job-<job id>/<recipient id>.eml``, written atomically; results are
reported through the same code path as a cloud function's reports.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Iterable

from .. import reports
from ..extension import outbox_dir
from .base import BatchInfo, Connector, HandOff, OutgoingMessage

logger = logging.getLogger(__name__)


class OutboxConnector(Connector):
    name = "outbox"

    def dispatch(
        self, batch: BatchInfo, messages: Iterable[OutgoingMessage]
    ) -> HandOff:
        folder = os.path.join(outbox_dir(self.app), f"job-{batch.job_id}")
        os.makedirs(folder, exist_ok=True)
        handoff = HandOff(provider_ref=folder)
        results = []
        for message in messages:
            try:
                _write_atomically(folder, f"{message.recipient_id}.eml", message.raw)
            except OSError as err:
                logger.error(
                    "Batch %s of job %s: cannot write the outbox file of recipient %s",
                    batch.batch_id,
                    batch.job_id,
                    message.recipient_id,
                    exc_info=True,
                )
                handoff.refused[message.recipient_id] = (
                    f"Outbox write failed: {err.strerror}"
                )
                continue
            handoff.accepted.append(message.recipient_id)
            results.append(
                {
                    "rid": message.recipient_id,
                    "key": message.key,
                    "status": "sent",
                    "message_id": message.message_id,
                    "error_code": None,
                    "error": None,
                }
            )

        if results:
            reports.apply_report(
                {
                    "v": 1,
                    "id": f"outbox-{uuid.uuid4().hex}",
                    "source": "outbox",
                    "job": batch.job_id,
                    "batch": batch.batch_id,
                    "results": results,
                }
            )
        logger.info(
            "Batch %s of job %s: outbox wrote %d messages to %s",
            batch.batch_id,
            batch.job_id,
            len(handoff.accepted),
            folder,
        )
        return handoff


def _write_atomically(folder: str, filename: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(folder, filename))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
