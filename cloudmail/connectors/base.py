"""The interface every connector implements.

A connector takes the messages of one batch, already rendered, and hands them to a
provider. It does not touch the database: it says which recipients it handed over and
which it could not, and outcomes come back later as reports (see
:mod:`cloudmail.reports`), whether from a cloud function or, for the outbox, at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flask import Flask


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One recipient's mail, ready to send."""

    recipient_id: int
    #: Idempotency key ``cm-{job}-{recipient}-{attempt}``: a consumer sends at most
    #: one mail per key.
    key: str
    to: tuple[str, ...]
    sender: str
    message_id: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Which batch the messages belong to, and where reports go."""

    job_id: int
    batch_id: int
    number: int
    attempt: int
    callback_url: str | None = None


@dataclass
class HandOff:
    """What a connector did with a batch's messages.

    ``accepted`` recipients are with the provider (their outcome will be reported);
    ``refused`` ones were not handed over, with the reason, and go back to pending so
    a retry sends them.
    """

    accepted: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    provider_ref: str | None = None


class Connector(ABC):
    """Base class of connectors; one instance per batch dispatch."""

    #: The provider name, as in ``CLOUDMAIL_PROVIDER``.
    name: ClassVar[str]

    def __init__(self, app: Flask, settings: dict[str, Any]) -> None:
        self.app = app
        self.settings = settings

    @abstractmethod
    def dispatch(
        self, batch: BatchInfo, messages: Iterable[OutgoingMessage]
    ) -> HandOff:
        """Hand ``messages`` to the provider and say which were accepted.

        Raise :class:`~cloudmail.errors.DispatchError` only when nothing could be
        handed over and the batch should fail as a whole.
        """
