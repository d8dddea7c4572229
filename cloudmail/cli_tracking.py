"""``flask cloudmail events ...`` and ``flask cloudmail suppressions ...``.

A thin click layer over :mod:`cloudmail.events` and :mod:`cloudmail.suppressions`.
"""

from __future__ import annotations

import sys

import click
from flask.cli import AppGroup

from . import events, suppressions
from .cli import _friendly

events_group = AppGroup("events", help="Inspect and replay stored callback events.")
suppressions_group = AppGroup("suppressions", help="Manage the suppression list.")


@events_group.command("list")
@click.option(
    "--status",
    type=click.Choice(["pending", "applied", "failed", "ignored"]),
    help="Only events in this status.",
)
@click.option("--limit", default=50, show_default=True, help="How many recent events.")
@_friendly
def events_list(status: str | None, limit: int) -> None:
    """List recent events, newest first."""
    click.echo(
        f"{'id':>8}  {'source':<7}{'kind':<18}{'status':<9}{'job':>7}{'rcpt':>9}  "
        "received             error"
    )
    for event in events.list_events(status, limit):
        received = (
            event.received_at.strftime("%Y-%m-%d %H:%M:%S") if event.received_at else ""
        )
        click.echo(
            f"{event.id:>8}  {event.source:<7}{event.kind:<18}{event.status:<9}"
            f"{event.job_id or '':>7}{event.recipient_id or '':>9}  {received:<20} "
            f"{(event.error or '')[:60]}"
        )


@events_group.command("replay")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Replay pending events too (those still waiting for their report).",
)
@click.option(
    "--failed",
    "failed_only",
    is_flag=True,
    help="Replay failed events only (the default).",
)
@click.option("--limit", type=int, help="Replay at most this many events.")
@_friendly
def events_replay(everything: bool, failed_only: bool, limit: int | None) -> None:
    """Apply failed events again (with --all, pending ones too)."""
    if everything and failed_only:
        raise click.UsageError("Give --all or --failed, not both.")
    statuses = events.OPEN if everything else (events.FAILED,)
    outcome = events.replay(statuses, limit=limit)
    total = sum(outcome.counts.values())
    detail = ", ".join(f"{n} {status}" for status, n in sorted(outcome.counts.items()))
    click.echo(f"{total} events replayed" + (f": {detail}." if detail else "."))


@suppressions_group.command("list")
@click.option("--category", help="Only this category ('' for global entries).")
@click.option("--search", help="Only addresses containing this text.")
@click.option("--limit", default=100, show_default=True, help="How many entries.")
@_friendly
def suppressions_list(category: str | None, search: str | None, limit: int) -> None:
    """List suppressed addresses, newest first."""
    for entry in suppressions.list_suppressions(
        category=category, search=search, limit=limit
    ):
        added = entry.created_at.strftime("%Y-%m-%d") if entry.created_at else ""
        click.echo(
            f"{entry.email_key:<40} {entry.category or '*':<12} {entry.reason:<10} "
            f"{added:<10} {entry.source or ''}"
        )


@suppressions_group.command("add")
@click.argument("address")
@click.option("--category", default="", help="Suppress for one category only.")
@click.option("--reason", default=suppressions.ADMIN, show_default=True)
@click.option("--detail", help="A note kept with the entry.")
@_friendly
def suppressions_add(
    address: str, category: str, reason: str, detail: str | None
) -> None:
    """Put an address on the suppression list."""
    if suppressions.add_suppression(
        address, category=category, reason=reason, detail=detail
    ):
        click.echo(f"{address} suppressed.")
    else:
        click.echo(f"{address} was already suppressed.")


@suppressions_group.command("remove")
@click.argument("address")
@click.option("--category", default="", help="The category to remove it from.")
@click.option("--all-categories", is_flag=True, help="Remove it from every category.")
@_friendly
def suppressions_remove(address: str, category: str, all_categories: bool) -> None:
    """Take an address off the suppression list."""
    removed = suppressions.remove_suppression(
        address, category=None if all_categories else category
    )
    if not removed:
        raise click.ClickException(f"{address} is not on the suppression list.")
    click.echo(f"{address}: {removed} entries removed.")


@suppressions_group.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8-sig"))
@click.option("--category", default="", help="Category for rows that name none.")
@click.option("--reason", default=suppressions.IMPORTED, show_default=True)
@_friendly
def suppressions_import(file: click.utils.LazyFile, category: str, reason: str) -> None:
    """Add the addresses of a CSV file (an 'email' column, or one address a line)."""
    outcome = suppressions.import_suppressions(file, reason=reason, category=category)  # type: ignore[arg-type]
    click.echo(
        f"{outcome.added} added, {outcome.existing} already listed, "
        f"{outcome.invalid} invalid."
    )


@suppressions_group.command("export")
@click.option("--category", help="Only this category ('' for global entries).")
@_friendly
def suppressions_export(category: str | None) -> None:
    """Write the suppression list as CSV to stdout."""
    suppressions.export_suppressions(sys.stdout, category=category)
