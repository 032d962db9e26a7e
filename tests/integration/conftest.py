"""Fixtures shared by the integration tests."""

from tests.support.broker import mosquitto_installed

__all__ = ["mosquitto_installed"]
