"""cloudmail: bulk and event-driven email for Flask, sent by cloud workers.

>>> from cloudmail import CloudMail
>>> cloudmail = CloudMail(app)
"""

from __future__ import annotations

from .errors import CloudmailError
from .extension import CloudMail, get_state

__version__ = "0.1.0"
__all__ = ["CloudMail", "CloudmailError", "get_state", "__version__"]
