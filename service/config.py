"""The plane's settings: one table of names, defaults and meanings (README.md renders it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One configuration key: read from the environment as SFTOPS_<key>."""

    key: str
    default: Any
    help: str

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return f"SFTOPS_{self.key}"


SETTINGS: tuple[Setting, ...] = (
    Setting("DATA_DIR", "./.sftops", "Directory for the SQLite database, local job runs and metrics files."),
    Setting("DATABASE_URL", None, "SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db; default SQLite in DATA_DIR."),
    Setting("TOKENS_FILE", None, "YAML or JSON list of {name, token_sha256, scopes} API tokens."),
    Setting("AUTH", "enabled", "'disabled' turns authentication off: for the embedded demo only (logged as a warning)."),
    Setting("LAUNCHER", "local", "'local' (subprocess on this host) or 'kubernetes' (one batch/v1 Job per job)."),
    Setting("PUBLIC_URL", "http://127.0.0.1:8000", "Base URL launched jobs post their reports to."),
    Setting("MAX_CONCURRENT_JOBS", 1, "Jobs running at once; further jobs wait in 'queued'."),
    Setting("MAX_BODY_BYTES", 1024 * 1024, "Largest request body accepted (413 above it)."),
    Setting("RECONCILE_INTERVAL", 2.0, "Seconds between reconciler passes; 0 disables the background reconciler."),
    Setting("METRICS_RETENTION_SECONDS", 3600, "How long a finished job's gauges stay on /metrics."),
    Setting("CALLBACK_SECRET", None, "HMAC-SHA256 key that signs callback_url deliveries (unsigned when unset)."),
    Setting("REPORT_GRACE_SECONDS", 10.0, "How long a run may be gone before its job is failed for not reporting."),
    Setting("BIND", "127.0.0.1:8000", "Address gunicorn listens on (service/gunicorn.conf.py)."),
    Setting("WORKERS", 2, "gunicorn worker processes (or WEB_CONCURRENCY)."),
    Setting("WORKER_CLASS", "gthread", "gunicorn worker class: gthread (keep-alive, threads) or sync."),
    Setting("THREADS", 4, "Threads per gthread worker."),
    Setting("LOG_LEVEL", "info", "gunicorn log level."),
    Setting("K8S_*", None, "Kubernetes launcher settings, one per KubernetesSettings field "
            "(e.g. SFTOPS_K8S_NAMESPACE, SFTOPS_K8S_IMAGE); see service/launchers/k8s_manifest.py."),
)
"""Every setting; SFTOPS_K8S_* keys are passed to the Kubernetes launcher as they are."""

DEFAULTS: dict[str, Any] = {s.key: s.default for s in SETTINGS if not s.key.endswith("*")}

# Settings that arrive as strings from the environment and must be numbers.
_NUMBERS: dict[str, type] = {
    "MAX_CONCURRENT_JOBS": int,
    "MAX_BODY_BYTES": int,
    "RECONCILE_INTERVAL": float,
    "METRICS_RETENTION_SECONDS": float,
    "REPORT_GRACE_SECONDS": float,
}


class ConfigError(ValueError):
    """A setting has a value the plane cannot use; the message names the variable."""


def normalize(config: dict[str, Any]) -> None:
    """Coerce numeric settings in place; raises ConfigError naming the bad variable."""
    for key, kind in _NUMBERS.items():
        value = config.get(key)
        if value is None:
            continue
        try:
            config[key] = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"SFTOPS_{key}={value!r} is not a valid {kind.__name__}") from None
        if config[key] < 0:
            raise ConfigError(f"SFTOPS_{key}={value!r} must not be negative")
    if str(config.get("AUTH", "enabled")).lower() not in ("enabled", "disabled"):
        raise ConfigError(f"SFTOPS_AUTH={config['AUTH']!r} must be 'enabled' or 'disabled'")
    if config.get("LAUNCHER") not in ("local", "kubernetes"):
        raise ConfigError(f"SFTOPS_LAUNCHER={config.get('LAUNCHER')!r} must be 'local' or 'kubernetes'")


def settings_table() -> str:
    """The settings as a Markdown table for the README."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = "" if s.default is None else f"`{s.default}`"
        rows.append(f"| `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)
