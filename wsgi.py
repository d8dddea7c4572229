"""A small host app for the README, the demo and the tests.

    flask --app wsgi cloudmail send --recipients examples/data/moodle_users_5k.csv ...

Settings come from the environment (``CLOUDMAIL_*`` and ``SQLALCHEMY_DATABASE_URI``);
without any, it uses SQLite and the outbox connector under ``instance/``.
"""

from __future__ import annotations

import csv
import hmac
import os
import time
from datetime import datetime
from typing import Any

import click
import sqlalchemy as sa
from flask import (
    Flask,
    abort,
    current_app,
    redirect,
    render_template_string,
    request,
    session,
    url_for,
)
from flask.cli import AppGroup
from flask_wtf.csrf import generate_csrf, validate_csrf
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from wtforms import ValidationError

from cloudmail import CloudMail, signals


def create_app(config: dict | None = None) -> Flask:
    app = Flask(
        __name__, instance_path=os.path.join(os.path.dirname(__file__), "instance")
    )
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev-only-not-secret"),
        CLOUDMAIL_SENDER=os.environ.get(
            "CLOUDMAIL_SENDER", "Demo Sender <news@example.com>"
        ),
    )
    for key, value in os.environ.items():
        if key.startswith("CLOUDMAIL_") or key == "SQLALCHEMY_DATABASE_URI":
            app.config[key] = _number_or_text(value)
    if config:
        app.config.update(config)
    _add_demo_login(app)
    _add_demo_users(app)
    CloudMail(app)

    @app.get("/")
    def index():  # noqa: ANN202
        return redirect(url_for("cloudmail.jobs"))

    return app


# -- demo login ----------------------------------------------------------------------
# One admin, whose password comes from CLOUDMAIL_DEMO_ADMIN_PASSWORD (default
# "cloudmail-demo"); logging in sets a flag in Flask's signed session cookie, and
# CLOUDMAIL_ADMIN_CHECK reads it. A real host checks its own users instead.

DEMO_ADMIN_PASSWORD = "cloudmail-demo"

_LOGIN_PAGE = """{% extends "cloudmail/base.html" %}
{% block title %}Log in{% endblock %}
{% block content %}
<h1>Log in</h1>
{% if error %}<p class="cm-flash cm-flash-error" role="alert">{{ error }}</p>{% endif %}
<form method="post" class="cm-form">
  <input type="hidden" name="csrf_token" value="{{ csrf_token() }}">
  <input type="hidden" name="next" value="{{ next }}">
  <div class="cm-field"><label for="password">Admin password</label>
    <input id="password" name="password" type="password" required autocomplete="current-password"></div>
  <button type="submit" class="cm-button cm-primary">Log in</button>
</form>
{% endblock %}"""


def _add_demo_login(app: Flask) -> None:
    """Add /login and /logout, and make the logged-in demo user cloudmail's admin."""
    # The password is read here, not kept in app.config.
    app.config.pop("CLOUDMAIL_DEMO_ADMIN_PASSWORD", None)
    password = os.environ.get("CLOUDMAIL_DEMO_ADMIN_PASSWORD", DEMO_ADMIN_PASSWORD)
    app.config.setdefault("CLOUDMAIL_ADMIN_CHECK", _demo_admin_logged_in)

    @app.route("/login", methods=["GET", "POST"])
    def login():
        target = request.values.get("next") or url_for("cloudmail.jobs")
        if not target.startswith("/") or target.startswith("//"):
            target = url_for("cloudmail.jobs")
        error = None
        if request.method == "POST":
            try:
                validate_csrf(request.form.get("csrf_token"))
            except ValidationError:
                abort(400)
            given = request.form.get("password", "").encode()
            if hmac.compare_digest(given, password.encode()):
                session.clear()
                session["cloudmail_demo_admin"] = True
                return redirect(target)
            error = "Wrong password."
        return render_template_string(
            _LOGIN_PAGE, error=error, next=target, csrf_token=generate_csrf
        ), (401 if error else 200)

    @app.post("/logout")
    def logout():
        session.clear()
        return redirect(url_for("login"))


def _demo_admin_logged_in() -> bool:
    return session.get("cloudmail_demo_admin") is True


# -- demo users ----------------------------------------------------------------------
# A users table seeded from the Moodle-style sample in examples/; its ``lastaccess`` drives
# re-engagement. The ``flask --app wsgi demo ...`` commands do what a real host does
# in its views, and fire cloudmail's signals after their own commit.

SAMPLE_USERS = os.path.join(
    os.path.dirname(__file__), "examples", "data", "moodle_users_5k.csv"
)


class DemoBase(DeclarativeBase):
    """The host's own tables, apart from cloudmail's."""


class DemoUser(DemoBase):
    __tablename__ = "demo_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(320))
    firstname: Mapped[str] = mapped_column(sa.String(100), default="")
    lastname: Mapped[str] = mapped_column(sa.String(100), default="")
    institution: Mapped[str] = mapped_column(sa.String(200), default="")
    #: Unix time of the last visit, as Moodle keeps it.
    lastaccess: Mapped[int] = mapped_column(sa.BigInteger, default=0)

    def as_recipient(self) -> dict[str, object]:
        return {
            "id": self.id,
            "email": self.email,
            "firstname": self.firstname,
            "name": f"{self.firstname} {self.lastname}".strip(),
            "institution": self.institution,
        }


def _add_demo_users(app: Flask) -> None:
    """Enable every observer and add the ``demo`` commands that fire the signals."""
    app.config.setdefault(
        "CLOUDMAIL_OBSERVERS", ("interceptor", "users", "licenses", "reengagement")
    )
    app.config.setdefault("CLOUDMAIL_INACTIVE_USERS", _inactive_users)
    app.config.setdefault(
        "CLOUDMAIL_UNSUBSCRIBE_URL",
        "https://localhost:5000/cloudmail/unsubscribe/{token}",
    )
    app.config.setdefault(
        "MAIL_BACKEND", "cloudmail.observers.interceptor.EmailBackend"
    )
    app.config.setdefault("MAIL_DEFAULT_SENDER", app.config["CLOUDMAIL_SENDER"])
    try:
        from flask_mailman import Mail
    except ImportError:  # the interceptor demo needs Flask-Mailman; the rest does not
        pass
    else:
        Mail(app)
    app.cli.add_command(demo_cli)


def _session() -> Any:
    from cloudmail import get_state

    return get_state().db.session


def _inactive_users(cutoff: datetime) -> list[dict[str, object]]:
    """The host's query for CLOUDMAIL_INACTIVE_USERS."""
    users = (
        _session()
        .execute(
            sa.select(DemoUser).where(DemoUser.lastaccess < int(cutoff.timestamp()))
        )
        .scalars()
    )
    return [user.as_recipient() for user in users]


demo_cli = AppGroup("demo", help="Play the host: users, licenses, visits, mail.")


@demo_cli.command("seed-users")
@click.option("--csv", "path", default=SAMPLE_USERS, show_default=True)
def seed_users(path: str) -> None:
    """Create the users table and load the sample."""
    session = _session()
    DemoBase.metadata.create_all(session.get_bind())
    session.execute(sa.delete(DemoUser))
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [
            {
                "id": int(r["id"]),
                "email": r["email"],
                "firstname": r["firstname"],
                "lastname": r["lastname"],
                "institution": r["institution"],
                "lastaccess": int(r["lastaccess"] or 0),
            }
            for r in csv.DictReader(f)
        ]
    session.execute(sa.insert(DemoUser), rows)
    session.commit()
    click.echo(f"{len(rows)} users loaded.")


@demo_cli.command("register")
@click.argument("email")
@click.option("--name", default="")
def register_user(email: str, name: str) -> None:
    """Sign a user up (welcome mail)."""
    session = _session()
    first, _, last = name.partition(" ")
    user = DemoUser(
        email=email, firstname=first, lastname=last, lastaccess=int(time.time())
    )
    session.add(user)
    session.commit()
    signals.user_registered.send(
        current_app._get_current_object(),
        user_id=user.id,
        email=user.email,
        name=name or None,
    )
    click.echo(f"User {user.id} registered.")


@demo_cli.command("change-email")
@click.argument("user_id", type=int)
@click.argument("email")
def change_email(user_id: int, email: str) -> None:
    """Change a user's address."""
    user = _session().get(DemoUser, user_id)
    old, user.email = user.email, email
    _session().commit()
    signals.user_email_changed.send(
        current_app._get_current_object(),
        user_id=user_id,
        old_email=old,
        new_email=email,
    )


@demo_cli.command("delete")
@click.argument("user_id", type=int)
def delete_user(user_id: int) -> None:
    """Delete a user (their address is erased from cloudmail)."""
    user = _session().get(DemoUser, user_id)
    email = user.email
    _session().delete(user)
    _session().commit()
    signals.user_deleted.send(
        current_app._get_current_object(), user_id=user_id, email=email
    )


@demo_cli.command("allocate")
@click.option("--product", default="Atlas Pro", show_default=True)
@click.option("--license-id", default="LIC-1", show_default=True)
@click.option("--seats", default=5000, show_default=True)
def allocate(product: str, license_id: str, seats: int) -> None:
    """Give seats of a license to the first N users (one job)."""
    users = (
        _session()
        .execute(sa.select(DemoUser).order_by(DemoUser.id).limit(seats))
        .scalars()
    )
    signals.licenses_allocated.send(
        current_app._get_current_object(),
        users=[u.as_recipient() for u in users],
        license={"id": license_id, "product": product, "seats": seats},
    )
    click.echo(
        f"Allocated {product} ({license_id}) to up to {seats} users; see 'flask cloudmail jobs'."
    )


@demo_cli.command("visit")
@click.argument("user_id", type=int)
def visit(user_id: int) -> None:
    """A user comes back (resets their re-engagement clock)."""
    user = _session().get(DemoUser, user_id)
    user.lastaccess = int(time.time())
    _session().commit()
    signals.user_seen.send(current_app._get_current_object(), user_id=user_id)


@demo_cli.command("reset-password")
@click.argument("user_id", type=int)
def reset_password(user_id: int) -> None:
    """Send a password reset with Flask-Mailman, as a host does (intercepted)."""
    user = _session().get(DemoUser, user_id)
    if user is None:
        raise click.ClickException(
            f"There is no demo user {user_id}; run 'demo seed-users'."
        )
    mailman = current_app.extensions.get("mailman")
    if mailman is None:
        raise click.ClickException(
            "Flask-Mailman is not installed: pip install -e '.[demo]'."
        )
    mailman.send_mail(
        "Reset your password",
        f"Hello {user.firstname}, your code is 4711.",
        None,
        [user.email],
    )
    click.echo(
        f"Password reset mailed to user {user_id} (intercepted into today's job)."
    )


def _number_or_text(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value
