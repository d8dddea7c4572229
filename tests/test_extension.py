from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from cloudmail import CloudMail, get_state
from cloudmail.errors import ConfigurationError, NotInitializedError
from cloudmail.settings import get_setting, set_setting


def test_factory_pattern_registers_state(tmp_path: Path) -> None:
    ext = CloudMail()
    app = Flask("host", instance_path=str(tmp_path))
    ext.init_app(app)

    assert "cloudmail" in app.extensions
    assert app.config["CLOUDMAIL_PROVIDER"] == "outbox"
    assert app.config["CLOUDMAIL_BATCH_SIZE"] == 2000
    assert str(app.config["SQLALCHEMY_DATABASE_URI"]).endswith("cloudmail.db")
    assert "cloudmail.jobs" in {r.endpoint for r in app.url_map.iter_rules()}


def test_second_registration_is_refused(tmp_path: Path) -> None:
    app = Flask("host", instance_path=str(tmp_path))
    CloudMail(app)

    with pytest.raises(ConfigurationError, match="already registered on app 'host'"):
        CloudMail(app)


def test_state_accessor_explains_missing_init(tmp_path: Path) -> None:
    app = Flask("bare", instance_path=str(tmp_path))

    with pytest.raises(
        NotInitializedError, match="Did you forget to call 'CloudMail\\(app\\)'"
    ):
        get_state(app)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "CLOUDMAIL_PROVIDER",
            "smtp",
            "CLOUDMAIL_PROVIDER is 'smtp'; use one of outbox, aws, cloudflare.",
        ),
        (
            "CLOUDMAIL_BATCH_SIZE",
            0,
            "CLOUDMAIL_BATCH_SIZE is 0; it must be a whole number of at least 1.",
        ),
        ("CLOUDMAIL_BATCH_SIZE", "100", "CLOUDMAIL_BATCH_SIZE is '100'"),
        ("CLOUDMAIL_SEND_RATE", -1, "CLOUDMAIL_SEND_RATE is -1"),
        ("CLOUDMAIL_ADMIN_CHECK", "yes", "CLOUDMAIL_ADMIN_CHECK is 'yes'"),
        ("CLOUDMAIL_URL_PREFIX", "cloudmail", "CLOUDMAIL_URL_PREFIX is 'cloudmail'"),
    ],
)
def test_wrong_config_fails_at_start_naming_the_key(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    app = Flask("host", instance_path=str(tmp_path))
    app.config[key] = value

    with pytest.raises(ConfigurationError) as info:
        CloudMail(app)
    assert str(info.value).startswith(message)


def test_uses_the_hosts_db_object(tmp_path: Path) -> None:
    db = SQLAlchemy()
    app = Flask("host", instance_path=str(tmp_path))
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'host.db'}"
    db.init_app(app)
    CloudMail(app)

    assert get_state(app).db is db


def test_settings_fall_back_to_config_and_validate(app: Flask) -> None:
    assert get_setting("batch_size") == 500

    set_setting("batch_size", "250")
    get_state().db.session.commit()
    assert get_setting("batch_size") == 250

    with pytest.raises(ConfigurationError, match="batch_size is 0"):
        set_setting("batch_size", 0)
    with pytest.raises(ConfigurationError, match="provider is 'smtp'"):
        set_setting("provider", "smtp")
    with pytest.raises(ConfigurationError, match="sender is 'nobody'"):
        set_setting("sender", "nobody")
    with pytest.raises(KeyError, match="'aws_secret' is not a cloudmail setting"):
        set_setting("aws_secret", "x")
