"""Fixtures shared by the integration tests."""

from tests.integration.broker import mosquitto_installed

__all__ = ["mosquitto_installed"]
