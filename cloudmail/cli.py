"""The ``flask cloudmail`` commands: a thin click layer over the job manager."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from . import manager
from .errors import CloudmailError

logger = logging.getLogger(__name__)

cloudmail_cli = AppGroup("cloudmail", help="Send and track bulk mail with cloudmail.")


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user mistakes into one line on stderr and exit status 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (CloudmailError, LookupError, OSError) as err:
            raise click.ClickException(str(err).strip("'\"")) from None

    return wrapper


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


@cloudmail_cli.command("send")
@click.option(
    "--recipients",
    "recipients",
    required=True,
    type=click.Path(dir_okay=False),
    help="CSV file of recipients.",
)
@click.option("--subject", required=True, help="Subject template (Jinja).")
@click.option(
    "--html",
    "html_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="HTML body template file.",
)
@click.option(
    "--text",
    "text_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Text body template file (derived from the HTML when omitted).",
)
@click.option(
    "--encoding", help="The CSV file's encoding, e.g. cp1252 (default UTF-8)."
)
@click.option("--delimiter", help="Field separator (detected when omitted).")
@click.option(
    "--email-column", help="Header of the address column (detected when omitted)."
)
@click.option(
    "--name-column", help="Header of the name column (detected when omitted)."
)
@click.option("--name", "job_name", help="A name for the job.")
@click.option("--batch-size", type=int, help="Recipients per batch.")
@click.option("--category", help="Mail category (unsubscribes are per category).")
@click.option(
    "--unsubscribe",
    is_flag=True,
    help="Add a one-click unsubscribe link (needs CLOUDMAIL_UNSUBSCRIBE_URL).",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="With Redis: wait for the workers and show progress.",
)
@_friendly
def send_command(
    recipients: str,
    subject: str,
    html_path: str,
    text_path: str | None,
    encoding: str | None,
    delimiter: str | None,
    email_column: str | None,
    name_column: str | None,
    job_name: str | None,
    batch_size: int | None,
    category: str | None,
    unsubscribe: bool,
    wait: bool,
) -> None:
    """Create a job from a CSV file and send it."""
    job = manager.create_job(
        recipients,
        subject=subject,
        html=_read(html_path) or "",
        text=_read(text_path),
        name=job_name,
        encoding=encoding,
        delimiter=delimiter,
        email_column=email_column,
        name_column=name_column,
        batch_size=batch_size,
        category=category,
        unsubscribe=unsubscribe,
    )
    click.echo(f"Job {job.id}: {job.total} rows read, {job.pending} to send.", err=True)
    to_send = job.pending
    with click.progressbar(length=to_send, label="Sending", file=sys.stderr) as bar:
        seen = 0

        def advance(_batch_id: int) -> None:
            nonlocal seen
            done = _settled(job.id)
            bar.update(done - seen)
            seen = done

        manager.start_job(job.id, progress=advance)
        if wait and _uses_redis():
            while True:
                advance(0)
                status = manager.job_summary(job.id)["status"]
                if status not in ("queued", "sending"):
                    break
                time.sleep(0.5)
        advance(0)
    _print_summary(manager.job_summary(job.id))


def _settled(job_id: int) -> int:
    counters = manager.job_summary(job_id)["counters"]
    return sum(
        counters[s] for s in ("sent", "delivered", "bounced", "complained", "failed")
    )


def _uses_redis() -> bool:
    return bool(current_app.config["CLOUDMAIL_REDIS_URL"])


def _print_summary(summary: dict[str, Any]) -> None:
    c = summary["counters"]
    lines = [f"Job {summary['id']} {summary['status']}: {c['total']} rows"]
    for state in (
        "sent",
        "delivered",
        "bounced",
        "complained",
        "failed",
        "pending",
        "queued",
        "rejected",
        "suppressed",
    ):
        if c[state] or state in ("sent", "failed", "rejected"):
            lines.append(f"  {state:<11}{c[state]:>9,}")
    for reason, n in summary["rejected_by_reason"].items():
        lines.append(f"    {reason:<24}{n:>7,}")
    for reason, n in summary["failed_by_reason"].items():
        lines.append(f"    failed: {reason:<16}{n:>7,}")
    if summary["blank_lines"]:
        lines.append(f"  ({summary['blank_lines']} blank lines skipped; not rows)")
    if summary["provider"] == "outbox":
        from .extension import outbox_dir

        lines.append(f"Outbox: {outbox_dir(current_app)}/job-{summary['id']}")
    click.echo("\n".join(lines))


@cloudmail_cli.command("jobs")
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many recent jobs.",
)
@_friendly
def jobs_command(limit: int) -> None:
    """List recent jobs."""
    import sqlalchemy as sa

    from .extension import get_state
    from .models import Job

    rows = (
        get_state()
        .db.session.execute(sa.select(Job).order_by(Job.id.desc()).limit(limit))
        .scalars()
    )
    click.echo(
        f"{'id':>5}  {'status':<9} {'kind':<13} {'provider':<10} {'total':>9} "
        f"{'sent':>9} {'failed':>7}  name"
    )
    for job in rows:
        sent = job.sent + job.delivered + job.bounced + job.complained
        click.echo(
            f"{job.id:>5}  {job.status:<9} {job.kind:<13} {job.provider:<10} "
            f"{job.total:>9,} {sent:>9,} {job.failed:>7,}  {job.name}"
        )


@cloudmail_cli.command("status")
@click.argument("job_id", type=int)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the counters as one JSON object."
)
@_friendly
def status_command(job_id: int, as_json: bool) -> None:
    """Show a job's status and counters."""
    summary = manager.job_summary(job_id)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    _print_summary(summary)


@cloudmail_cli.command("rejects")
@click.argument("job_id", type=int)
@_friendly
def rejects_command(job_id: int) -> None:
    """Write a job's rejected rows, with reasons, as CSV to stdout."""
    manager.job_summary(job_id)
    manager.write_rejects(job_id, sys.stdout)


@cloudmail_cli.command("pause")
@click.argument("job_id", type=int)
@_friendly
def pause_command(job_id: int) -> None:
    """Pause a job."""
    manager.pause_job(job_id)
    click.echo(f"Job {job_id} paused.")


@cloudmail_cli.command("resume")
@click.argument("job_id", type=int)
@_friendly
def resume_command(job_id: int) -> None:
    """Resume a paused job (or re-enqueue batches Redis refused)."""
    n = manager.resume_job(job_id)
    click.echo(f"Job {job_id} resumed: {n} batches handed over.")


@cloudmail_cli.command("cancel")
@click.argument("job_id", type=int)
@_friendly
def cancel_command(job_id: int) -> None:
    """Cancel a job."""
    manager.cancel_job(job_id)
    click.echo(f"Job {job_id} cancelled.")


@cloudmail_cli.command("retry")
@click.argument("job_id", type=int)
@_friendly
def retry_command(job_id: int) -> None:
    """Send again to a job's failed recipients only."""
    n = manager.retry_failed(job_id)
    click.echo(f"Job {job_id}: {n} failed recipients sent again.")


@cloudmail_cli.command("recover")
@click.option(
    "--older-than",
    "minutes",
    type=click.IntRange(min=10),
    default=30,
    show_default=True,
    help="Minutes a batch must have been dispatched.",
)
@_friendly
def recover_command(minutes: int) -> None:
    """Hand over again batches stuck in 'dispatched' (same keys: no double sends)."""
    from datetime import timedelta

    from .dispatch import recover_stale

    recovered = recover_stale(timedelta(minutes=minutes))
    click.echo(f"{len(recovered)} stuck batches handed over again.")


@cloudmail_cli.command("worker")
@click.option("--burst", is_flag=True, help="Stop when the queue is empty.")
@click.option(
    "--fork/--no-fork",
    default=True,
    show_default=True,
    help="Run each batch in a forked child (RQ's Worker) or in-process.",
)
@_friendly
def worker_command(burst: bool, fork: bool) -> None:
    """Run an RQ worker for cloudmail's queue."""
    from rq import SimpleWorker, Worker

    from . import tasks
    from .extension import get_state

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    queue = get_state().queue(app)
    if queue is None:
        raise click.ClickException(
            "CLOUDMAIL_REDIS_URL is not set; without Redis, jobs are sent in-process "
            "and no worker is needed."
        )
    tasks.worker_app = app
    worker_class = Worker if fork else SimpleWorker
    worker = worker_class([queue], connection=queue.connection)
    worker.work(burst=burst, logging_level="INFO")


@cloudmail_cli.group("db")
def db_group() -> None:
    """Create or upgrade cloudmail's tables (its own Alembic history)."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@_friendly
def db_upgrade(revision: str) -> None:
    """Upgrade cloudmail's tables to a revision."""
    from .migrate import upgrade

    upgrade(revision)
    click.echo(f"cloudmail tables at {revision}.")


@db_group.command("downgrade")
@click.option("--revision", default="base", show_default=True)
@_friendly
def db_downgrade(revision: str) -> None:
    """Downgrade cloudmail's tables to a revision ('base' drops them)."""
    from .migrate import downgrade

    downgrade(revision)
    click.echo(f"cloudmail tables at {revision}.")


from .devcloud import dev_aws_command  # noqa: E402  (defined beside the local cloud)

cloudmail_cli.add_command(dev_aws_command)

from .cli_tracking import events_group, suppressions_group  # noqa: E402

cloudmail_cli.add_command(events_group)
cloudmail_cli.add_command(suppressions_group)

from .observers.reengagement import reengage_command  # noqa: E402

cloudmail_cli.add_command(reengage_command)
