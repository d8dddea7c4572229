"""The admin pages through Flask's test client: every route, access, CSRF, escaping."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import make_app
from flask import Flask
from flask_wtf.csrf import CSRFProtect

from cloudmail import manager, views
from cloudmail.extension import get_state
from cloudmail.models import Base, Batch, Job, Recipient, Setting, Suppression

P = "/cloudmail"
HTML = "<p>Hello {{ name }}</p>{% if suspended == '1' %}{{ account_note }}{% endif %}"
EVIL = "<script>alert('pwned')</script>"


@pytest.fixture
def app_config() -> dict[str, object]:
    return {"CLOUDMAIL_ADMIN_CHECK": lambda: True, "CLOUDMAIL_BATCH_SIZE": 3}


@pytest.fixture(autouse=True)
def _no_background_left():  # noqa: ANN202
    yield
    assert views.wait_for_background(60), "a background dispatch thread did not end"


def token(client) -> str:  # noqa: ANN001
    page = client.get(f"{P}/settings").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def post(client, url: str, data: dict | None = None, **kwargs):  # noqa: ANN001, ANN201
    return client.post(
        url, data={"csrf_token": token(client), **(data or {})}, **kwargs
    )


def people_csv(rows: list[dict[str, str]]) -> io.BytesIO:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=["email", "firstname", "lastname", "suspended"]
    )
    writer.writeheader()
    writer.writerows(rows)
    return io.BytesIO(out.getvalue().encode())


def sample_rows() -> list[dict[str, str]]:
    rows = [
        {
            "email": f"person{i}@example.com",
            "firstname": f"P{i}",
            "lastname": "Doe",
            "suspended": "1" if i in (4, 7) else "0",
        }
        for i in range(10)
    ]
    rows.append(
        {
            "email": "not-an-address",
            "firstname": "Bad",
            "lastname": "Row",
            "suspended": "0",
        }
    )
    rows.append(
        {
            "email": "person1@example.com",
            "firstname": "Dup",
            "lastname": "Row",
            "suspended": "0",
        }
    )
    return rows


def make_job(app: Flask, rows: list[dict[str, str]] | None = None, **kw: object) -> Job:
    return manager.create_job(
        rows if rows is not None else sample_rows(),
        subject="Hi {{ firstname }}",
        html=HTML,
        name=kw.pop("name", "Spring news"),
        **kw,
    )


def create_via_page(client, rows: list[dict[str, str]] | None = None, **form):  # noqa: ANN001, ANN003, ANN201
    data = {
        "subject": "Hi {{ firstname }}",
        "html": HTML,
        "text": "",
        "name": "",
        "category": "",
        **form,
    }
    data["recipients"] = (people_csv(rows or sample_rows()), "people.csv")
    return post(client, f"{P}/jobs/new", data, content_type="multipart/form-data")


def confirm(client, job_id: int, action: str):  # noqa: ANN001, ANN201
    response = post(client, f"{P}/jobs/{job_id}/{action}", {"confirmed": "yes"})
    assert views.wait_for_background(60)
    return response


def fresh(db, job_id: int) -> Job:  # noqa: ANN001
    db.session.expire_all()
    return db.session.get(Job, job_id)


# -- access and CSRF ---------------------------------------------------------------

GET_ROUTES = [
    "/jobs",
    "/jobs/progress.json?id=1",
    "/jobs/new",
    "/jobs/1",
    "/jobs/1/progress.json",
    "/jobs/1/recipients",
    "/jobs/1/recipients/1",
    "/jobs/1/rejects",
    "/jobs/1/rejects.csv",
    "/settings",
    "/suppressions",
    "/suppressions.csv",
]
POST_ROUTES = [
    "/jobs/new",
    "/jobs/1/test",
    "/jobs/1/start",
    "/jobs/1/pause",
    "/jobs/1/resume",
    "/jobs/1/cancel",
    "/jobs/1/retry",
    "/settings",
    "/suppressions",
    "/suppressions/1/remove",
]


def test_every_page_is_denied_until_the_host_names_admins(app: Flask, client) -> None:
    app.config["CLOUDMAIL_ADMIN_CHECK"] = None
    for route in GET_ROUTES:
        response = client.get(P + route)
        assert response.status_code == 403, route
        assert "CLOUDMAIL_ADMIN_CHECK" in response.get_data(as_text=True), route

    app.config["WTF_CSRF_ENABLED"] = False  # so the admin check is what refuses
    for route in POST_ROUTES:
        response = client.post(P + route)
        assert response.status_code == 403, route
        assert "CLOUDMAIL_ADMIN_CHECK" in response.get_data(as_text=True), route


def test_a_non_admin_is_denied(app: Flask, client) -> None:
    app.config["CLOUDMAIL_ADMIN_CHECK"] = lambda: False
    response = client.get(f"{P}/jobs")
    assert response.status_code == 403
    assert "Your account is not allowed to manage cloud jobs." in response.get_data(
        as_text=True
    )


def test_a_failing_admin_check_denies(app: Flask, client) -> None:
    def broken() -> bool:
        raise RuntimeError("no user loaded")

    app.config["CLOUDMAIL_ADMIN_CHECK"] = broken
    assert client.get(f"{P}/jobs").status_code == 403


def test_every_post_needs_a_csrf_token(app: Flask, client) -> None:
    job = make_job(app)
    suppression = Suppression(email_key="x@example.com", category="", reason="admin")
    get_state().db.session.add(suppression)
    get_state().db.session.commit()
    for route in POST_ROUTES:
        route = route.replace("/1/", f"/{job.id}/").replace(
            "/suppressions/1/", f"/suppressions/{suppression.id}/"
        )
        response = client.post(
            P + route, data={"confirmed": "yes", "address": "a@b.co"}
        )
        assert response.status_code == 400, route
        assert "security token" in response.get_data(as_text=True), route

    assert fresh(get_state().db, job.id).status == "draft"
    assert get_state().db.session.get(Suppression, suppression.id) is not None


def test_a_wrong_csrf_token_is_refused(client) -> None:
    response = client.post(f"{P}/settings", data={"csrf_token": "forged"})
    assert response.status_code == 400


def test_callbacks_are_exempt_from_csrf(client) -> None:
    response = client.post(f"{P}/callback/report", data=b"{}")
    # Refused by its own verification (no secrets set), not by CSRF.
    assert response.status_code == 403
    assert response.get_json() == {"ok": False, "error": "forbidden"}


def test_the_hosts_own_posts_are_left_alone(app: Flask) -> None:
    @app.post("/host-form")
    def host_form() -> str:
        return "ok"

    assert app.test_client().post("/host-form").get_data(as_text=True) == "ok"


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_hosts_csrfprotect_is_reused(tmp_path: Path, order: str) -> None:
    url = f"sqlite:///{tmp_path / 'host.db'}"
    csrf = CSRFProtect()
    if order == "before":
        from flask_sqlalchemy import SQLAlchemy

        app = Flask("host", instance_path=str(tmp_path))
        app.config.update(
            SECRET_KEY="s",
            SQLALCHEMY_DATABASE_URI=url,
            CLOUDMAIL_ADMIN_CHECK=lambda: True,
            CLOUDMAIL_SENDER="a@example.com",
        )
        csrf.init_app(app)
        from cloudmail import CloudMail

        CloudMail(app, db=SQLAlchemy())
    else:
        app = make_app(tmp_path, url, CLOUDMAIL_ADMIN_CHECK=lambda: True)
        csrf.init_app(app)
    with app.app_context():
        Base.metadata.create_all(get_state().db.engine)
    client = app.test_client()

    assert client.post(f"{P}/settings").status_code == 400
    callback = client.post(f"{P}/callback/report", data=b"{}")
    assert callback.get_json() == {"ok": False, "error": "forbidden"}
    ok = client.post(
        f"{P}/settings",
        data={
            "csrf_token": token(client),
            "provider": "outbox",
            "batch_size": "10",
            "send_rate": "0",
            "sender": "a@example.com",
            "reply_to": "",
        },
    )
    assert ok.status_code == 302


# -- jobs list ---------------------------------------------------------------------


def _insert_jobs(n: int, **values: object) -> list[int]:
    session = get_state().db.session
    jobs = [
        Job(
            name=f"Job {i}",
            provider="outbox",
            sender="a@example.com",
            subject_template="s",
            html_template="h",
            batch_size=10,
            total=10,
            pending=10,
            **values,
        )
        for i in range(n)
    ]
    session.add_all(jobs)
    session.commit()
    return [job.id for job in jobs]


def test_jobs_list_pages_by_key_without_offset(app: Flask, client) -> None:
    ids = _insert_jobs(120)
    statements: list[tuple[str, object]] = []
    engine = get_state().db.engine
    listener = lambda *a: statements.append((a[2], a[3]))  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        first = client.get(f"{P}/jobs").get_data(as_text=True)
        older = (
            re.search(r'href="([^"]*before=\d+)"', first).group(1).replace("&amp;", "&")
        )
        second = client.get(older).get_data(as_text=True)
        third = client.get(
            re.search(r'href="([^"]*before=\d+)"', second)
            .group(1)
            .replace("&amp;", "&")
        ).get_data(as_text=True)
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)

    assert f"#{ids[-1]} Job 119" in first and f"#{ids[-50]} Job 70" in first
    assert f"#{ids[-51]} Job 69" not in first
    assert f"#{ids[-51]} Job 69" in second and f"#{ids[-100]} Job 20" in second
    assert f"#{ids[0]} Job 0" in third and "Older jobs" not in third
    # SQLite's dialect always writes "LIMIT ? OFFSET ?"; the offset must stay 0.
    offsets = [p for s, p in statements if "OFFSET" in s.upper()]
    assert all(list(p)[-1] == 0 for p in offsets)


def test_jobs_list_filters_by_status_and_kind(client) -> None:
    _insert_jobs(2, status="done", kind="bulk")
    _insert_jobs(1, status="paused", kind="observer")
    page = client.get(f"{P}/jobs?status=paused").get_data(as_text=True)
    assert page.count("data-cm-job=") == 1
    page = client.get(f"{P}/jobs?kind=bulk").get_data(as_text=True)
    assert page.count("data-cm-job=") == 2
    page = client.get(f"{P}/jobs?kind=bulk&status=paused").get_data(as_text=True)
    assert "No jobs match these filters." in page
    # An unknown filter value is ignored rather than matching nothing.
    assert (
        client.get(f"{P}/jobs?status=nonsense")
        .get_data(as_text=True)
        .count("data-cm-job=")
        == 3
    )


def test_jobs_progress_json(app: Flask, client) -> None:
    job = make_job(app)
    data = client.get(f"{P}/jobs/progress.json?id={job.id}&id=999").get_json()
    assert [j["id"] for j in data["jobs"]] == [job.id]
    entry = data["jobs"][0]
    assert entry["status"] == "draft" and entry["live"] is False
    assert entry["counters"]["pending"] == 10 and entry["counters"]["rejected"] == 2
    assert entry["actions"] == ["start", "cancel"]
    segments = {s["outcome"]: s["count"] for s in entry["segments"]}
    assert segments["waiting"] == 10 and segments["rejected"] == 2


def test_empty_jobs_list(client) -> None:
    assert "No jobs yet." in client.get(f"{P}/jobs").get_data(as_text=True)


# -- new job, draft review, start ------------------------------------------------


def test_new_job_creates_a_draft_with_preview_and_rejects(
    app: Flask, client, db
) -> None:
    response = create_via_page(client, name="Welcome")
    assert response.status_code == 302
    job_id = int(response.location.rsplit("/", 1)[1])
    job = fresh(db, job_id)
    assert (job.status, job.name, job.pending, job.rejected) == (
        "draft",
        "Welcome",
        10,
        2,
    )

    page = client.get(response.location).get_data(as_text=True)
    assert "Review before sending" in page
    assert page.count('class="cm-preview"') == 3
    assert "Subject:</strong> Hi P0" in page
    assert 'srcdoc="&lt;p&gt;Hello P0 Doe&lt;/p&gt;"' in page
    assert "<td>duplicate</td>" in page and "<td>" in page
    assert f"Draft job #{job_id} created." in page
    assert "Start sending" in page


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"subject": ""}, "Write a subject and an HTML body."),
        ({"html": "{% if %}"}, "The HTML template has a syntax error"),
        ({"html": "{{ nickname }}"}, "uses a variable the recipient does not have"),
    ],
)
def test_new_job_shows_problems(client, db, form: dict, message: str) -> None:  # noqa: ANN001
    response = create_via_page(client, **form)
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    assert db.session.execute(sa.select(sa.func.count()).select_from(Job)).scalar() == 0


def test_new_job_needs_a_file(client) -> None:
    response = post(client, f"{P}/jobs/new", {"subject": "s", "html": "h"})
    assert response.status_code == 400
    assert "Choose the CSV file of recipients." in response.get_data(as_text=True)


def test_actions_ask_for_confirmation_first(app: Flask, client, db) -> None:
    job = make_job(app)
    response = post(client, f"{P}/jobs/{job.id}/start")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert f"Send job #{job.id} to its 10 recipients?" in page
    assert 'name="confirmed" value="yes"' in page
    assert fresh(db, job.id).status == "draft"


def test_start_sends_in_the_background_and_shows_at_once(
    app: Flask, client, db
) -> None:
    job = make_job(app)
    response = confirm(client, job.id, "start")
    assert response.status_code == 302
    job = fresh(db, job.id)
    assert job.status == "done"
    assert (job.sent, job.failed, job.rejected) == (8, 2, 2)
    page = client.get(f"{P}/jobs/{job.id}").get_data(as_text=True)
    assert f"Job #{job.id} started." in page
    assert "render_error" in page
    assert 'data-cm-action="retry">' in page  # shown: the job has failed recipients
    assert "cm-chart-table" in page
    batches = db.session.execute(
        sa.select(Batch.number, Batch.status)
        .where(Batch.job_id == job.id)
        .order_by(Batch.number)
    ).all()
    assert [tuple(b) for b in batches] == [
        (0, "done"),
        (1, "done"),
        (2, "done"),
        (3, "done"),
    ]


def test_pause_resume_cancel(app: Flask, client, db) -> None:
    job = make_job(app)
    session = get_state().db.session
    # Queue it without handing batches out, so pause has something to hold.
    from cloudmail import tracking

    tracking.move_job(session, job.id, "queued", only_from=("draft",))
    manager.plan_batches(job.id)
    session.commit()

    confirm(client, job.id, "pause")
    assert fresh(db, job.id).status == "paused"
    page = client.get(f"{P}/jobs/{job.id}").get_data(as_text=True)
    assert f"Job #{job.id} paused" in page
    assert '<div data-cm-action="resume">' in page
    assert '<div data-cm-action="pause" hidden>' in page

    confirm(client, job.id, "resume")
    assert fresh(db, job.id).status == "done"

    other = make_job(app, name="Second")
    confirm(client, other.id, "cancel")
    assert fresh(db, other.id).status == "cancelled"
    response = confirm(client, other.id, "start")
    assert response.status_code == 302
    assert "is not possible now" in client.get(f"{P}/jobs/{other.id}").get_data(
        as_text=True
    )


def test_retry_failed_recipients(app: Flask, client, db) -> None:
    job = make_job(app)
    confirm(client, job.id, "start")
    assert fresh(db, job.id).failed == 2

    job.html_template = "<p>Hello {{ name }}</p>"
    db.session.commit()
    confirm(client, job.id, "retry")
    job = fresh(db, job.id)
    assert (job.status, job.sent, job.failed) == ("done", 10, 0)


def test_unknown_action_and_job(client) -> None:
    assert post(client, f"{P}/jobs/1/explode").status_code == 404
    assert client.get(f"{P}/jobs/999").status_code == 404
    assert client.get(f"{P}/jobs/999/progress.json").status_code == 404


def test_send_a_test(app: Flask, client, db) -> None:
    job = make_job(app)
    response = post(
        client, f"{P}/jobs/{job.id}/test", {"address": "Tester@Example.com"}
    )
    assert response.status_code == 302
    assert views.wait_for_background(60)
    test = db.session.execute(sa.select(Job).where(Job.id != job.id)).scalar_one()
    assert test.name == f"Test of job #{job.id}: Spring news"
    assert (test.kind, test.total, test.sent, test.status) == ("bulk", 1, 1, "done")
    recipient = db.session.execute(
        sa.select(Recipient).where(Recipient.job_id == test.id)
    ).scalar_one()
    assert (recipient.email, recipient.name) == ("Tester@example.com", "P0 Doe")
    assert fresh(db, job.id).status == "draft"

    bad = post(client, f"{P}/jobs/{job.id}/test", {"address": "nope"})
    assert "The test address is not usable" in client.get(bad.location).get_data(
        as_text=True
    )


def test_job_progress_json(app: Flask, client) -> None:
    job = make_job(app)
    confirm(client, job.id, "start")
    data = client.get(f"{P}/jobs/{job.id}/progress.json").get_json()
    assert data["status"] == "done" and data["live"] is False
    assert data["counters"]["sent"] == 8 and data["counters"]["failed"] == 2
    assert data["batches"] == {"done": 4}
    assert data["actions"] == ["retry"]
    assert 'class="charts-css column multiple stacked' in data["chart_html"]


# -- recipients, rejects -----------------------------------------------------------


def test_recipients_search_filter_and_keyset_pages(app: Flask, client, db) -> None:
    rows = [
        {
            "email": f"user{i:03d}@example.com",
            "firstname": "U",
            "lastname": str(i),
            "suspended": "0",
        }
        for i in range(120)
    ]
    job = make_job(app, rows)

    first = client.get(f"{P}/jobs/{job.id}/recipients").get_data(as_text=True)
    assert "user000@example.com" in first and "user049@example.com" in first
    assert "user050@example.com" not in first
    after = re.search(r"after=(\d+)", first).group(1)
    second = client.get(f"{P}/jobs/{job.id}/recipients?after={after}").get_data(
        as_text=True
    )
    assert "user050@example.com" in second and "user049@example.com" not in second

    found = client.get(f"{P}/jobs/{job.id}/recipients?q=USER11").get_data(as_text=True)
    assert found.count("@example.com</a>") == 10
    none = client.get(f"{P}/jobs/{job.id}/recipients?q=user11&status=failed")
    assert "No recipient matches." in none.get_data(as_text=True)
    pending = client.get(f"{P}/jobs/{job.id}/recipients?status=pending&q=user0")
    assert pending.get_data(as_text=True).count("@example.com</a>") == 50
    # LIKE wildcards in the search are taken literally.
    assert "No recipient matches." in client.get(
        f"{P}/jobs/{job.id}/recipients?q=user_"
    ).get_data(as_text=True)


def test_recipient_page_shows_the_failure(app: Flask, client, db) -> None:
    job = make_job(app)
    confirm(client, job.id, "start")
    failed = (
        db.session.execute(
            sa.select(Recipient)
            .where(Recipient.job_id == job.id, Recipient.status == "failed")
            .order_by(Recipient.id)
        )
        .scalars()
        .first()
    )
    page = client.get(f"{P}/jobs/{job.id}/recipients/{failed.id}").get_data(
        as_text=True
    )
    assert "person4@example.com" in page and "render_error" in page
    assert "account_note" in page
    other = make_job(app, name="Other")
    assert client.get(f"{P}/jobs/{other.id}/recipients/{failed.id}").status_code == 404


def test_rejects_page_and_csv(app: Flask, client) -> None:
    job = make_job(app)
    page = client.get(f"{P}/jobs/{job.id}/rejects").get_data(as_text=True)
    assert "not-an-address" in page and "duplicate" in page
    response = client.get(f"{P}/jobs/{job.id}/rejects.csv")
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="job-{job.id}-rejects.csv"'
    )
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert rows[0] == ["line", "email", "name", "status", "reason", "detail"]
    assert [(r[0], r[1], r[3], r[4]) for r in rows[1:]] == [
        ("11", "not-an-address", "rejected", rows[1][4]),
        ("12", "person1@example.com", "rejected", "duplicate"),
    ]
    assert rows[2][5] == "Duplicate of line 2."


def test_recipient_data_cannot_inject_script(app: Flask, client) -> None:
    rows = [
        {
            "email": "evil@example.com",
            "firstname": EVIL,
            "lastname": '"><img src=x>',
            "suspended": "0",
        },
        {
            "email": f"{EVIL}@example.com",
            "firstname": EVIL,
            "lastname": "x",
            "suspended": "0",
        },
    ]
    job = make_job(app, rows, name=EVIL)
    recipient_ids = (
        get_state()
        .db.session.execute(
            sa.select(Recipient.id)
            .where(Recipient.job_id == job.id)
            .order_by(Recipient.id)
        )
        .scalars()
        .all()
    )
    pages = [
        f"{P}/jobs",
        f"{P}/jobs/{job.id}",
        f"{P}/jobs/{job.id}/recipients",
        f"{P}/jobs/{job.id}/rejects",
        f"{P}/jobs/{job.id}/recipients/{recipient_ids[0]}",
        f"{P}/jobs/{job.id}/recipients/{recipient_ids[1]}",
        f"{P}/jobs/{job.id}/recipients?q={EVIL}",
    ]
    for url in pages:
        text = client.get(url).get_data(as_text=True)
        assert "<script>alert" not in text, url
        assert "<img src=x>" not in text, url
    detail = client.get(f"{P}/jobs/{job.id}").get_data(as_text=True)
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in detail
    # The preview is a sandboxed frame (no scripts) and its source is escaped twice.
    assert '<iframe class="cm-preview-frame" sandbox ' in detail


# -- settings ----------------------------------------------------------------------


def _settings(**changes: str) -> dict[str, str]:
    values = {
        "provider": "outbox",
        "batch_size": "250",
        "send_rate": "2.5",
        "sender": "News <news@example.org>",
        "reply_to": "",
    }
    values.update(changes)
    return values


def test_settings_save_validated_values(app: Flask, client, db) -> None:
    response = post(client, f"{P}/settings", _settings())
    assert response.status_code == 302
    page = client.get(f"{P}/settings").get_data(as_text=True)
    assert "Settings saved." in page and 'value="250"' in page
    stored = {s.key: s.value for s in db.session.execute(sa.select(Setting)).scalars()}
    assert stored == {
        "batch_size": "250",
        "send_rate": "2.5",
        "sender": '"News <news@example.org>"',
    }


def test_settings_refuse_bad_values_and_save_nothing(app: Flask, client, db) -> None:
    response = post(client, f"{P}/settings", _settings(batch_size="0", sender="nobody"))
    page = response.get_data(as_text=True)
    assert response.status_code == 400
    assert "batch_size is &#39;0&#39;; use a whole number from 1 to 50000." in page
    assert "sender is &#39;nobody&#39;" in page
    assert 'aria-invalid="true"' in page
    assert (
        db.session.execute(sa.select(sa.func.count()).select_from(Setting)).scalar()
        == 0
    )


def test_settings_never_show_secrets(app: Flask, client) -> None:
    app.config["CLOUDMAIL_REPORT_SECRETS"] = [
        "whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3Qtc2hvdw=="
    ]
    page = client.get(f"{P}/settings").get_data(as_text=True)
    assert "whsec_" not in page and "c2VjcmV0" not in page
    response = post(client, f"{P}/settings", {**_settings(), "report_secrets": "x"})
    assert response.status_code == 302
    assert get_state().db.session.get(Setting, "report_secrets") is None


# -- suppressions ------------------------------------------------------------------


def test_suppressions_add_search_remove_export(app: Flask, client, db) -> None:
    response = post(client, f"{P}/suppressions", {"address": "Alice@Example.com"})
    assert response.status_code == 302
    assert "Alice@Example.com is suppressed." in client.get(response.location).get_data(
        as_text=True
    )
    post(
        client, f"{P}/suppressions", {"address": "bob@example.com", "category": "news"}
    )
    again = post(client, f"{P}/suppressions", {"address": "alice@example.com"})
    assert "was already suppressed" in client.get(again.location).get_data(as_text=True)
    bad = post(client, f"{P}/suppressions", {"address": "nope"})
    assert "Not added:" in client.get(bad.location).get_data(as_text=True)

    page = client.get(f"{P}/suppressions?q=BOB").get_data(as_text=True)
    assert "bob@example.com" in page and "alice@example.com" not in page

    exported = client.get(f"{P}/suppressions.csv").get_data(as_text=True)
    rows = list(csv.reader(io.StringIO(exported)))
    assert rows[0][:3] == ["email", "category", "reason"]
    assert sorted((r[0], r[1]) for r in rows[1:]) == [
        ("alice@example.com", ""),
        ("bob@example.com", "news"),
    ]

    bob = db.session.execute(
        sa.select(Suppression).where(Suppression.email_key == "bob@example.com")
    ).scalar_one()
    ask = post(client, f"{P}/suppressions/{bob.id}/remove")
    assert "Mail bob@example.com again in category news?" in ask.get_data(as_text=True)
    done = post(client, f"{P}/suppressions/{bob.id}/remove", {"confirmed": "yes"})
    assert done.status_code == 302
    db.session.expire_all()
    assert db.session.get(Suppression, bob.id) is None
    assert post(client, f"{P}/suppressions/{bob.id}/remove").status_code == 404


def test_suppressions_page_by_key(app: Flask, client, db) -> None:
    db.session.add_all(
        Suppression(email_key=f"s{i:03d}@example.com", category="", reason="admin")
        for i in range(60)
    )
    db.session.commit()
    first = client.get(f"{P}/suppressions").get_data(as_text=True)
    assert "s049@example.com" in first and "s050@example.com" not in first
    after = re.search(r"after=(\d+)", first).group(1)
    second = client.get(f"{P}/suppressions?after={after}").get_data(as_text=True)
    assert "s050@example.com" in second and "s059@example.com" in second


def test_static_files_need_no_login(app: Flask, client) -> None:
    app.config["CLOUDMAIL_ADMIN_CHECK"] = None
    for name in ("cloud_jobs.js", "vendor/charts.css/charts.min.css"):
        with client.get(f"{P}/static/{name}") as response:
            assert response.status_code == 200
