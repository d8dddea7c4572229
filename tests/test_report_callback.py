from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa
from flask import Flask
from test_ses_callback import queued_job

from cloudmail import manager
from cloudmail.models import Recipient
from cloudmail.webhooks.signing import generate_secret, sign_headers

OLD, NEW = generate_secret(), generate_secret()


@pytest.fixture
def app_config() -> dict[str, object]:
    return {"CLOUDMAIL_REPORT_SECRETS": [NEW, OLD]}


def _report(
    job_id: int, batch_id: int, results: list[dict], rid: str = "rep_1"
) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "id": rid,
            "source": "lambda",
            "job": job_id,
            "batch": batch_id,
            "results": results,
        }
    ).encode()


def _result(job_id: int, rid: int, status: str = "sent") -> dict:
    if status == "sent":
        return {
            "rid": rid,
            "key": f"cm-{job_id}-{rid}-1",
            "status": "sent",
            "message_id": f"ses-{rid}",
        }
    return {
        "rid": rid,
        "key": f"cm-{job_id}-{rid}-1",
        "status": "failed",
        "error_code": "MessageRejected",
        "error": "Email address is not verified.",
    }


def _post(client, body: bytes, secret: str = NEW, **overrides: str):  # noqa: ANN001, ANN202
    headers = sign_headers(secret, body, msg_id="rep_1")
    headers.update(overrides)
    return client.post(
        "/cloudmail/callback/report",
        data=body,
        headers=headers,
        content_type="application/json",
    )


def test_valid_report_marks_recipients_and_is_idempotent(
    app: Flask, client, db
) -> None:
    job_id, batch_id, ids = queued_job()
    body = _report(
        job_id,
        batch_id,
        [
            _result(job_id, ids[0]),
            _result(job_id, ids[1]),
            _result(job_id, ids[2], "failed"),
        ],
    )

    first = _post(client, body)
    again = _post(client, body)

    assert first.status_code == 200
    assert first.get_json() == {"ok": True, "sent": 2, "failed": 1, "ignored": 0}
    assert again.get_json() == {"ok": True, "sent": 0, "failed": 0, "ignored": 3}
    summary = manager.job_summary(job_id)
    assert (
        summary["status"],
        summary["counters"]["sent"],
        summary["counters"]["failed"],
    ) == ("done", 2, 1)
    assert (
        db.session.execute(
            sa.select(Recipient.provider_message_id).where(Recipient.id == ids[0])
        ).scalar()
        == f"ses-{ids[0]}"
    )
    assert summary["failed_by_reason"] == {"MessageRejected": 1}


def test_rotated_secret_is_accepted(app: Flask, client) -> None:
    job_id, batch_id, ids = queued_job(1)

    assert (
        _post(
            client, _report(job_id, batch_id, [_result(job_id, ids[0])]), secret=OLD
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    "change",
    ["wrong-secret", "old-timestamp", "no-signature", "tampered-body"],
)
def test_unverified_reports_are_refused_with_403(
    app: Flask, client, change: str
) -> None:
    job_id, batch_id, ids = queued_job(1)
    body = _report(job_id, batch_id, [_result(job_id, ids[0])])
    if change == "wrong-secret":
        response = _post(client, body, secret=generate_secret())
    elif change == "old-timestamp":
        stale = str(int(time.time()) - 600)
        headers = sign_headers(NEW, body, msg_id="rep_1", timestamp=int(stale))
        response = client.post("/cloudmail/callback/report", data=body, headers=headers)
    elif change == "no-signature":
        response = client.post("/cloudmail/callback/report", data=body)
    else:
        headers = sign_headers(NEW, body, msg_id="rep_1")
        response = client.post(
            "/cloudmail/callback/report",
            data=body.replace(b"sent", b"SENT"),
            headers=headers,
        )

    assert response.status_code == 403
    assert response.get_json() == {"ok": False, "error": "forbidden"}
    assert manager.job_summary(job_id)["counters"]["queued"] == 1


def test_malformed_report_is_400(app: Flask, client) -> None:
    assert _post(client, b"not json").status_code == 400
    assert _post(client, json.dumps({"v": 2}).encode()).status_code == 400
