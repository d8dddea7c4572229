"""Hostile and careless input: every case gets a clear answer and loses nothing.

Each test reproduces a defect found by trying to break cloudmail (a CSV file, a
template variable, a webhook body, a CLI argument or a setting that is wrong on
purpose), and pins down the exact outcome of its fix.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from test_ses_callback import (
    SECRET,
    TOPIC,
    FakeSns,
    notification,
    post,
    queued_job,
    ses_payload,
)

from cloudmail import manager, signals
from cloudmail.connectors.outbox import OutboxConnector
from cloudmail.errors import ConfigurationError, DispatchError, RecipientImportError
from cloudmail.extension import get_state
from cloudmail.models import Batch, Event, Recipient
from cloudmail.rendering import Rendered, build_message
from cloudmail.settings import VALIDATORS
from cloudmail.webhooks.signing import sign_headers


@pytest.fixture
def fetch() -> FakeSns:
    return FakeSns()


@pytest.fixture
def app_config(fetch: FakeSns) -> dict[str, object]:
    return {
        "CLOUDMAIL_SNS_TOPIC_ARNS": [TOPIC],
        "CLOUDMAIL_SNS_FETCH": fetch,
        "CLOUDMAIL_REPORT_SECRETS": [SECRET],
        "CLOUDMAIL_ADMIN_CHECK": lambda: True,
        "WTF_CSRF_ENABLED": False,
    }


def _job(data: bytes, **options: object):
    return manager.create_job(
        io.BytesIO(data), subject="Hi {{ name }}", html="<p>x</p>", **options
    )


def _rows(job_id: int) -> list[tuple]:
    session = get_state().db.session
    return [
        tuple(r)
        for r in session.execute(
            sa.select(
                Recipient.email, Recipient.name, Recipient.status, Recipient.variables
            )
            .where(Recipient.job_id == job_id)
            .order_by(Recipient.id)
        ).all()
    ]


# --- CSV files ---


def test_nul_bytes_and_a_huge_name_are_stored_not_fatal(app: Flask) -> None:
    # PostgreSQL refused the whole import: NUL cannot be stored, a name > 320 neither.
    long_name = "N" * 400
    data = (
        f"email,name,note\na@example.com,{long_name},x\n".encode()
        + b"b@example.com,Bo\x00b,q\x00q\nc\x00@example.com,Cy,z\n"
    )

    job = _job(data)

    assert (job.total, job.pending, job.rejected) == (3, 2, 1)
    rows = _rows(job.id)
    assert rows[0][:3] == ("a@example.com", "N" * 320, "pending")
    assert json.loads(rows[0][3])["name"] == long_name  # the whole value is kept
    assert rows[1][:3] == ("b@example.com", "Bo b", "pending")
    assert json.loads(rows[1][3]) == {"name": "Bo\x00b", "note": "q\x00q"}
    assert rows[2][:3] == ("c\ufffd@example.com", "Cy", "rejected")


def test_utf16_file_is_read_with_encoding_and_named_without(app: Flask) -> None:
    data = "email;name\nann@example.com;Änne\nbob@example.com;Bob\n".encode("utf-16")

    with pytest.raises(RecipientImportError) as refused:
        _job(data)
    job = _job(data, encoding="utf-16")

    assert str(refused.value) == (
        "The file starts with a UTF-16 byte-order mark, so it is not utf-8; "
        "pass --encoding utf-16."
    )
    assert (job.total, job.pending) == (2, 2)
    assert [r[:2] for r in _rows(job.id)] == [
        ("ann@example.com", "Änne"),
        ("bob@example.com", "Bob"),
    ]


def test_long_utf16_file_is_read_across_chunks(app: Flask) -> None:
    lines = "".join(f"user{i}@example.com,Nüm {i}\n" for i in range(4000))
    data = ("email,name\n" + lines).encode("utf-16-be")

    job = _job(data, encoding="utf-16-be")

    assert (job.total, job.pending) == (4000, 4000)
    assert _rows(job.id)[-1][:2] == ("user3999@example.com", "Nüm 3999")


def test_utf16_file_names_the_line_of_bad_bytes(app: Flask) -> None:
    data = "email\na@example.com\n".encode("utf-16-le") + b"\x00\xd8\n\x00"

    with pytest.raises(RecipientImportError, match=r"^Line 3 holds bytes "):
        _job(data, encoding="utf-16-le")


@pytest.mark.parametrize("encoding", ["rot13", "hex", "base64", "no-such-codec"])
def test_codec_that_is_not_a_text_encoding_is_refused(
    app: Flask, encoding: str
) -> None:
    with pytest.raises(RecipientImportError) as refused:
        _job(b"email\na@example.com\n", encoding=encoding)

    assert str(refused.value) == (
        f"Unknown text encoding {encoding!r}; use a Python codec name such as "
        "'utf-8' or 'cp1252'."
    )


@pytest.mark.parametrize("delimiter", [",,", '"', "\n", "\r", "\x00"])
def test_unusable_delimiter_is_refused(app: Flask, delimiter: str) -> None:
    with pytest.raises(RecipientImportError) as refused:
        _job(b"email,name\na@example.com,Ann\n", delimiter=delimiter)

    assert str(refused.value) == (
        f"The delimiter {delimiter!r} cannot separate fields; give one character "
        "other than a quote or a line break, such as ';' (or leave it out to detect it)."
    )


def test_repeated_headers_keep_every_column(app: Flask) -> None:
    job = _job(b"email,name,name,email\na@example.com,Ann,Bob,b@example.com\n")

    ((email, name, status, variables),) = _rows(job.id)
    assert (email, name, status) == ("a@example.com", "Ann", "pending")
    assert json.loads(variables) == {
        "name": "Ann",
        "name_2": "Bob",
        "email_2": "b@example.com",
    }


def test_directory_and_non_dict_rows_are_import_errors(
    app: Flask, tmp_path: Path
) -> None:
    with pytest.raises(RecipientImportError) as directory:
        manager.create_job(str(tmp_path), subject="x", html="x")
    with pytest.raises(RecipientImportError) as not_dict:
        manager.create_job(
            [{"email": "a@example.com"}, "b@example.com"], subject="x", html="x"
        )

    assert str(directory.value) == (
        f"Recipient file {str(tmp_path)!r} cannot be opened: Is a directory."
    )
    assert str(not_dict.value) == (
        "Recipient 2 is a str, not a dict; every recipient must be a dict of columns."
    )


def test_job_labels_and_batch_size_zero_are_checked(app: Flask) -> None:
    rows = [{"email": "a@example.com"}]

    with pytest.raises(ConfigurationError) as name:
        manager.create_job(rows, subject="x", html="x", name="n" * 201)
    with pytest.raises(ConfigurationError) as category:
        manager.create_job(rows, subject="x", html="x", category="c" * 65)
    with pytest.raises(ConfigurationError) as batch_size:
        manager.create_job(rows, subject="x", html="x", batch_size=0)

    assert str(name.value) == (
        f"The job name {'n' * 40!r}... is 201 characters long; use at most 200."
    )
    assert str(category.value) == (
        f"The job category {'c' * 40!r}... is 65 characters long; use at most 64."
    )
    assert (
        str(batch_size.value) == "batch_size is 0; use a whole number from 1 to 50000."
    )


# --- Header injection and a connector failing mid-batch ---


@pytest.mark.parametrize("brk", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028"])
def test_every_line_break_in_a_header_is_refused(brk: str) -> None:
    # The email package folds a header at any str.splitlines() break, not only CRLF.
    from cloudmail.errors import MessageError

    with pytest.raises(MessageError, match="^The Subject header would contain a line"):
        build_message(
            sender="n@example.com",
            to_email="a@example.com",
            to_name=None,
            rendered=Rendered(f"Hi{brk}Bcc: evil@example.com", "x", "x"),
        )


def test_line_break_from_a_csv_variable_fails_one_recipient_only(app: Flask) -> None:
    # It used to raise from the email package, outside the per-recipient catch, and
    # leave the whole batch dispatched with every recipient queued for ever.
    job = manager.create_job(
        io.BytesIO(
            b"email,topic\na@example.com,News\nb@example.com,X\x0bBcc: e@x.org\n"
        ),
        subject="About {{ topic }}",
        html="<p>x</p>",
    )

    manager.start_job(job.id)

    summary = manager.job_summary(job.id)
    assert summary["status"] == "done"
    assert (summary["counters"]["sent"], summary["counters"]["failed"]) == (1, 1)
    assert summary["failed_by_reason"] == {"render_error": 1}


def test_connector_raising_mid_batch_leaves_a_retryable_batch(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = manager.create_job(
        ({"email": f"u{i}@example.com"} for i in range(4)), subject="x", html="x"
    )
    real = OutboxConnector.dispatch

    def crash(self, batch, messages):
        next(iter(messages))
        raise KeyError("surprise")

    monkeypatch.setattr(OutboxConnector, "dispatch", crash)
    manager.start_job(job.id)

    session = get_state().db.session
    batch = session.execute(sa.select(Batch).where(Batch.job_id == job.id)).scalar_one()
    assert (batch.status, batch.last_error) == (
        "failed",
        "The outbox connector failed: KeyError: 'surprise'",
    )
    assert manager.job_summary(job.id)["counters"]["pending"] == 4

    monkeypatch.setattr(OutboxConnector, "dispatch", real)
    assert manager.resume_job(job.id) == 1
    summary = manager.job_summary(job.id)
    assert (summary["status"], summary["counters"]["sent"]) == ("done", 4)


def test_redis_down_at_start_keeps_batches_pending(app: Flask) -> None:
    app.config["CLOUDMAIL_REDIS_URL"] = "redis://127.0.0.1:1/0"
    job = manager.create_job([{"email": "a@example.com"}], subject="x", html="x")

    with pytest.raises(DispatchError, match=r"^Redis refused the batches of job \d+ "):
        manager.start_job(job.id)

    session = get_state().db.session
    batch = session.execute(sa.select(Batch).where(Batch.job_id == job.id)).scalar_one()
    assert batch.status == "pending"
    assert batch.last_error.startswith("Redis refused the batch: ")
    assert manager.job_summary(job.id)["counters"]["pending"] == 1


# --- Settings ---


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "send_rate",
            "nan",
            "send_rate is 'nan'; use mails per second, or 0 for no limit.",
        ),
        (
            "send_rate",
            "inf",
            "send_rate is 'inf'; use mails per second, or 0 for no limit.",
        ),
        (
            "sender",
            "x" * 330 + "@example.com",
            "sender is 342 characters long; use at most 320.",
        ),
        (
            "reply_to",
            "Re\x0bBcc: <r@example.com>",
            (
                "reply_to is 'Re\\x0bBcc: <r@example.com>'; write an address such as "
                "'News <news@example.com>'."
            ),
        ),
    ],
)
def test_unusable_settings_are_refused(
    app: Flask, client, key: str, value: str, message: str
) -> None:
    form = {
        "provider": "outbox",
        "batch_size": "500",
        "send_rate": "0",
        "sender": "News <n@example.com>",
        "reply_to": "",
        key: value,
    }

    answer = client.post("/cloudmail/settings", data=form)

    assert answer.status_code == 400
    with pytest.raises(ConfigurationError) as refused:
        VALIDATORS[key](value)
    assert str(refused.value) == message


def test_nan_send_rate_in_config_stops_start_up(tmp_path: Path) -> None:
    from conftest import make_app

    with pytest.raises(ConfigurationError, match=r"^CLOUDMAIL_SEND_RATE is nan; "):
        make_app(tmp_path, "sqlite://", CLOUDMAIL_SEND_RATE=float("nan"))


# --- The CLI ---


@pytest.mark.parametrize("command", ["pause", "resume", "cancel", "retry"])
def test_actions_on_a_missing_job_are_one_line(
    app: Flask, runner, command: str
) -> None:
    result = runner.invoke(args=["cloudmail", command, "42"])

    assert result.exit_code == 1
    assert result.output == "Error: There is no job 42.\n"


def test_jobs_limit_must_be_positive(app: Flask, runner) -> None:
    result = runner.invoke(args=["cloudmail", "jobs", "--limit", "-1"])

    assert result.exit_code == 2
    assert "Invalid value for '--limit': -1 is not in the range x>=1." in result.output


# --- Reports ---


def _post_report(client, report: dict | bytes, report_id: str = "rep_h"):
    body = report if isinstance(report, bytes) else json.dumps(report).encode()
    headers = sign_headers(SECRET, body, msg_id=report_id)
    return client.post(
        "/cloudmail/callback/report",
        data=body,
        headers=headers,
        content_type="application/json",
    )


def _result(job_id: int, rid: object, attempt: object = 1, **fields: object) -> dict:
    return {
        "rid": rid,
        "key": f"cm-{job_id}-{rid}-{attempt}",
        "status": "sent",
        "message_id": "m",
        **fields,
    }


def test_malformed_reports_are_400_not_500(app: Flask, client) -> None:
    # Each of these was a 500 (so the sender retried for ever) or, for a boolean rid,
    # moved recipient 1 on SQLite.
    job_id, batch_id, ids = queued_job(2)
    base = {"v": 1, "job": job_id, "batch": batch_id}
    bodies = [
        json.dumps({**base, "results": []}).encode("utf-16"),
        {**base, "job": 10**30, "results": []},
        {**base, "batch": 0, "results": []},
        {**base, "results": [_result(job_id, True)]},
        {**base, "results": [_result(job_id, 10**30)]},
        {**base, "results": [_result(job_id, ids[0], attempt=10**30)]},
        {**base, "results": [_result(job_id, ids[0], message_id={"a": 1})]},
    ]

    answers = [_post_report(client, body, f"rep_{n}") for n, body in enumerate(bodies)]

    assert [a.status_code for a in answers] == [400] * len(bodies)
    assert {a.get_json()["error"] for a in answers} == {"malformed"}
    assert manager.job_summary(job_id)["counters"]["queued"] == 2


def test_report_for_a_missing_job_or_batch_is_applied_as_nothing(
    app: Flask, client
) -> None:
    job_id, batch_id, _ = queued_job(1)

    gone_job = _post_report(
        client, {"v": 1, "job": 999999, "batch": batch_id, "results": []}, "rep_a"
    )
    gone_batch = _post_report(
        client, {"v": 1, "job": job_id, "batch": 999999, "results": []}, "rep_b"
    )

    assert (gone_job.status_code, gone_batch.status_code) == (200, 200)
    session = get_state().db.session
    assert set(session.execute(sa.select(Event.status)).scalars()) == {"applied"}


def test_stale_and_repeated_results_are_not_announced_as_sent(
    app: Flask, client
) -> None:
    job_id, batch_id, ids = queued_job(2)
    announced: list[list[int]] = []

    def record(sender, **kw):
        announced.append(kw["recipient_ids"])

    signals.recipient_sent.connect(record, app)
    try:
        answer = _post_report(
            client,
            {
                "v": 1,
                "job": job_id,
                "batch": batch_id,
                "results": [
                    _result(
                        job_id, ids[0], attempt=7
                    ),  # an attempt that is not the current one
                    _result(job_id, ids[1]),
                    _result(job_id, ids[1], message_id="again"),
                ],
            },
        )
    finally:
        signals.recipient_sent.disconnect(record, app)

    assert answer.get_json() == {"ok": True, "sent": 1, "failed": 0, "ignored": 2}
    assert announced == [[ids[1]]]
    counters = manager.job_summary(job_id)["counters"]
    assert (counters["sent"], counters["queued"]) == (1, 1)


def test_oversized_webhook_bodies_are_refused_unread(app: Flask, client) -> None:
    from cloudmail import callbacks

    big = b"{" + b" " * callbacks.SNS_MAX_BYTES + b"}"

    ses = post(client, big)
    report = client.post(
        "/cloudmail/callback/report", data=b" " * (callbacks.REPORT_MAX_BYTES + 1)
    )

    assert (ses.status_code, ses.get_json()) == (
        413,
        {"ok": False, "error": "too large"},
    )
    assert (report.status_code, report.get_json()) == (
        413,
        {"ok": False, "error": "too large"},
    )


# --- SES events ---


def test_ses_event_with_absurd_tags_or_address_is_handled(app: Flask, client) -> None:
    # A 30-digit job tag overflowed BIGINT and a 5000-character address raised a
    # KeyError: both answered 500, so SNS retried them for hours.
    huge_tags = ses_payload(
        "Delivery", "m-1", ["r0@example.com"], job_id=10**30, rid=10**30
    )
    long_address = "x" * 5000 + "@example.com"
    bounce = ses_payload("Bounce", "m-2", [long_address])
    long_id = ses_payload("Delivery", "m" * 300, ["r0@example.com"])

    answers = [post(client, notification(p)) for p in (huge_tags, bounce, long_id)]

    assert [a.status_code for a in answers] == [200, 200, 400]
    session = get_state().db.session
    stored = session.execute(
        sa.select(Event.recipient, Event.job_id, Event.status).order_by(Event.id)
    ).all()
    assert [tuple(r) for r in stored] == [
        ("r0@example.com", None, "ignored"),
        (long_address[:320], None, "ignored"),
    ]
