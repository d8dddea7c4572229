"""Rendering a job's templates for one recipient and building the MIME message.

This module is the only place that turns templates into mail: the outbox connector
writes what it builds, and the cloud connectors ship its bytes for the Lambda or the
Worker to send unchanged.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from email import policy
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from typing import Any

from inscriptis import get_text
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import MessageError, TemplateError

_html_env = ImmutableSandboxedEnvironment(autoescape=True, undefined=StrictUndefined)
_text_env = ImmutableSandboxedEnvironment(autoescape=False, undefined=StrictUndefined)


class _SmtpCompat32(policy.Compat32):
    """compat32 with CRLF line ends, writing short plain-ASCII headers as they are.

    compat32 builds a ``Header`` object to fold every header, even ``MIME-Version:
    1.0``; a value that is ASCII, fits on one line and holds no line break needs no
    folding, and skipping that work makes building a message about a third faster.
    Everything else goes through the stdlib's own folding.
    """

    def fold_binary(self, name: str, value: Any) -> bytes:
        if (
            isinstance(value, str)
            and value.isascii()
            and len(name) + len(value) + 2 <= 78
            and not has_line_break(value)
        ):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_POLICY = _SmtpCompat32(linesep="\r\n")
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_UTF8_QP.header_encoding = QP
_IDENTIFIER = re.compile(r"[^0-9a-zA-Z_]+")
# Every character str.splitlines() breaks on: the email package folds a header with
# it, so a value holding any of them (not only CR and LF) could start a new header.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str
    text: str


class MessageTemplate:
    """A job's subject, HTML and optional text templates, compiled once."""

    def __init__(self, subject: str, html: str, text: str | None = None) -> None:
        self._subject = _compile(_text_env, "subject", subject)
        self._html = _compile(_html_env, "HTML", html)
        self._text = _compile(_text_env, "text", text) if text else None

    def render(self, context: Mapping[str, Any]) -> Rendered:
        """Render all parts; a missing variable raises :class:`TemplateError`."""
        subject = _render(self._subject, "subject", context).strip()
        html = _render(self._html, "HTML", context)
        if self._text is not None:
            text = _render(self._text, "text", context)
        else:
            text = get_text(html).strip() + "\n"
        return Rendered(subject=subject, html=html, text=text)


def _compile(env: ImmutableSandboxedEnvironment, part: str, source: str) -> Any:
    try:
        return env.from_string(source)
    except TemplateSyntaxError as err:
        raise TemplateError(
            f"The {part} template has a syntax error on line {err.lineno}: {err.message}"
        ) from None


def _render(template: Any, part: str, context: Mapping[str, Any]) -> str:
    try:
        return template.render(context)
    except UndefinedError as err:
        raise TemplateError(
            f"The {part} template uses a variable the recipient does not have: "
            f"{err.message}. Add the column to the list or remove it from the template."
        ) from None
    except SecurityError as err:
        raise TemplateError(f"The {part} template is not allowed: {err}") from None
    except (
        Exception
    ) as err:  # a filter or an expression failed on this recipient's data
        raise TemplateError(
            f"The {part} template failed: {type(err).__name__}: {err}"
        ) from None


def recipient_context(
    *,
    email: str,
    display: str | None,
    name: str | None,
    variables: str | Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The variables a template sees for one recipient.

    Every column of the list by its header (``{{ Vorname }}``) and, when the header is
    not a valid name, by a cleaned-up one (``E-Mail`` → ``{{ e_mail }}``); ``email``,
    ``name`` and ``recipient`` (with ``.email`` and ``.name``).
    """
    values = (
        json.loads(variables) if isinstance(variables, str) else dict(variables or {})
    )
    context: dict[str, Any] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            context[key] = value
            clean = _IDENTIFIER.sub("_", str(key)).strip("_").lower()
            if clean and clean not in context:
                context[clean] = value
    shown = display or email
    context.update(email=shown, name=name or "")
    context["recipient"] = {"email": shown, "name": name or ""}
    if extra:
        context.update(extra)
    return context


def has_line_break(value: str) -> bool:
    """Whether ``value`` holds a character that would end a header line."""
    return _LINE_BREAKS.search(value) is not None


def _header_value(name: str, value: str | None) -> str | None:
    if value is not None and has_line_break(value):
        raise MessageError(
            f"The {name} header would contain a line break ({value[:40]!r}...); line "
            "breaks in header values are refused to prevent header injection."
        )
    return value


def build_message(
    *,
    sender: str,
    to_email: str,
    to_name: str | None,
    rendered: Rendered,
    reply_to: str | None = None,
    message_id: str | None = None,
    unsubscribe_url: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Message:
    """Build the RFC 5322 message for one recipient (CRLF line endings, 7-bit clean).

    Non-ASCII display names and subjects are RFC 2047 encoded; a line break in any
    header value raises :class:`MessageError`.
    """
    for header, value in (
        ("From", sender),
        ("To", to_name),
        ("Subject", rendered.subject),
        ("Reply-To", reply_to),
        ("List-Unsubscribe", unsubscribe_url),
        *((headers or {}).items()),
    ):
        _header_value(header, value)

    # The legacy (compat32) API of the email package builds a message about four
    # times faster than EmailMessage, whose header objects parse every value: at a
    # million recipients that is the difference between minutes and an hour.
    # An explicit boundary spares the generator a regex compiled per message; a
    # random 128-bit value cannot occur in the bodies by accident.
    msg = MIMEMultipart(
        "alternative", boundary=f"=_cm_{uuid.uuid4().hex}", policy=_POLICY
    )
    msg["From"] = _address_header(sender)
    msg["To"] = formataddr((to_name or "", to_email), charset="utf-8")
    msg["Subject"] = _encoded(rendered.subject, "Subject")
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id or make_msgid(domain=_domain_of(sender))
    if reply_to:
        msg["Reply-To"] = _address_header(reply_to)
    if unsubscribe_url:
        # RFC 8058 one-click unsubscribe: both headers, and the URL must be https.
        msg["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    for header, value in (headers or {}).items():
        msg[header] = _encoded(value, header)

    msg.attach(_part(rendered.text, "plain"))
    msg.attach(_part(rendered.html, "html"))
    return msg


def _part(body: str, subtype: str) -> MIMEText:
    part = MIMEText(body, subtype, _charset=_UTF8_QP, policy=_POLICY)  # type: ignore[arg-type]
    # MIMEText adds its own MIME-Version; a body part does not need one.
    del part["MIME-Version"]
    return part


def _encoded(value: str, header: str) -> str:
    if value.isascii():
        return value
    return Header(value, _UTF8_QP, header_name=header).encode()


def _address_header(value: str) -> str:
    name, address = parseaddr(value)
    return formataddr((name, address), charset="utf-8")


def _domain_of(address: str) -> str:
    domain = parseaddr(address)[1].rpartition("@")[2]
    return domain or "cloudmail.invalid"
