"""create_app's configuration: defaults, then SFTOPS_* environment, then explicit overrides."""

from __future__ import annotations

import pytest

from service.app import create_app
from service.config import SETTINGS, ConfigError, settings_table


def test_environment_overrides_defaults_and_config_overrides_both(app_config, monkeypatch):
    monkeypatch.setenv("SFTOPS_MAX_CONCURRENT_JOBS", "3")
    monkeypatch.setenv("SFTOPS_METRICS_RETENTION_SECONDS", "60")
    app_config["METRICS_RETENTION_SECONDS"] = 5
    app = create_app(app_config)
    assert app.config["MAX_CONCURRENT_JOBS"] == 3  # from the environment
    assert app.config["METRICS_RETENTION_SECONDS"] == 5.0  # the override wins
    assert app.config["MAX_BODY_BYTES"] == 1024 * 1024  # the default
    assert app.config["MAX_CONTENT_LENGTH"] == app.config["MAX_BODY_BYTES"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("MAX_CONCURRENT_JOBS", "many", "SFTOPS_MAX_CONCURRENT_JOBS='many' is not a valid int"),
     ("RECONCILE_INTERVAL", -1, "SFTOPS_RECONCILE_INTERVAL=-1 must not be negative"),
     ("AUTH", "off", "SFTOPS_AUTH='off' must be 'enabled' or 'disabled'"),
     ("LAUNCHER", "slurm", "SFTOPS_LAUNCHER='slurm' must be 'local' or 'kubernetes'")],
)
def test_bad_settings_name_the_variable(app_config, key, value, message):
    app_config[key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        create_app(app_config)


def test_the_settings_table_lists_every_setting():
    table = settings_table()
    assert all(f"`{s.env}`" in table for s in SETTINGS)
    assert table.count("\n") == len(SETTINGS) + 1
