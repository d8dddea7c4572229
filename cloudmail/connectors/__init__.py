"""Connectors: how a batch reaches a provider."""

from __future__ import annotations

from typing import Any

from flask import Flask

from ..errors import ConfigurationError
from .base import BatchInfo, Connector, HandOff, OutgoingMessage

__all__ = ["BatchInfo", "Connector", "HandOff", "OutgoingMessage", "get_connector"]


def get_connector(name: str, app: Flask, settings: dict[str, Any]) -> Connector:
    """Return a connector instance for provider ``name``."""
    if name == "outbox":
        from .outbox import OutboxConnector

        return OutboxConnector(app, settings)
    if name == "aws":
        from .aws import AwsConnector

        return AwsConnector(app, settings)
    if name == "cloudflare":
        from .cloudflare import CloudflareConnector

        return CloudflareConnector(app, settings)
    raise ConfigurationError(
        f"provider is {name!r}; use one of outbox, aws, cloudflare."
    )
