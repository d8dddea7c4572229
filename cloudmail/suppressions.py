"""The suppression list: addresses cloudmail will not mail.

A permanent bounce or a complaint puts the address on the list for every category
(``category`` empty), with the reason and the event that caused it. Admins list, add,
remove, import and export entries (``flask cloudmail suppressions ...``). New jobs
skip listed addresses with the reason ``suppressed`` (see
:func:`cloudmail.manager.create_job`); jobs already created are not changed.

Addresses are keyed like recipients: the address as sent (a Unicode domain in
punycode), lower-cased.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import tracking
from .addresses import AddressChecker
from .errors import RecipientImportError
from .extension import get_state
from .models import Suppression, utcnow

logger = logging.getLogger(__name__)

#: Reasons cloudmail writes itself; an admin may give any other (32 characters).
BOUNCE = "bounce"
COMPLAINT = "complaint"
ADMIN = "admin"
IMPORTED = "import"

EXPORT_COLUMNS = ("email", "category", "reason", "detail", "source", "created_at")
_CHUNK = 1000


@dataclass
class ImportOutcome:
    """How the rows of an imported file fared."""

    added: int = 0
    existing: int = 0
    invalid: int = 0


def address_key(address: str) -> str:
    """The suppression key of ``address``; raise :class:`ValueError` if unusable."""
    verdict = AddressChecker().check(address)
    if not verdict.ok:
        raise RecipientImportError(
            f"The address {address.strip()!r} cannot be suppressed: {verdict.detail}"
        )
    return verdict.key


def suppress(
    session: Session,
    email_key: str,
    *,
    reason: str,
    category: str = "",
    detail: str | None = None,
    source: str | None = None,
) -> bool:
    """Add one entry unless the address is already listed for ``category``.

    Does not commit: callers add the entry in the transaction that decided it.
    Returns True when the entry is new.
    """
    row = {
        "email_key": email_key[:320],
        "category": category,
        "reason": reason[:32],
        "detail": detail,
        "source": source[:64] if source else None,
        "created_at": utcnow(),
    }
    added = tracking.insert_or_skip(
        session, Suppression.__table__, [row], ("email_key", "category"), ("id",)
    )
    if added:
        logger.info("Suppression added: reason %s, source %s", reason, source)
    return bool(added)


def list_suppressions(
    *, category: str | None = None, search: str | None = None, limit: int | None = None
) -> list[Suppression]:
    """Entries, newest first; ``category`` "" means global ones only."""
    query = sa.select(Suppression).order_by(Suppression.id.desc())
    if category is not None:
        query = query.where(Suppression.category == category)
    if search:
        query = query.where(Suppression.email_key.contains(search.strip().lower()))
    if limit is not None:
        query = query.limit(limit)
    return list(get_state().db.session.execute(query).scalars())


def add_suppression(
    address: str,
    *,
    category: str = "",
    reason: str = ADMIN,
    detail: str | None = None,
    source: str = ADMIN,
) -> bool:
    """Put ``address`` on the list and commit; False when it was already there."""
    session = get_state().db.session
    added = suppress(
        session,
        address_key(address),
        reason=reason,
        category=category,
        detail=detail,
        source=source,
    )
    session.commit()
    return added


def remove_suppression(address: str, *, category: str | None = "") -> int:
    """Take ``address`` off the list for ``category`` (None: every category).

    Returns how many entries were removed. Recipients already suppressed in existing
    jobs stay suppressed; only new jobs mail the address again.
    """
    session = get_state().db.session
    key = address.strip().lower()
    statement = sa.delete(Suppression).where(Suppression.email_key == key)
    if category is not None:
        statement = statement.where(Suppression.category == category)
    removed = session.execute(statement).rowcount
    session.commit()
    if removed:
        logger.info("Suppression removed: %d entries", removed)
    return removed


def import_suppressions(
    stream: IO[str], *, reason: str = IMPORTED, category: str = ""
) -> ImportOutcome:
    """Add the addresses of a CSV file (one a line, or an ``email`` column).

    A file written by :func:`export_suppressions` imports as it was: its category,
    reason and detail columns are kept. Invalid addresses are counted and skipped.
    """
    outcome = ImportOutcome()
    session = get_state().db.session
    rows = []
    for record in _records(stream):
        try:
            key = address_key(record["email"])
        except ValueError:
            outcome.invalid += 1
            continue
        rows.append(
            {
                "email_key": key,
                "category": record.get("category") or category,
                "reason": (record.get("reason") or reason)[:32],
                "detail": record.get("detail") or None,
                "source": (record.get("source") or IMPORTED)[:64],
                "created_at": utcnow(),
            }
        )

    # One key may appear twice in a file; the database keeps the first.
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        first.setdefault((row["email_key"], row["category"]), row)
    unique = list(first.values())
    outcome.existing = len(rows) - len(unique)
    for start in range(0, len(unique), _CHUNK):
        chunk = unique[start : start + _CHUNK]
        added = tracking.insert_or_skip(
            session, Suppression.__table__, chunk, ("email_key", "category"), ("id",)
        )
        outcome.added += len(added)
        outcome.existing += len(chunk) - len(added)
    session.commit()
    logger.info(
        "Suppressions imported: %d added, %d already listed, %d invalid",
        outcome.added,
        outcome.existing,
        outcome.invalid,
    )
    return outcome


def export_suppressions(out: IO[str], *, category: str | None = None) -> int:
    """Write the list as CSV (``EXPORT_COLUMNS``); return how many entries."""
    session = get_state().db.session
    query = sa.select(Suppression).order_by(Suppression.id)
    if category is not None:
        query = query.where(Suppression.category == category)
    writer = csv.writer(out)
    writer.writerow(EXPORT_COLUMNS)
    count = 0
    for entry in session.execute(query.execution_options(yield_per=2000)).scalars():
        writer.writerow(
            [
                entry.email_key,
                entry.category,
                entry.reason,
                entry.detail or "",
                entry.source or "",
                entry.created_at.isoformat() if entry.created_at else "",
            ]
        )
        count += 1
    return count


def _records(stream: IO[str]) -> Iterable[dict[str, str]]:
    """Rows of a CSV with an ``email`` header, or of a headerless list of addresses."""
    reader = csv.reader(stream)
    first = next(reader, None)
    if first is None:
        return
    header = [cell.strip().lower().lstrip("\ufeff") for cell in first]
    if "email" in header:
        for cells in reader:
            record = dict(zip(header, (c.strip() for c in cells), strict=False))
            if record.get("email"):
                yield record
        return

    for cells in [first, *reader]:
        if cells and cells[0].strip():
            yield {"email": cells[0].strip().lstrip("\ufeff")}
