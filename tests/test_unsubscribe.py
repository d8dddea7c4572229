"""One-click unsubscribe: signed tokens, GET confirms, POST suppresses one category."""

from __future__ import annotations

import re
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from itsdangerous import URLSafeSerializer

from cloudmail import signals
from cloudmail.models import Job, Recipient, Suppression

URL = "https://host.example/cloudmail/unsubscribe/{token}"


@pytest.fixture
def app_config() -> dict[str, object]:
    return {
        "CLOUDMAIL_OBSERVERS": ("licenses", "users"),
        "CLOUDMAIL_UNSUBSCRIBE_URL": URL,
        "WTF_CSRF_ENABLED": True,
    }


def _token(outbox: Path) -> str:
    [path] = outbox.glob("job-*/*.eml")
    mail = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    header = mail["List-Unsubscribe"].strip()
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # The same link is in the body for people.
    assert URL.replace("{token}", "") in mail.get_body(("html",)).get_content()
    return re.fullmatch(
        r"<https://host\.example/cloudmail/unsubscribe/([^>]+)>", header
    ).group(1)


def _suppressions(db) -> list[tuple[str, str, str]]:
    return db.session.execute(
        sa.select(Suppression.email_key, Suppression.category, Suppression.reason)
    ).all()


def _allocate(app: Flask, license_id: str) -> None:
    signals.licenses_allocated.send(
        app,
        users=[{"id": 7, "email": "Ana@Example.com", "name": "Ana"}],
        license={"id": license_id, "product": "Atlas"},
    )


def test_get_confirms_post_suppresses_only_the_category(
    app: Flask, db, client, outbox: Path
) -> None:
    _allocate(app, "L1")
    token = _token(outbox)

    page = client.get(f"/cloudmail/unsubscribe/{token}")
    assert page.status_code == 200
    assert b"Stop <strong>license</strong> mail" in page.data
    assert _suppressions(db) == []

    # RFC 8058: the mailbox provider POSTs this body, with no cookie and no CSRF token.
    done = client.post(
        f"/cloudmail/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"}
    )
    assert done.status_code == 200
    assert _suppressions(db) == [("ana@example.com", "license", "unsubscribe")]
    again = client.post(f"/cloudmail/unsubscribe/{token}")
    assert again.status_code == 200
    assert len(_suppressions(db)) == 1

    # License mail stops; a welcome (another category) still goes out.
    _allocate(app, "L2")
    signals.user_registered.send(app, user_id=7, email="ana@example.com", name="Ana")
    rows = db.session.execute(
        sa.select(Job.kind, Recipient.status).join(Job).order_by(Recipient.id)
    ).all()
    assert rows == [("license", "sent"), ("license", "suppressed"), ("welcome", "sent")]


def test_forged_or_altered_tokens_are_refused(
    app: Flask, db, client, outbox: Path
) -> None:
    _allocate(app, "L1")
    token = _token(outbox)
    rid = db.session.execute(sa.select(Recipient.id)).scalar_one()
    altered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    other_category = URLSafeSerializer(
        "test-secret", salt="cloudmail-unsubscribe"
    ).dumps([rid, ""])
    other_key = URLSafeSerializer("guessed-key", salt="cloudmail-unsubscribe").dumps(
        [rid, "license"]
    )
    unsigned = other_key.rsplit(".", 1)[0]

    for bad in (altered, other_key, unsigned, "nonsense"):
        for method in (client.get, client.post):
            response = method(f"/cloudmail/unsubscribe/{bad}")
            assert response.status_code == 400
            assert b"This unsubscribe link is not valid" in response.data
    assert _suppressions(db) == []

    # A token the app did sign, for a category of its own choosing, still works:
    # the signature is the only key.
    assert client.post(f"/cloudmail/unsubscribe/{other_category}").status_code == 200
    assert _suppressions(db) == [("ana@example.com", "", "unsubscribe")]
