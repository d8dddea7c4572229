"""Streaming a recipient list into the database.

A list comes from a CSV file or stream, or from any iterable of dicts. Rows are read,
checked and written one at a time (COPY on PostgreSQL, large ``executemany`` chunks
elsewhere), so memory stays flat however long the list is. Every row ends up in the
recipients table: valid rows as ``pending``, the others as ``rejected`` with a reason,
so nothing is dropped silently.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .addresses import AddressChecker
from .errors import RecipientImportError
from .models import Recipient

logger = logging.getLogger(__name__)

BAD_ROW = "bad_row"
CHUNK = 10_000

_EMAIL_HEADERS = {
    "email",
    "emailaddress",
    "mail",
    "mailaddress",
    "emailadresse",
    "mailadresse",
    "courriel",
    "correo",
    "correoelectronico",
    "eposta",
    "useremail",
    "primaryemail",
}
_NAME_HEADERS = {"name", "fullname", "displayname", "contactname", "recipientname"}
_FIRST_HEADERS = {"firstname", "first", "givenname", "forename", "vorname", "prenom"}
_LAST_HEADERS = {"lastname", "last", "surname", "familyname", "nachname", "nom"}
_DELIMITERS = (",", ";", "\t", "|")
# NUL counts as a space: PostgreSQL cannot store it in a text column.
_SPACES = re.compile(r"[\s\x00]+")
#: The longest name and address the recipients table holds.
_TEXT_MAX = 320
# One encoder for every row: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, default=str)

_COLUMNS = (
    "job_id",
    "batch_no",
    "line",
    "email",
    "email_display",
    "email_key",
    "name",
    "variables",
    "status",
    "reason",
    "error",
)


@dataclass
class ImportStats:
    """What an import read: rows, valid rows, rejections by reason, blank lines."""

    rows: int = 0
    valid: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    blank_lines: int = 0


@dataclass(frozen=True)
class ColumnMap:
    """Which columns hold the address and the name; the rest become variables."""

    email: str
    name: str | None = None
    first_name: str | None = None
    last_name: str | None = None

    @classmethod
    def detect(
        cls,
        headers: Sequence[str],
        email: str | None = None,
        name: str | None = None,
    ) -> ColumnMap:
        """Find the columns from common header names, or check the ones given."""
        by_key = {_header_key(h): h for h in reversed(headers)}
        email_col = _pick(headers, email, by_key, _EMAIL_HEADERS, "address")
        if email_col is None:
            raise RecipientImportError(
                f"No address column found among the headers {list(headers)!r}; name it "
                "with --email-column (or email_column=...)."
            )

        name_col = _pick(headers, name, by_key, _NAME_HEADERS, "name")
        first = last = None
        if name_col is None:
            first = next((by_key[k] for k in _FIRST_HEADERS if k in by_key), None)
            last = next((by_key[k] for k in _LAST_HEADERS if k in by_key), None)
        return cls(email=email_col, name=name_col, first_name=first, last_name=last)

    def name_of(self, row: Mapping[str, Any]) -> str | None:
        if self.name:
            parts = [row.get(self.name)]
        else:
            parts = [row.get(self.first_name or ""), row.get(self.last_name or "")]
        text = _SPACES.sub(" ", " ".join(str(p) for p in parts if p)).strip()
        # The whole value stays in the row's variables; the name column is bounded.
        return text[:_TEXT_MAX] or None


def _header_key(header: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(header).lower())


def _pick(
    headers: Sequence[str],
    given: str | None,
    by_key: Mapping[str, str],
    known: set[str],
    what: str,
) -> str | None:
    if given is None:
        return next((by_key[k] for k in by_key if k in known), None)

    for header in headers:
        if header == given or header.strip().lower() == given.strip().lower():
            return header
    raise RecipientImportError(
        f"The {what} column {given!r} is not in the file; its headers are {list(headers)!r}."
    )


# -- reading ---------------------------------------------------------------------------


def _decoded_lines(stream: IO[bytes], encoding: str) -> Iterator[str]:
    """Yield the stream's lines decoded, naming the line of any undecodable bytes."""
    try:
        codec = codecs.lookup(encoding)
        # str.encode refuses codecs that are not text encodings (hex, rot13...).
        newline = "\n".encode(codec.name)
    except LookupError:
        raise RecipientImportError(
            f"Unknown text encoding {encoding!r}; use a Python codec name such as "
            "'utf-8' or 'cp1252'."
        ) from None

    if newline != b"\n":
        # UTF-16, UTF-32...: a line break is not the byte 0x0A, so the bytes cannot be
        # split into lines before they are decoded.
        lines = _wide_lines(stream, codec)
    else:
        lines = _narrow_lines(stream, codec)
    for number, text in enumerate(lines, start=1):
        if number == 1 and text.startswith("\ufeff"):
            text = text[1:]
        yield text


def _narrow_lines(stream: IO[bytes], codec: codecs.CodecInfo) -> Iterator[str]:
    for number, raw in enumerate(stream, start=1):
        try:
            yield codec.decode(raw)[0]
        except UnicodeDecodeError as err:
            raise _undecodable(number, raw, err, codec) from None


def _wide_lines(stream: IO[bytes], codec: codecs.CodecInfo) -> Iterator[str]:
    decoder = codec.incrementaldecoder()
    number, pending = 0, ""
    # A final None flushes the decoder (a truncated character is an error too).
    for chunk in itertools.chain(iter(lambda: stream.read(1 << 16), b""), [None]):
        try:
            pending += decoder.decode(chunk or b"", final=chunk is None)
        except UnicodeDecodeError as err:
            # The line is the one after every line break decoded before the bad bytes.
            before = err.object[: err.start].decode(codec.name, "replace")
            line = number + pending.count("\n") + before.count("\n") + 1
            raise _undecodable(line, err.object, err, codec) from None
        *lines, pending = pending.split("\n")
        for text in lines:
            number += 1
            yield text + "\n"
    if pending:
        yield pending


def _undecodable(
    number: int, raw: bytes, err: UnicodeDecodeError, codec: codecs.CodecInfo
) -> RecipientImportError:
    utf16_bom = raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    if number == 1 and utf16_bom and not codec.name.startswith("utf-16"):
        return RecipientImportError(
            f"The file starts with a UTF-16 byte-order mark, so it is not "
            f"{codec.name}; pass --encoding utf-16."
        )
    bad = raw[err.start : err.end]
    return RecipientImportError(
        f"Line {number} holds bytes ({bad!r}) that are not valid {codec.name}; "
        "pass the file's real encoding with --encoding (e.g. cp1252)."
    )


def _text_lines(stream: IO[str]) -> Iterator[str]:
    for number, text in enumerate(stream, start=1):
        yield text[1:] if number == 1 and text.startswith("\ufeff") else text


def _sniff_delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in _DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _checked_delimiter(delimiter: str) -> str:
    if len(delimiter) != 1 or delimiter in '"\r\n\x00':
        raise RecipientImportError(
            f"The delimiter {delimiter!r} cannot separate fields; give one character "
            "other than a quote or a line break, such as ';' (or leave it out to "
            "detect it)."
        )
    return delimiter


def _unique(headers: list[str]) -> list[str]:
    """Rename a repeated header ``name`` to ``name_2``... so no column is lost."""
    seen: set[str] = set()
    unique = []
    for position, header in enumerate(headers, start=1):
        name, n = header, 1
        while name in seen:
            n += 1
            name = f"{header}_{n}"
        if name != header:
            logger.info(
                "Header %r repeats; column %d is read as %r", header, position, name
            )
        seen.add(name)
        unique.append(name)
    return unique


def read_csv(
    source: IO[bytes], *, encoding: str | None = None, delimiter: str | None = None
) -> tuple[list[str], Iterator[tuple[int, list[str]]], Callable[[], int]]:
    """Open a CSV stream: its headers, an iterator of ``(line, fields)``, and a
    function returning how many blank lines were skipped so far."""
    if isinstance(source, io.TextIOBase):
        lines: Iterator[str] = _text_lines(source)
    else:
        lines = _decoded_lines(source, encoding or "utf-8")
    first = next(lines, None)
    while first is not None and not first.strip():
        first = next(lines, None)
    if first is None:
        raise RecipientImportError("The recipient file is empty: it has no header row.")

    sep = _checked_delimiter(delimiter) if delimiter else _sniff_delimiter(first)
    headers = _unique([h.strip() for h in next(csv.reader([first], delimiter=sep))])
    blanks = 0

    def records() -> Iterator[tuple[int, list[str]]]:
        nonlocal blanks
        reader = csv.reader(lines, delimiter=sep, strict=False)
        # The header was read apart from the reader; line numbers count from it.
        last_line = 1
        try:
            for fields in reader:
                start = last_line + 1
                last_line = 1 + reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    blanks += 1
                    continue
                yield start, fields
        except csv.Error as err:
            raise RecipientImportError(
                f"Line {last_line + 1} cannot be read as CSV: {err}."
            ) from None

    return headers, records(), lambda: blanks


# -- staging rows ----------------------------------------------------------------------


class RowBuilder:
    """Turns one input row into the tuple written to the recipients table."""

    def __init__(self, job_id: int, columns: ColumnMap, batch_size: int) -> None:
        self.job_id = job_id
        self.columns = columns
        self.batch_size = batch_size
        self.checker = AddressChecker()
        self.stats = ImportStats()

    def build(self, line: int, row: Mapping[str, Any]) -> tuple[Any, ...]:
        self.stats.rows += 1
        verdict = self.checker.check(_text(row.get(self.columns.email)))
        name = self.columns.name_of(row)
        variables = _JSON.encode(
            {k: v for k, v in row.items() if k != self.columns.email}
        )
        if not verdict.ok:
            self.stats.rejected[verdict.reason or "malformed"] += 1
            email = verdict.email.replace("\x00", "\ufffd")[:_TEXT_MAX]
            return (
                self.job_id,
                None,
                line,
                email,
                None,
                email.lower(),
                name,
                variables,
                "rejected",
                verdict.reason,
                _storable(verdict.detail),
            )

        batch_no = self.stats.valid // self.batch_size
        self.stats.valid += 1
        return (
            self.job_id,
            batch_no,
            line,
            verdict.email,
            verdict.display,
            verdict.key,
            name,
            variables,
            "pending",
            None,
            None,
        )

    def broken(self, line: int, fields: list[str], expected: int) -> tuple[Any, ...]:
        """A row whose field count does not match the header: kept whole, rejected."""
        self.stats.rows += 1
        self.stats.rejected[BAD_ROW] += 1
        return (
            self.job_id,
            None,
            line,
            "",
            None,
            "",
            None,
            _JSON.encode(fields),
            "rejected",
            BAD_ROW,
            f"Expected {expected} fields, found {len(fields)}.",
        )


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _storable(text: str | None) -> str | None:
    """``text`` with NUL shown as U+FFFD: PostgreSQL text cannot hold NUL."""
    return None if text is None else text.replace("\x00", "\ufffd")


def iter_csv_rows(
    builder: RowBuilder, headers: list[str], records: Iterable[tuple[int, list[str]]]
) -> Iterator[tuple[Any, ...]]:
    """Yield the table row for each CSV record."""
    width = len(headers)
    for line, fields in records:
        if len(fields) != width:
            yield builder.broken(line, fields, width)
            continue
        yield builder.build(line, dict(zip(headers, fields, strict=True)))


def iter_dict_rows(
    builder: RowBuilder, rows: Iterable[Mapping[str, Any]]
) -> Iterator[tuple[Any, ...]]:
    """Yield the table row for each dict."""
    for line, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise RecipientImportError(
                f"Recipient {line} is a {type(row).__name__}, not a dict; every "
                "recipient must be a dict of columns."
            )
        yield builder.build(line, row)


# -- writing ---------------------------------------------------------------------------


def write_rows(session: Session, rows: Iterable[tuple[Any, ...]]) -> None:
    """Insert recipient tuples in bulk within the session's transaction."""
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        _copy_rows(connection, rows)
        return

    insert = sa.insert(Recipient.__table__)
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(dict(zip(_COLUMNS, row, strict=True)))
        if len(chunk) >= CHUNK:
            connection.execute(insert, chunk)
            chunk = []
    if chunk:
        connection.execute(insert, chunk)


def _copy_rows(connection: sa.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
    driver_connection = connection.connection.driver_connection
    statement = (
        f"COPY {Recipient.__tablename__} ({', '.join(_COLUMNS)}, attempts) FROM STDIN"
    )
    with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row((*row, 0))
