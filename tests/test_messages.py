from __future__ import annotations

import email
from email import policy

import pytest

from cloudmail.errors import MessageError, TemplateError
from cloudmail.rendering import (
    MessageTemplate,
    Rendered,
    build_message,
    recipient_context,
)


def _parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def test_html_is_autoescaped_and_text_derived() -> None:
    template = MessageTemplate(
        "Hi {{ name }}", "<p>Hi {{ name }}</p><ul><li>{{ Firma }}</li></ul>"
    )
    context = recipient_context(
        email="a@example.com",
        display=None,
        name="<b>Bob</b>",
        variables='{"Firma": "A & B"}',
    )

    rendered = template.render(context)

    assert rendered.subject == "Hi <b>Bob</b>"
    assert (
        rendered.html == "<p>Hi &lt;b&gt;Bob&lt;/b&gt;</p><ul><li>A &amp; B</li></ul>"
    )
    assert "Hi <b>Bob</b>" in rendered.text
    assert "A & B" in rendered.text


def test_headers_that_are_not_names_get_a_clean_alias() -> None:
    context = recipient_context(
        email="a@example.com",
        display=None,
        name=None,
        variables='{"E-Mail Adresse": "x", "Vorname": "Jörg"}',
    )

    assert (
        MessageTemplate("{{ Vorname }} {{ e_mail_adresse }}", "x")
        .render(context)
        .subject
        == "Jörg x"
    )


def test_missing_variable_is_an_error_not_a_blank() -> None:
    template = MessageTemplate("Hello {{ nickname }}", "<p>x</p>")

    with pytest.raises(
        TemplateError, match="subject template uses a variable.*'nickname' is undefined"
    ):
        template.render(
            recipient_context(
                email="a@example.com", display=None, name=None, variables="{}"
            )
        )


def test_syntax_error_names_the_part_and_line() -> None:
    with pytest.raises(
        TemplateError, match="The HTML template has a syntax error on line 2"
    ):
        MessageTemplate("ok", "<p>\n{% if %}</p>")


def test_sandbox_refuses_unsafe_attribute_access() -> None:
    template = MessageTemplate("{{ name.__class__.__mro__ }}", "x")

    with pytest.raises(TemplateError, match="not allowed|undefined"):
        template.render(
            recipient_context(
                email="a@example.com", display=None, name="x", variables="{}"
            )
        )


def test_message_round_trip_with_non_ascii_names_and_subject() -> None:
    rendered = Rendered(
        subject="Grüße, Søren — welcome",
        html="<p>Hallo Søren</p>",
        text="Hallo Søren\n",
    )

    msg = build_message(
        sender="Café Team <news@example.com>",
        to_email="soren@xn--mnchen-3ya.example",
        to_name="Søren Müller, Jr.",
        rendered=rendered,
        reply_to="help@example.com",
        unsubscribe_url="https://example.com/u/tok",
    )
    raw = msg.as_bytes()
    parsed = _parse(raw)

    assert raw.isascii()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert parsed["Subject"] == "Grüße, Søren — welcome"
    assert parsed["To"].addresses[0].display_name == "Søren Müller, Jr."
    assert parsed["To"].addresses[0].addr_spec == "soren@xn--mnchen-3ya.example"
    assert parsed["From"].addresses[0].display_name == "Café Team"
    assert parsed["Reply-To"] == "help@example.com"
    assert parsed["List-Unsubscribe"] == "<https://example.com/u/tok>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["Message-ID"].endswith("@example.com>")
    # Line breaks travel as CRLF inside the encoded parts too.
    assert parsed.get_body(("plain",)).get_content() == "Hallo Søren\r\n"
    assert parsed.get_body(("html",)).get_content() == "<p>Hallo Søren</p>"


@pytest.mark.parametrize("field", ["subject", "to_name", "reply_to", "sender"])
def test_line_breaks_in_headers_are_refused(field: str) -> None:
    values = {
        "subject": "Hi",
        "to_name": "Bob",
        "reply_to": "r@example.com",
        "sender": "s@example.com",
    }
    values[field] = values[field] + "\r\nBcc: victim@example.com"
    rendered = Rendered(subject=values.pop("subject"), html="<p>x</p>", text="x")

    with pytest.raises(MessageError, match="line break"):
        build_message(to_email="a@example.com", rendered=rendered, **values)
