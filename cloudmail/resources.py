"""Where the templates, static files and migrations are, however cloudmail was installed.

A wheel carries them inside the package (``cloudmail/templates`` ...); a source
checkout and an editable install keep them at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the folder ``name`` (templates, static or migrations)."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate

    raise FileNotFoundError(
        f"cloudmail's {name!r} folder is missing from {_PACKAGE}; "
        "reinstall cloudmail with 'pip install cloudmail'."
    )
