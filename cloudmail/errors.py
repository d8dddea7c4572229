"""Exceptions raised by cloudmail.

Every error is a :class:`CloudmailError` and also the builtin a caller would expect:
a configuration mistake is a :class:`RuntimeError`, bad input a :class:`ValueError`.
Messages are sentences that name the setting or value at fault and say how to fix it.
"""

from __future__ import annotations

from typing import Any


class CloudmailError(Exception):
    """Base class of every cloudmail error.

    ``job_id``, ``batch_id`` and ``connector`` say what the error happened to;
    ``response`` keeps a provider's answer when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: int | None = None,
        batch_id: int | None = None,
        connector: str | None = None,
        response: Any = None,
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.batch_id = batch_id
        self.connector = connector
        self.response = response


class ConfigurationError(CloudmailError, RuntimeError):
    """A ``CLOUDMAIL_*`` setting is missing or has a value cloudmail cannot use."""


class NotInitializedError(CloudmailError, RuntimeError):
    """cloudmail is used on an app whose ``init_app`` was never called."""


class InvalidTransition(CloudmailError, ValueError):
    """A job, batch or recipient was asked to move to a state its machine forbids."""


class RecipientImportError(CloudmailError, ValueError):
    """A recipient list cannot be read (undecodable bytes, no address column...)."""


class TemplateError(CloudmailError, ValueError):
    """A subject or body template does not compile or does not render."""


class MessageError(CloudmailError, ValueError):
    """A message cannot be built (a header value with a line break, for instance)."""


class DispatchError(CloudmailError):
    """A batch could not be handed over to its connector."""


class WebhookError(CloudmailError, ValueError):
    """A webhook request is malformed (answered with 400)."""


class WebhookVerificationError(CloudmailError, PermissionError):
    """A webhook request failed authentication (answered with 403).

    ``reason`` is a short sentence for the log; it is never sent back to the caller.
    """
