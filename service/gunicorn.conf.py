"""gunicorn settings for the plane: `gunicorn -c service/gunicorn.conf.py "service.app:create_app()"`.

Workers come from SFTOPS_WORKERS or WEB_CONCURRENCY (default 2), the address from SFTOPS_BIND
(default 127.0.0.1:8000). HTTP metrics use prometheus_client's multiprocess mode: every worker writes
its counters to PROMETHEUS_MULTIPROC_DIR (default <SFTOPS_DATA_DIR>/prometheus), which is emptied when
gunicorn starts, and a dead worker's live gauges are dropped in child_exit. The app is not preloaded:
each worker builds its own app after the fork, so database pools and threads are never shared.
"""

import os
from pathlib import Path

bind = os.environ.get("SFTOPS_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SFTOPS_WORKERS") or os.environ.get("WEB_CONCURRENCY") or 2)
worker_class = os.environ.get("SFTOPS_WORKER_CLASS", "gthread")
threads = int(os.environ.get("SFTOPS_THREADS", "4"))
keepalive = 5
timeout = 60
graceful_timeout = 20
accesslog = None
errorlog = "-"
loglevel = os.environ.get("SFTOPS_LOG_LEVEL", "info")

# Must be in the environment before any worker imports prometheus_client.
_metrics_dir = Path(
    os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    or Path(os.environ.get("SFTOPS_DATA_DIR", "./.sftops")).expanduser() / "prometheus"
).resolve()
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)


def on_starting(server):
    """Start without an earlier run's metric files, which would be summed in (only *.db: the dir may be shared)."""
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in _metrics_dir.glob("*.db"):
        stale.unlink()


def child_exit(server, worker):
    """Drop a dead worker's live gauge files."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
