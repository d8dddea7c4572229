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

# -- sent by the host ------------------------------------------------------------------
#
# The host sends these with its app as sender, e.g.
# ``signals.user_registered.send(app, user_id=user.id, email=user.email)``, after its
# own transaction committed: observers work in a transaction of their own.

user_registered = _signals.signal("user-registered")
"""A user signed up.

Keyword arguments: ``user_id`` (the host's id, int or str), ``email`` (str), and
optionally ``name`` (str) and ``variables`` (dict, extra template variables).
"""

user_email_changed = _signals.signal("user-email-changed")
"""A user's address changed.

Keyword arguments: ``user_id``, ``old_email`` (str), ``new_email`` (str).
"""

user_deleted = _signals.signal("user-deleted")
"""A user was deleted; cloudmail cancels their pending mail and erases their address.

Keyword arguments: ``user_id``, ``email`` (str).
"""

licenses_allocated = _signals.signal("licenses-allocated")
"""Seats of a license were given to users: one signal for the whole allocation.

Keyword arguments: ``users`` (iterable of dicts, each with ``id``, ``email`` and
optionally ``name`` and more template variables) and ``license`` (dict with at least
``id``; everything in it, e.g. ``product``, ``seats``, ``expires``, reaches the
template as ``license``).
"""

user_seen = _signals.signal("user-seen")
"""A user was active; it resets their re-engagement clock.

Keyword arguments: ``user_id``, and optionally ``at`` (an aware datetime; now by
default).
"""

mail_outgoing = _signals.signal("mail-outgoing")
"""The host hands over one composed message to be sent through the cloud.

Keyword arguments: ``message`` (an :class:`email.message.Message` or its bytes),
``recipients`` (list of envelope addresses: To, Cc and Bcc), and optionally
``sender`` (the envelope sender; the From header by default) and ``category`` (str,
``"transactional"`` by default).
"""

recipient_delivered = _signals.signal("recipient-delivered")
"""SES delivered mail to a recipient's mail server (sent by the app).

Keyword arguments: ``job_id`` (int), ``recipient_ids`` (list of int), ``event_id``
(int, the stored :class:`~cloudmail.models.Event`).
"""

recipient_bounced = _signals.signal("recipient-bounced")
"""A recipient's mail bounced (sent by the app).

Keyword arguments: ``job_id`` (int), ``recipient_ids`` (list of int), ``event_id``
(int), ``permanent`` (bool: a permanent bounce also puts the address on the
suppression list), ``bounce_type`` and ``bounce_subtype`` (str or None, as SES
names them: ``Permanent``/``General``, ``Transient``/``MailboxFull``...).
"""

recipient_complained = _signals.signal("recipient-complained")
"""A recipient marked the mail as spam (sent by the app); the address is now on the
suppression list.

Keyword arguments: ``job_id`` (int), ``recipient_ids`` (list of int), ``event_id``
(int), ``feedback_type`` (str or None, e.g. ``abuse``).
"""
