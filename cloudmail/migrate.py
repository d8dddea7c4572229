"""Running cloudmail's own Alembic migrations.

cloudmail keeps its history in the version table ``cloudmail_alembic_version``, apart
from the host's, so ``flask db upgrade`` (the host's) and ``flask cloudmail db upgrade``
never touch each other's tables. A host using autogenerate should leave tables named
``cloudmail_*`` out (see the README).
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from .resources import resource_dir

VERSION_TABLE = "cloudmail_alembic_version"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resource_dir("migrations")))
    return config


def upgrade(revision: str = "head") -> None:
    """Upgrade the current app's database to ``revision`` (run in an app context)."""
    command.upgrade(alembic_config(), revision)


def downgrade(revision: str = "base") -> None:
    """Downgrade the current app's database to ``revision``."""
    command.downgrade(alembic_config(), revision)
