"""The blueprint: admin pages for cloud jobs.

Every admin page denies access until the host says who is an admin through
``CLOUDMAIL_ADMIN_CHECK``; the 403 page names that setting. Every POST carries a CSRF
token (see ``extension._protect_forms``); every action asks for a confirmation that
works without JavaScript: the first POST answers with a confirmation page whose form
posts again with ``confirmed=yes`` (``cloud_jobs.js`` asks with a dialog instead).

Lists page by key (``id > after``), never by OFFSET, so a page deep in a job of a
million recipients costs what the first one does.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError, generate_csrf

from . import callbacks, manager, suppressions, tracking, unsubscribe
from .addresses import AddressChecker
from .errors import CloudmailError
from .extension import PROVIDERS, get_state
from .models import Batch, Job, Recipient, Suppression
from .rendering import MessageTemplate, recipient_context
from .resources import resource_dir
from .settings import VALIDATORS, all_settings, set_setting
from .states import JOB_STATES, RECIPIENT_STATES

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
#: Endpoints open without admin rights: each verifies its caller on its own.
PUBLIC_ENDPOINTS = ("cloudmail.callback", "cloudmail.public_")
JOB_KINDS = ("bulk", "transactional", "observer")
#: The segments of a progress bar, in the order they are drawn.
OUTCOMES = (
    "delivered",
    "sent",
    "bounced",
    "complained",
    "failed",
    "rejected",
    "suppressed",
    "waiting",
)
#: Recipient states the over-time chart counts (where a recipient's mail ended up).
CHART_STATES = ("delivered", "sent", "bounced", "complained", "failed")
#: Job states in which the pages poll for progress.
LIVE_STATES = ("queued", "sending", "paused")
PREVIEW_COUNT = 3
#: Chart bucket widths in seconds; the first that gives at most 48 buckets is used.
_STEPS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
_MAX_BUCKETS = 48
#: A running job's chart and summary are recomputed at most this often (seconds).
_REFRESH = 5.0


@dataclass(frozen=True)
class Action:
    label: str
    question: str
    allowed: tuple[str, ...]
    danger: bool = False


ACTIONS = {
    "start": Action(
        "Start sending", "Send job #{id} to its {pending:,} recipients?", ("draft",)
    ),
    "pause": Action(
        "Pause",
        "Pause job #{id}? Batches already with a worker finish.",
        ("queued", "sending"),
    ),
    "resume": Action("Resume", "Resume sending job #{id}?", ("paused",)),
    "cancel": Action(
        "Cancel job",
        "Cancel job #{id}? No more of its mail is sent; this cannot be undone.",
        ("draft", "queued", "sending", "paused", "failed"),
        danger=True,
    ),
    "retry": Action(
        "Retry failed recipients",
        "Send job #{id} again to its {failed:,} failed recipients?",
        ("done", "failed", "queued", "sending", "paused"),
    ),
}


def make_blueprint() -> Blueprint:
    """Build the blueprint (one per app: routes read per-app state at request time)."""
    bp = Blueprint(
        "cloudmail",
        __name__,
        template_folder=str(resource_dir("templates")),
        static_folder=str(resource_dir("static") / "cloudmail"),
        static_url_path="/static",
    )
    bp.before_request(_require_admin)
    bp.context_processor(_template_helpers)
    bp.register_error_handler(CSRFError, _csrf_failed)
    bp.add_url_rule("/jobs", "jobs", jobs_page)
    bp.add_url_rule("/jobs/progress.json", "jobs_progress", jobs_progress)
    bp.add_url_rule("/jobs/new", "new_job", new_job, methods=["GET", "POST"])
    bp.add_url_rule("/jobs/<int:job_id>", "job", job_page)
    bp.add_url_rule("/jobs/<int:job_id>/progress.json", "job_progress", job_progress)
    bp.add_url_rule("/jobs/<int:job_id>/recipients", "recipients", recipients_page)
    bp.add_url_rule(
        "/jobs/<int:job_id>/recipients/<int:recipient_id>", "recipient", recipient_page
    )
    bp.add_url_rule("/jobs/<int:job_id>/rejects", "rejects", rejects_page)
    bp.add_url_rule("/jobs/<int:job_id>/rejects.csv", "rejects_csv", rejects_csv)
    bp.add_url_rule("/jobs/<int:job_id>/test", "send_test", send_test, methods=["POST"])
    bp.add_url_rule(
        "/jobs/<int:job_id>/<action>", "job_action", job_action, methods=["POST"]
    )
    bp.add_url_rule("/settings", "settings", settings_page, methods=["GET", "POST"])
    bp.add_url_rule("/suppressions", "suppressions", suppressions_page)
    bp.add_url_rule(
        "/suppressions", "add_suppression", add_suppression, methods=["POST"]
    )
    bp.add_url_rule(
        "/suppressions/<int:suppression_id>/remove",
        "remove_suppression",
        remove_suppression,
        methods=["POST"],
    )
    bp.add_url_rule("/suppressions.csv", "suppressions_csv", suppressions_csv)
    callbacks.register(bp)
    unsubscribe.register(bp)
    return bp


# -- access ------------------------------------------------------------------------


def _require_admin() -> ResponseReturnValue | None:
    # Webhooks and recipients' own pages (unsubscribe) authenticate by signature.
    endpoint = request.endpoint or ""
    if endpoint == "cloudmail.static" or endpoint.startswith(PUBLIC_ENDPOINTS):
        return None

    check = current_app.config["CLOUDMAIL_ADMIN_CHECK"]
    allowed = False
    if check is not None:
        try:
            allowed = bool(check())
        except Exception:
            logger.error("CLOUDMAIL_ADMIN_CHECK raised; access denied", exc_info=True)
    if allowed:
        return None

    return render_template(
        "cloudmail/denied.html", configured=check is not None, login_url=_login_url()
    ), 403


def _login_url() -> str | None:
    # Flask-Login's login view, or a host route named "login" (the demo's).
    manager_ = getattr(current_app, "login_manager", None)
    endpoint = getattr(manager_, "login_view", None) or "login"
    if endpoint not in current_app.view_functions:
        return None
    return url_for(
        endpoint, next=request.full_path if request.method == "GET" else None
    )


def _csrf_failed(err: CSRFError) -> ResponseReturnValue:
    return render_template("cloudmail/bad_request.html", reason=err.description), 400


def _template_helpers() -> dict[str, Any]:
    return {
        "csrf_token": generate_csrf,
        "bar_segments": bar_segments,
        "job_actions": job_actions,
        "LIVE_STATES": LIVE_STATES,
        "ACTIONS_ALL": list(ACTIONS.items()),
        "RECIPIENT_STATES": RECIPIENT_STATES,
    }


# -- jobs list ---------------------------------------------------------------------


def jobs_page() -> ResponseReturnValue:
    session = get_state().db.session
    status = _choice("status", JOB_STATES)
    kind = _choice("kind", JOB_KINDS)
    before = request.args.get("before", type=int)

    query = sa.select(Job).order_by(Job.id.desc()).limit(PAGE_SIZE + 1)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    if before:
        query = query.where(Job.id < before)
    jobs = list(session.execute(query).scalars())
    more = len(jobs) > PAGE_SIZE
    jobs = jobs[:PAGE_SIZE]
    return render_template(
        "cloudmail/jobs.html",
        jobs=jobs,
        status=status,
        kind=kind,
        statuses=JOB_STATES,
        kinds=JOB_KINDS,
        first_page=before is None,
        next_before=jobs[-1].id if more else None,
    )


def jobs_progress() -> ResponseReturnValue:
    """Status and counters of the jobs named by ``?id=`` (at most one page of them)."""
    ids = [i for i in request.args.getlist("id", type=int)][:PAGE_SIZE]
    session = get_state().db.session
    jobs = (
        session.execute(sa.select(Job).where(Job.id.in_(ids))).scalars() if ids else []
    )
    return jsonify(jobs=[_progress(job) for job in jobs])


def _choice(name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.args.get(name) or None
    return value if value in allowed else None


# -- one job -----------------------------------------------------------------------


def _job_or_404(job_id: int) -> Job:
    # populate_existing: a session that outlives one request (a host's, or a test's)
    # must not show counters another process has moved since.
    job = get_state().db.session.get(Job, job_id, populate_existing=True)
    if job is None:
        abort(404)
    return job


def job_page(job_id: int) -> ResponseReturnValue:
    job = _job_or_404(job_id)
    after = request.args.get("batches_after", type=int)
    batches = _batches(job_id, after)
    more_batches = len(batches) > PAGE_SIZE
    batches = batches[:PAGE_SIZE]
    context: dict[str, Any] = {}
    if job.status == "draft":
        context["previews"] = _previews(job)
    return render_template(
        "cloudmail/job.html",
        job=job,
        summary=summary(job),
        timeline=timeline(job),
        batches=batches,
        batch_counts=_batch_counts(job_id),
        first_batches=after is None,
        next_batches=batches[-1].number if more_batches else None,
        **context,
    )


def job_progress(job_id: int) -> ResponseReturnValue:
    """The JSON the detail page polls: status, counters, batches and the chart."""
    job = _job_or_404(job_id)
    data = _progress(job)
    data["batches"] = _batch_counts(job_id)
    chart = timeline(job)
    data["chart_html"] = render_template("cloudmail/_chart.html", timeline=chart)
    return jsonify(data)


def _progress(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "live": job.status in LIVE_STATES,
        "counters": job.counters(),
        "segments": [
            {"outcome": name, "count": count, "percent": percent}
            for name, count, percent in bar_segments(job)
        ],
        "actions": [name for name, _ in job_actions(job)],
        "updated_at": job.updated_at.isoformat() if job.updated_at else None,
    }


def bar_segments(job: Job) -> list[tuple[str, int, float]]:
    """``(outcome, count, percent of total)`` for each segment of a job's progress bar."""
    counts = job.counters()
    values = {name: counts.get(name, 0) for name in OUTCOMES}
    values["waiting"] = counts["pending"] + counts["queued"]
    total = counts["total"] or 1
    return [
        (name, values[name], round(100 * values[name] / total, 3)) for name in OUTCOMES
    ]


def job_actions(job: Job) -> list[tuple[str, Action]]:
    """The actions an admin may take on a job in its current state."""
    found = []
    for name, action in ACTIONS.items():
        if job.status not in action.allowed:
            continue
        if name == "retry" and not job.failed:
            continue
        found.append((name, action))
    return found


def _batches(job_id: int, after: int | None) -> list[Batch]:
    query = (
        sa.select(Batch)
        .where(Batch.job_id == job_id)
        .order_by(Batch.number)
        .limit(PAGE_SIZE + 1)
    )
    if after is not None:
        query = query.where(Batch.number > after)
    return list(get_state().db.session.execute(query).scalars())


def _batch_counts(job_id: int) -> dict[str, int]:
    rows = (
        get_state()
        .db.session.execute(
            sa.select(Batch.status, sa.func.count())
            .where(Batch.job_id == job_id)
            .group_by(Batch.status)
        )
        .all()
    )
    return {status: n for status, n in rows}


def _previews(job: Job) -> list[dict[str, Any]]:
    """The message rendered for the job's first few valid recipients."""
    rows = (
        get_state()
        .db.session.execute(
            sa.select(Recipient)
            .where(Recipient.job_id == job.id, Recipient.status == "pending")
            .order_by(Recipient.id)
            .limit(PREVIEW_COUNT)
        )
        .scalars()
    )
    previews = []
    try:
        template = MessageTemplate(
            job.subject_template, job.html_template, job.text_template
        )
    except CloudmailError as err:
        return [{"recipient": None, "error": str(err)}]

    for row in rows:
        context = recipient_context(
            email=row.email,
            display=row.email_display,
            name=row.name,
            variables=row.variables,
        )
        try:
            previews.append({"recipient": row, "rendered": template.render(context)})
        except CloudmailError as err:
            previews.append({"recipient": row, "error": str(err)})
    return previews


# -- the chart ----------------------------------------------------------------------

# Known limitation: cloudmail keeps no per-event history. The chart places each
# recipient's current outcome at the time its batch was handed over (the batch's
# ``finished_at``, else ``dispatched_at``): a mail sent at 10:00 and delivered at 10:02
# shows as delivered at 10:00. That choice keeps the query cheap: counting by
# ``(batch_no, status)`` is an index-only scan of ``ix_cloudmail_recipients_job_batch``
# (about 0.2 s for a million rows here, against about 2 s for bucketing every row's
# ``updated_at``), and the batches table has a few hundred rows per million
# recipients. Results are cached per process, keyed by the job's ``updated_at`` (every
# counter move touches it), and a running job's are recomputed at most every few
# seconds, so polling never rescans a million rows on each request.
_cache: weakref.WeakKeyDictionary[
    Any, dict[tuple[str, int], tuple[Any, float, Any]]
] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _cached(kind: str, job: Job, compute: Callable[[Job], Any]) -> Any:
    """``compute(job)``, reused while the job has not changed (or briefly, if running)."""
    state = get_state()
    key = (job.status, job.updated_at, tuple(job.counters().values()))
    now = time.monotonic()
    with _cache_lock:
        cached = _cache.setdefault(state, {}).get((kind, job.id))
    if cached is not None:
        cached_key, computed, data = cached
        if cached_key == key or (
            job.status in LIVE_STATES and now - computed < _REFRESH
        ):
            return data

    data = compute(job)
    with _cache_lock:
        _cache[state][(kind, job.id)] = (key, now, data)
    return data


def timeline(job: Job) -> dict[str, Any] | None:
    """The job's outcomes over time, bucketed; None before a batch was handed over."""
    if job.status == "draft":
        return None
    return _cached("timeline", job, _compute_timeline)


def summary(job: Job) -> dict[str, Any]:
    """:func:`manager.job_summary` (rejections and failures by reason), cached."""
    return _cached("summary", job, lambda j: manager.job_summary(j.id))


def _aware(value: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; cloudmail writes UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _compute_timeline(job: Job) -> dict[str, Any] | None:
    session = get_state().db.session
    sent_at = sa.func.coalesce(Batch.finished_at, Batch.dispatched_at)
    times = {
        number: _aware(moment)
        for number, moment in session.execute(
            sa.select(Batch.number, sent_at).where(Batch.job_id == job.id)
        )
        if moment is not None
    }
    if not times:
        return None

    rows = session.execute(
        sa.select(Recipient.batch_no, Recipient.status, sa.func.count())
        .where(Recipient.job_id == job.id, Recipient.status.in_(CHART_STATES))
        .group_by(Recipient.batch_no, Recipient.status)
    ).all()
    start = min(times.values())
    span = max((max(times.values()) - start).total_seconds(), 1.0)
    step = next((s for s in _STEPS if span / s < _MAX_BUCKETS), _STEPS[-1])
    count = int(span // step) + 1
    buckets = [{state: 0 for state in CHART_STATES} for _ in range(count)]
    for number, status, n in rows:
        moment = times.get(number)
        if moment is not None:
            index = min(int((moment - start).total_seconds() // step), count - 1)
            buckets[index][status] += n
    origin = int(start.timestamp()) // step * step
    return {
        "step": step,
        "states": CHART_STATES,
        "peak": max(sum(b.values()) for b in buckets) or 1,
        "buckets": [
            {"label": _bucket_label(origin + i * step, step), "counts": counts}
            for i, counts in enumerate(buckets)
        ],
    }


def _bucket_label(epoch: int, step: int) -> str:
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    if step >= 86400:
        return moment.strftime("%Y-%m-%d")
    if step >= 60:
        return moment.strftime("%H:%M")
    return moment.strftime("%H:%M:%S")


# -- recipients --------------------------------------------------------------------


def recipients_page(job_id: int) -> ResponseReturnValue:
    job = _job_or_404(job_id)
    status = _choice("status", RECIPIENT_STATES)
    search = (request.args.get("q") or "").strip()
    after = request.args.get("after", type=int)

    query = _recipient_rows(job_id, after)
    if status:
        query = query.where(Recipient.status == status)
    if search:
        query = query.where(*_prefix(Recipient.email_key, search.lower()))
    rows = get_state().db.session.execute(query).all()
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return render_template(
        "cloudmail/recipients.html",
        job=job,
        rows=rows,
        status=status,
        search=search,
        statuses=RECIPIENT_STATES,
        first_page=after is None,
        next_after=rows[-1].id if more else None,
    )


def _recipient_rows(job_id: int, after: int | None) -> sa.Select:
    query = (
        sa.select(
            Recipient.id,
            Recipient.line,
            Recipient.email,
            Recipient.email_display,
            Recipient.name,
            Recipient.status,
            Recipient.reason,
            Recipient.error,
            Recipient.attempts,
            Recipient.batch_no,
            Recipient.updated_at,
        )
        .where(Recipient.job_id == job_id)
        .order_by(Recipient.id)
        .limit(PAGE_SIZE + 1)
    )
    if after is not None:
        query = query.where(Recipient.id > after)
    return query


def _prefix(column: Any, text: str) -> tuple[sa.ColumnElement[bool], ...]:
    """Conditions for "starts with ``text``" that an ordinary btree index can serve.

    Known limitation: the range half is exact under a code-point collation (C,
    C.UTF-8, SQLite's default); under a linguistic collation a few addresses that
    start with the text may sort outside the range and be missed.
    """
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return (
        column >= text,
        column < text + "\uffff",
        column.like(escaped + "%", escape="\\"),
    )


def recipient_page(job_id: int, recipient_id: int) -> ResponseReturnValue:
    job = _job_or_404(job_id)
    recipient = get_state().db.session.get(Recipient, recipient_id)
    if recipient is None or recipient.job_id != job_id:
        abort(404)

    try:
        variables = json.loads(recipient.variables or "{}")
    except ValueError:
        variables = recipient.variables
    return render_template(
        "cloudmail/recipient.html", job=job, recipient=recipient, variables=variables
    )


def rejects_page(job_id: int) -> ResponseReturnValue:
    job = _job_or_404(job_id)
    after = request.args.get("after", type=int)
    query = _recipient_rows(job_id, after).where(
        Recipient.status.in_(("rejected", "suppressed"))
    )
    rows = get_state().db.session.execute(query).all()
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return render_template(
        "cloudmail/rejects.html",
        job=job,
        summary=summary(job),
        rows=rows,
        first_page=after is None,
        next_after=rows[-1].id if more else None,
    )


def rejects_csv(job_id: int) -> ResponseReturnValue:
    _job_or_404(job_id)
    return _spooled_csv(
        lambda out: manager.write_rejects(job_id, out), f"job-{job_id}-rejects.csv"
    )


def _spooled_csv(write: Callable[[Any], int], filename: str) -> Response:
    # The writers write to a file; a spooled one keeps a long list off the heap.
    spool = tempfile.SpooledTemporaryFile(
        max_size=8 << 20, mode="w+", newline="", encoding="utf-8"
    )
    write(spool)
    spool.seek(0)

    def chunks() -> Iterator[str]:
        with spool:
            while block := spool.read(64 << 10):
                yield block

    return _csv_response(chunks(), filename)


def _csv_response(body: Iterator[str], filename: str) -> Response:
    return Response(
        body,
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# -- new job, test send, actions ---------------------------------------------------


def new_job() -> ResponseReturnValue:
    form = {
        key: request.form.get(key, "")
        for key in ("name", "subject", "html", "text", "category")
    }
    if request.method == "GET":
        return render_template("cloudmail/new_job.html", form=form, error=None)

    upload = request.files.get("recipients")
    error = None
    if upload is None or not upload.filename:
        error = "Choose the CSV file of recipients."
    elif not form["subject"].strip() or not form["html"].strip():
        error = "Write a subject and an HTML body."
    if error is None:
        try:
            job = manager.create_job(
                upload.stream,
                subject=form["subject"],
                html=form["html"],
                text=form["text"] or None,
                name=form["name"].strip() or f"Mailing to {upload.filename}"[:200],
                category=form["category"].strip() or None,
            )
        except CloudmailError as err:
            error = str(err)
    if error is not None:
        return render_template("cloudmail/new_job.html", form=form, error=error), 400

    flash(
        f"Draft job #{job.id} created. Check the preview and the rejected rows, "
        "then start it.",
        "success",
    )
    return redirect(url_for("cloudmail.job", job_id=job.id))


def send_test(job_id: int) -> ResponseReturnValue:
    """Send the draft's message, as its first recipient would get it, to one address."""
    job = _job_or_404(job_id)
    verdict = AddressChecker().check(request.form.get("address", "").strip())
    back = redirect(url_for("cloudmail.job", job_id=job_id) + "#test")
    if not verdict.ok:
        flash(
            f"The test address is not usable: {verdict.detail or verdict.reason}.",
            "error",
        )
        return back

    first = (
        get_state()
        .db.session.execute(
            sa.select(Recipient.variables)
            .where(Recipient.job_id == job_id, Recipient.status == "pending")
            .order_by(Recipient.id)
            .limit(1)
        )
        .scalar()
    )
    variables = json.loads(first) if first else {}
    row = {**(variables if isinstance(variables, dict) else {}), "email": verdict.email}
    try:
        test = manager.create_job(
            [row],
            subject=job.subject_template,
            html=job.html_template,
            text=job.text_template,
            name=f"Test of job #{job.id}: {job.name}"[:200],
            email_column="email",
            category=job.category,
            sender=job.sender,
            reply_to=job.reply_to,
            provider=job.provider,
        )
        _start(test)
    except CloudmailError as err:
        flash(f"The test could not be sent: {err}", "error")
        return back

    flash(f"Test sent to {verdict.email} as job #{test.id}.", "success")
    return back


def job_action(job_id: int, action: str) -> ResponseReturnValue:
    job = _job_or_404(job_id)
    spec = ACTIONS.get(action)
    if spec is None:
        abort(404)

    back = redirect(url_for("cloudmail.job", job_id=job_id))
    if action not in dict(job_actions(job)):
        flash(
            f"Job #{job_id} is {job.status}; “{spec.label}” is not possible now.",
            "error",
        )
        return back

    question = spec.question.format(**{"id": job.id, **job.counters()})
    if request.form.get("confirmed") != "yes":
        return render_template(
            "cloudmail/confirm.html",
            job=job,
            action=action,
            spec=spec,
            question=question,
        )

    try:
        message = _perform(job, action)
    except CloudmailError as err:
        get_state().db.session.rollback()
        logger.warning("Job %s: %s failed: %s", job_id, action, err)
        flash(str(err), "error")
        return back

    flash(message, "success")
    return back


def _perform(job: Job, action: str) -> str:
    if action == "start":
        _start(job)
        return f"Job #{job.id} started."
    if action == "pause":
        manager.pause_job(job.id)
        return f"Job #{job.id} paused; batches already with a worker finish."
    if action == "resume":
        _resume(job)
        return f"Job #{job.id} resumed."
    if action == "cancel":
        manager.cancel_job(job.id)
        return f"Job #{job.id} cancelled."
    failed = job.failed
    _dispatching(manager.retry_failed, job.id)
    return f"Job #{job.id}: {failed:,} failed recipients queued for another attempt."


def _start(job: Job) -> None:
    # Without Redis the batches are sent by this process: the job is queued and
    # planned here, so the page shows it at once, and sent by a background thread,
    # so the request does not wait for a million messages.
    if _has_queue():
        manager.start_job(job.id)
        return

    session = get_state().db.session
    tracking.move_job(session, job.id, "queued", only_from=("draft",))
    manager.plan_batches(job.id)
    session.commit()
    run_in_background(manager.resume_job, job.id)


def _resume(job: Job) -> None:
    if _has_queue():
        manager.resume_job(job.id)
        return

    session = get_state().db.session
    tracking.move_job(session, job.id, "queued", only_from=("paused",))
    session.commit()
    run_in_background(manager.resume_job, job.id)


def _dispatching(function: Callable[[int], Any], job_id: int) -> None:
    if _has_queue():
        function(job_id)
    else:
        run_in_background(function, job_id)


def _has_queue() -> bool:
    return bool(current_app.config["CLOUDMAIL_REDIS_URL"])


_threads: list[threading.Thread] = []


def run_in_background(function: Callable[[int], Any], job_id: int) -> threading.Thread:
    """Run ``function(job_id)`` in a thread with its own app context.

    Used only without Redis. Known limitation: the thread dies with the process; a
    job whose process stopped mid-way keeps its unsent batches pending, and
    ``flask cloudmail resume <id>`` (or the Resume action after a pause) sends them.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def run() -> None:
        with app.app_context():
            try:
                function(job_id)
            except Exception:
                logger.error(
                    "Job %s: background %s failed",
                    job_id,
                    function.__name__,
                    exc_info=True,
                )

    thread = threading.Thread(target=run, name=f"cloudmail-job-{job_id}", daemon=True)
    _threads[:] = [t for t in _threads if t.is_alive()]
    _threads.append(thread)
    thread.start()
    return thread


def wait_for_background(timeout: float = 30.0) -> bool:
    """Wait for this process's background dispatch threads; True when all ended."""
    for thread in _threads:
        thread.join(timeout)
    return not any(t.is_alive() for t in _threads)


# -- settings ----------------------------------------------------------------------


SETTING_LABELS = {
    "provider": "Provider",
    "batch_size": "Batch size",
    "send_rate": "Send rate (mails per second, 0 for no limit)",
    "sender": "Sender",
    "reply_to": "Reply-To",
}


def settings_page() -> ResponseReturnValue:
    errors: dict[str, str] = {}
    values = {k: ("" if v is None else v) for k, v in all_settings().items()}
    if request.method == "POST":
        submitted = {key: request.form.get(key, "").strip() for key in VALIDATORS}
        checked = {}
        for key, value in submitted.items():
            try:
                checked[key] = VALIDATORS[key](value)
            except CloudmailError as err:
                errors[key] = str(err)
        if not errors:
            for key, value in checked.items():
                if value != all_settings()[key]:
                    set_setting(key, value)
            get_state().db.session.commit()
            flash("Settings saved.", "success")
            return redirect(url_for("cloudmail.settings"))
        values = submitted

    return render_template(
        "cloudmail/settings.html",
        values=values,
        errors=errors,
        labels=SETTING_LABELS,
        providers=PROVIDERS,
    ), (400 if errors else 200)


# -- suppressions ------------------------------------------------------------------


def suppressions_page() -> ResponseReturnValue:
    search = (request.args.get("q") or "").strip().lower()
    after = request.args.get("after", type=int)
    query = sa.select(Suppression).order_by(Suppression.id).limit(PAGE_SIZE + 1)
    if search:
        query = query.where(*_prefix(Suppression.email_key, search))
    if after is not None:
        query = query.where(Suppression.id > after)
    rows = list(get_state().db.session.execute(query).scalars())
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return render_template(
        "cloudmail/suppressions.html",
        rows=rows,
        search=search,
        first_page=after is None,
        next_after=rows[-1].id if more else None,
    )


def add_suppression() -> ResponseReturnValue:
    address = request.form.get("address", "").strip()
    category = request.form.get("category", "").strip()[:64]
    detail = request.form.get("detail", "").strip()[:2000] or None
    back = redirect(url_for("cloudmail.suppressions"))
    try:
        added = suppressions.add_suppression(address, category=category, detail=detail)
    except ValueError as err:
        flash(f"Not added: {err}", "error")
        return back

    scope = f" for {category}" if category else ""
    if added:
        flash(f"{address} is suppressed{scope}.", "success")
    else:
        flash(f"{address} was already suppressed{scope}.", "info")
    return back


def remove_suppression(suppression_id: int) -> ResponseReturnValue:
    row = get_state().db.session.get(Suppression, suppression_id)
    if row is None:
        abort(404)

    if request.form.get("confirmed") != "yes":
        return render_template("cloudmail/confirm_suppression.html", row=row)

    suppressions.remove_suppression(row.email_key, category=row.category)
    flash(
        f"{row.email_key} may be mailed again"
        f"{' in ' + row.category if row.category else ''}.",
        "success",
    )
    return redirect(url_for("cloudmail.suppressions"))


def suppressions_csv() -> ResponseReturnValue:
    return _spooled_csv(suppressions.export_suppressions, "suppressions.csv")
