"""The fast path (emval) must agree with email-validator, the authority."""

from __future__ import annotations

import csv

import pytest
from conftest import SHARED
from email_validator import EmailNotValidError, validate_email

from cloudmail.addresses import AddressChecker


def _authority(address: str) -> tuple[bool, str | None]:
    try:
        result = validate_email(
            address, check_deliverability=False, allow_smtputf8=False
        )
    except EmailNotValidError:
        return False, None
    return True, result.ascii_email


def _sample_addresses() -> list[str]:
    found = []
    for name, encoding, delimiter, column in (
        ("moodle_users_5k.csv", "utf-8-sig", ",", "email"),
        ("contacts_excel_cp1252.csv", "cp1252", ";", "E-Mail"),
    ):
        with open(SHARED / name, encoding=encoding, newline="") as f:
            found.extend(
                row[column].strip() for row in csv.DictReader(f, delimiter=delimiter)
            )
    return found


def test_verdicts_match_email_validator_on_every_sample_row() -> None:
    checker = AddressChecker()
    addresses = _sample_addresses()
    assert len(addresses) > 5500

    mismatches = []
    for address in addresses:
        verdict = checker.check(address)
        ok, ascii_email = _authority(address)
        if verdict.ok != ok or (ok and verdict.email != ascii_email):
            mismatches.append((address, verdict, ascii_email))
    assert mismatches == []


@pytest.mark.parametrize(
    ("raw", "ok", "email", "display", "reason"),
    [
        ("  Alice@EXAMPLE.com ", True, "Alice@example.com", None, None),
        (
            "jo@münchen.example",
            True,
            "jo@xn--mnchen-3ya.example",
            "jo@münchen.example",
            None,
        ),
        ("üser1@example.com", False, "üser1@example.com", None, "non_ascii_local_part"),
        ("a@b", False, "a@b", None, "malformed"),
        ("user@localhost", False, "user@localhost", None, "malformed"),
        (
            "Full Name <fn@example.com>",
            False,
            "Full Name <fn@example.com>",
            None,
            "malformed",
        ),
        ("   ", False, "", None, "empty"),
        (None, False, "", None, "empty"),
    ],
)
def test_verdicts(
    raw: str | None, ok: bool, email: str, display: str | None, reason: str | None
) -> None:
    verdict = AddressChecker().check(raw)

    assert (verdict.ok, verdict.email, verdict.display, verdict.reason) == (
        ok,
        email,
        display,
        reason,
    )
    if not ok:
        assert verdict.detail
