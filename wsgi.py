"""A small host app for the README, the demo and the tests.

    flask --app wsgi cloudmail send --recipients examples/recipients.csv ...

Settings come from the environment (``CLOUDMAIL_*`` and ``SQLALCHEMY_DATABASE_URI``);
without any, it uses SQLite and the outbox connector under ``instance/``.
"""

from __future__ import annotations

import os

from flask import Flask, redirect, url_for

from cloudmail import CloudMail


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__, instance_path=os.path.join(os.path.dirname(__file__), "instance"))
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev-only-not-secret"),
        CLOUDMAIL_SENDER=os.environ.get("CLOUDMAIL_SENDER", "Demo Sender <news@example.com>"),
    )
    for key, value in os.environ.items():
        if key.startswith("CLOUDMAIL_") or key == "SQLALCHEMY_DATABASE_URI":
            app.config[key] = _number_or_text(value)
    if config:
        app.config.update(config)
    CloudMail(app)

    @app.get("/")
    def index():  # noqa: ANN202
        return redirect(url_for("cloudmail.jobs"))

    return app


def _number_or_text(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value

