from __future__ import annotations

import io
import json

import pytest
import sqlalchemy as sa
from conftest import SHARED, count_rows
from flask import Flask

from cloudmail import manager
from cloudmail.errors import RecipientImportError, TemplateError
from cloudmail.models import Job, Recipient, Suppression

HTML = "<p>Hello {{ name }}</p>"


def _reasons(job_id: int) -> dict[str, int]:
    return manager.job_summary(job_id)["rejected_by_reason"]


def test_moodle_export_every_row_accounted_for(app: Flask) -> None:
    job = manager.create_job(
        SHARED / "moodle_users_5k.csv", subject="Hi {{ firstname }}", html=HTML
    )

    # The generator's manifest for this file: 5000 rows, 60 duplicates, 29 malformed
    # (2 of them empty), 5 non-ASCII local parts, 24 IDN domains (valid), 7 blank lines.
    assert job.total == 5000
    assert _reasons(job.id) == {
        "duplicate": 60,
        "empty": 2,
        "malformed": 27,
        "non_ascii_local_part": 5,
    }
    assert job.pending == 5000 - 94
    assert job.blank_lines == 7
    assert job.status == "draft"


def test_idn_addresses_sent_in_punycode_shown_in_unicode(app: Flask, db) -> None:
    job = manager.create_job(SHARED / "moodle_users_5k.csv", subject="Hi", html=HTML)

    rows = db.session.execute(
        sa.select(Recipient.email, Recipient.email_display).where(
            Recipient.job_id == job.id, Recipient.email_display.is_not(None)
        )
    ).all()
    assert len(rows) == 24
    for email, display in rows:
        assert email.isascii() and "xn--" in email
        assert not display.isascii()


def test_excel_cp1252_semicolons_with_encoding(app: Flask, db) -> None:
    job = manager.create_job(
        SHARED / "contacts_excel_cp1252.csv",
        subject="Hallo {{ Vorname }}",
        html="<p>{{ Vorname }} {{ Nachname }}</p>",
        encoding="cp1252",
    )

    assert job.total == 800
    assert job.pending + job.rejected == 800
    name = db.session.execute(
        sa.select(Recipient.name).where(Recipient.job_id == job.id, Recipient.line == 5)
    ).scalar_one()
    assert name == "Alice Schmidt-Weiß"


def test_undecodable_bytes_name_the_line_and_leave_nothing(app: Flask, db) -> None:
    with pytest.raises(
        RecipientImportError,
        match=r"Line 3 holds bytes \(b'\\xd8'\) that are not valid utf-8; pass the file's real encoding",
    ):
        manager.create_job(SHARED / "contacts_excel_cp1252.csv", subject="x", html=HTML)

    assert count_rows(db, "cloudmail_jobs") == 0
    assert count_rows(db, "cloudmail_recipients") == 0


def test_quoted_fields_crlf_bom_and_tabs(app: Flask, db) -> None:
    data = (
        "\ufeffE-mail\tFull Name\tNote\r\n"
        'a@example.com\t"Doe, Jane"\t"two\r\nlines"\r\n'
        "\r\n"
        'b@example.com\tBob "the" Builder\tplain\r\n'
    ).encode("utf-8")

    job = manager.create_job(io.BytesIO(data), subject="x", html="{{ Note }}")

    rows = db.session.execute(
        sa.select(Recipient.line, Recipient.email, Recipient.name, Recipient.variables)
        .where(Recipient.job_id == job.id)
        .order_by(Recipient.id)
    ).all()
    assert [(r.line, r.email, r.name) for r in rows] == [
        (2, "a@example.com", "Doe, Jane"),
        (5, "b@example.com", 'Bob "the" Builder'),
    ]
    assert json.loads(rows[0].variables)["Note"] == "two\r\nlines"
    assert job.blank_lines == 1


def test_broken_row_is_rejected_whole(app: Flask, db) -> None:
    data = b"email,name\r\na@example.com,Ann\r\nb@example.com,Bob,extra\r\n"

    job = manager.create_job(io.BytesIO(data), subject="x", html="x")

    assert _reasons(job.id) == {"bad_row": 1}
    error, variables = db.session.execute(
        sa.select(Recipient.error, Recipient.variables).where(
            Recipient.status == "rejected"
        )
    ).one()
    assert error == "Expected 2 fields, found 3."
    assert json.loads(variables) == ["b@example.com", "Bob", "extra"]


def test_explicit_columns_and_unknown_column(app: Flask) -> None:
    data = b"contact;who\r\nx@example.com;Xavier\r\n"

    job = manager.create_job(
        io.BytesIO(data),
        subject="x",
        html="x",
        email_column="contact",
        name_column="who",
    )
    assert job.pending == 1

    with pytest.raises(
        RecipientImportError, match="The address column 'mail2' is not in the file"
    ):
        manager.create_job(
            io.BytesIO(data), subject="x", html="x", email_column="mail2"
        )
    with pytest.raises(
        RecipientImportError, match="No address column found among the headers"
    ):
        manager.create_job(io.BytesIO(data), subject="x", html="x")


def test_iterable_of_dicts(app: Flask, db) -> None:
    people = (
        {
            "email": f"user{i}@example.com",
            "first_name": "U",
            "last_name": str(i),
            "plan": "pro",
        }
        for i in range(1200)
    )

    job = manager.create_job(people, subject="{{ plan }}", html="x", batch_size=500)

    assert job.pending == 1200
    batches = db.session.execute(
        sa.select(Recipient.batch_no, sa.func.count())
        .where(Recipient.job_id == job.id)
        .group_by(Recipient.batch_no)
        .order_by(Recipient.batch_no)
    ).all()
    assert batches == [(0, 500), (1, 500), (2, 200)]


def test_missing_variable_fails_creation_on_first_valid_row(app: Flask, db) -> None:
    data = b"email,name\r\nnot-an-address,X\r\nok@example.com,Ok\r\n"

    with pytest.raises(
        TemplateError,
        match=r"Line 3 \(the first valid recipient\).*'coupon' is undefined",
    ):
        manager.create_job(io.BytesIO(data), subject="Your {{ coupon }}", html="x")

    assert count_rows(db, "cloudmail_jobs") == 0


def test_suppressed_addresses_are_skipped(app: Flask, db) -> None:
    db.session.add(Suppression(email_key="b@example.com", reason="bounce"))
    db.session.add(
        Suppression(email_key="c@example.com", category="news", reason="unsubscribe")
    )
    db.session.commit()
    data = b"email\r\na@example.com\r\nB@Example.com\r\nc@example.com\r\n"

    job = manager.create_job(io.BytesIO(data), subject="x", html="x")
    news = manager.create_job(io.BytesIO(data), subject="x", html="x", category="news")

    assert (job.pending, job.suppressed) == (2, 1)
    assert (news.pending, news.suppressed) == (1, 2)
    assert _reasons(news.id) == {"suppressed": 2}


def test_duplicates_keep_the_first_and_name_it(app: Flask, db) -> None:
    data = b"email\r\nx@example.com\r\n  X@EXAMPLE.COM \r\ny@example.com\r\n"

    job = manager.create_job(io.BytesIO(data), subject="x", html="x")

    rows = db.session.execute(
        sa.select(Recipient.line, Recipient.status, Recipient.error)
        .where(Recipient.job_id == job.id)
        .order_by(Recipient.line)
    ).all()
    assert [tuple(r) for r in rows] == [
        (2, "pending", None),
        (3, "rejected", "Duplicate of line 2."),
        (4, "pending", None),
    ]
    assert db.session.get(Job, job.id).rejected == 1
