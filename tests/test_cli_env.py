"""Prefect defaults the CLI sets before Prefect is imported (a user's own settings win)."""

import os

from pipeline.cli import _prefect_env


def test_temporary_server_gets_time_to_create_its_database(monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    _prefect_env()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"


def test_users_own_prefect_settings_win(monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "7")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    _prefect_env()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "7"
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
