"""Signals cloudmail sends and listens to.

All live in one private blinker namespace. The sender is always the Flask app (the
real object, ``current_app._get_current_object()``), so receivers can connect for one
app only.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

job_created = _signals.signal("job-created")
"""A job was created and its recipients imported.

Keyword arguments: ``job_id`` (int), ``kind`` (str).
"""

job_finished = _signals.signal("job-finished")
"""Every recipient of a job has an outcome from the connector (sent or failed), or the
job was cancelled.

Keyword arguments: ``job_id`` (int), ``status`` (the job's final status).
"""

recipient_sent = _signals.signal("recipient-sent")
"""The provider accepted mail for some recipients.

Keyword arguments: ``job_id`` (int), ``recipient_ids`` (list of int).
"""

recipient_failed = _signals.signal("recipient-failed")
"""The provider refused mail for some recipients.

Keyword arguments: ``job_id`` (int), ``recipient_ids`` (list of int).
"""
