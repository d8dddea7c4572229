"""The state machines of jobs, batches and recipients.

Each machine is a mapping from a state to the states it may move to; anything else is
refused with :class:`~cloudmail.errors.InvalidTransition`. ``docs/states.md`` draws
the same machines and says what moves each edge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import InvalidTransition

JOB_STATES = ("draft", "queued", "sending", "paused", "done", "failed", "cancelled")
BATCH_STATES = ("pending", "enqueued", "dispatched", "done", "failed")
RECIPIENT_STATES = (
    "pending",
    "queued",
    "sent",
    "delivered",
    "bounced",
    "complained",
    "failed",
    "rejected",
    "suppressed",
)

JOB_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "draft": frozenset({"queued", "cancelled", "failed"}),
    "queued": frozenset({"sending", "paused", "cancelled", "done", "failed"}),
    "sending": frozenset({"paused", "cancelled", "done", "failed"}),
    "paused": frozenset({"queued", "cancelled"}),
    # "Retry failed recipients" reopens a finished job.
    "done": frozenset({"queued"}),
    "failed": frozenset({"queued", "cancelled"}),
    "cancelled": frozenset(),
}

BATCH_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "pending": frozenset({"enqueued", "done", "failed"}),
    # Back to pending when the job is paused before a worker claimed the batch, or
    # when the queue refused the hand-over.
    "enqueued": frozenset({"dispatched", "pending", "failed"}),
    "dispatched": frozenset({"done", "failed"}),
    "done": frozenset(),
    "failed": frozenset({"pending"}),
}

RECIPIENT_TRANSITIONS: Mapping[str, frozenset[str]] = {
    # Rejected and suppressed are decided while a job is a draft (duplicates are only
    # known once the whole list is in); failed is how a deleted user's mail is stopped.
    "pending": frozenset({"queued", "rejected", "suppressed", "failed"}),
    # Back to pending when the connector could not take the recipient's message.
    "queued": frozenset({"sent", "failed", "pending"}),
    "sent": frozenset({"delivered", "bounced", "complained", "failed"}),
    # Bounces can arrive after a delivery notice; complaints come after delivery.
    "delivered": frozenset({"bounced", "complained"}),
    "bounced": frozenset({"complained"}),
    "complained": frozenset(),
    "failed": frozenset({"pending"}),
    "rejected": frozenset(),
    "suppressed": frozenset(),
}

#: Recipient states that end a recipient's dispatch: nothing more is sent to them
#: within this job unless an admin retries the failed ones.
RECIPIENT_SETTLED = frozenset(RECIPIENT_STATES) - {"pending", "queued"}

#: Job states in which workers may claim the job's batches.
JOB_ACTIVE = frozenset({"queued", "sending"})


def _check(
    machine: Mapping[str, frozenset[str]], kind: str, source: str, target: str
) -> None:
    if source not in machine:
        raise InvalidTransition(f"Unknown {kind} state {source!r}.")

    if target not in machine[source]:
        allowed = ", ".join(sorted(machine[source])) or "nothing"
        raise InvalidTransition(
            f"A {kind} cannot move from {source!r} to {target!r}; "
            f"from {source!r} it may move to {allowed}."
        )


def check_job(source: str, target: str) -> None:
    """Raise :class:`InvalidTransition` unless a job may move from source to target."""
    _check(JOB_TRANSITIONS, "job", source, target)


def check_batch(source: str, target: str) -> None:
    """Raise :class:`InvalidTransition` unless a batch may move from source to target."""
    _check(BATCH_TRANSITIONS, "batch", source, target)


def check_recipient(source: str, target: str) -> None:
    """Raise :class:`InvalidTransition` unless a recipient may move source to target."""
    _check(RECIPIENT_TRANSITIONS, "recipient", source, target)


def sources(machine: Mapping[str, frozenset[str]], target: str) -> tuple[str, ...]:
    """Every state of ``machine`` from which ``target`` can be reached in one step."""
    return tuple(sorted(s for s, targets in machine.items() if target in targets))


def recipient_sources(
    target: str, among: Iterable[str] | None = None
) -> tuple[str, ...]:
    """The recipient states that may move to ``target`` (optionally within ``among``)."""
    found = sources(RECIPIENT_TRANSITIONS, target)
    if among is None:
        return found

    wanted = set(among)
    return tuple(s for s in found if s in wanted)
