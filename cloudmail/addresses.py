"""Checking and normalising recipient addresses.

email-validator is the authority on what cloudmail can send to. It costs tens of
microseconds an address, the largest cost of a big import, so plain ASCII addresses go
first through emval (Rust, a few microseconds): when emval accepts one and its domain
has a dot, the verdict stands; everything else (anything emval refuses, anything with
non-ASCII characters, a dotless domain) is decided by email-validator, whose messages
become the rejection details. ``tests/test_addresses.py`` checks that the two paths
agree on every row of the shared sample files.
"""

from __future__ import annotations

from dataclasses import dataclass

import emval
from email_validator import EmailNotValidError, validate_email

#: Rejection reasons, as stored in ``Recipient.reason`` and printed in summaries.
EMPTY = "empty"
MALFORMED = "malformed"
NON_ASCII_LOCAL = "non_ascii_local_part"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What cloudmail makes of one address.

    ``email`` is the address to send to (ASCII, the domain in punycode) when ``ok``;
    ``display`` is its Unicode form when that differs. ``key`` is the lower-cased
    ``email`` used to find duplicates and suppressions.
    """

    ok: bool
    email: str
    display: str | None = None
    reason: str | None = None
    detail: str | None = None

    @property
    def key(self) -> str:
        return self.email.lower()


class AddressChecker:
    """Checks addresses without DNS look-ups; one instance per import."""

    def __init__(self) -> None:
        self._fast = emval.EmailValidator(
            allow_smtputf8=False,
            allow_empty_local=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            deliverable_address=False,
        )

    def check(self, raw: str | None) -> Verdict:
        address = (raw or "").strip()
        if not address:
            return Verdict(False, "", reason=EMPTY, detail="The address is empty.")

        if address.isascii():
            try:
                fast = self._fast.validate_email(address)
            except Exception:  # emval raises plain exceptions; email-validator decides.
                fast = None
            if fast is not None and "." in fast.domain_name:
                return Verdict(True, fast.normalized)

        return self._authoritative(address)

    def _authoritative(self, address: str) -> Verdict:
        try:
            result = validate_email(
                address, check_deliverability=False, allow_smtputf8=False
            )
        except EmailNotValidError as err:
            local = address.rpartition("@")[0]
            reason = NON_ASCII_LOCAL if local and not local.isascii() else MALFORMED
            return Verdict(False, address, reason=reason, detail=str(err))

        ascii_email = result.ascii_email or result.normalized
        display = result.normalized if result.normalized != ascii_email else None
        return Verdict(True, ascii_email, display=display)
