"""The blueprint: admin pages for cloud jobs.

Every admin page denies access until the host says who is an admin through
``CLOUDMAIL_ADMIN_CHECK``; the 403 page names that setting.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from flask import Blueprint, abort, current_app, render_template, request
from flask.typing import ResponseReturnValue

from . import callbacks
from .extension import get_state
from .models import Job
from .resources import resource_dir

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
#: Endpoints open without admin rights: each verifies its caller on its own.
PUBLIC_ENDPOINTS = ("cloudmail.callback", "cloudmail.public_")


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
    bp.add_url_rule("/jobs", "jobs", jobs_page)
    bp.add_url_rule("/jobs/<int:job_id>", "job", job_page)
    callbacks.register(bp)
    return bp


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

    return render_template("cloudmail/denied.html", configured=check is not None), 403


def jobs_page() -> ResponseReturnValue:
    session = get_state().db.session
    query = sa.select(Job).order_by(Job.id.desc()).limit(PAGE_SIZE + 1)
    before = request.args.get("before", type=int)
    if before:
        query = query.where(Job.id < before)
    jobs = list(session.execute(query).scalars())
    more = len(jobs) > PAGE_SIZE
    return render_template(
        "cloudmail/jobs.html", jobs=jobs[:PAGE_SIZE], next_before=jobs[PAGE_SIZE - 1].id if more else None
    )


def job_page(job_id: int) -> ResponseReturnValue:
    job = get_state().db.session.get(Job, job_id)
    if job is None:
        abort(404)
    return render_template("cloudmail/job.html", job=job)
