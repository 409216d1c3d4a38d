"""Fixtures for the control plane: `app`, `client`, `tokens`, `job_spec`, `live_plane` (real gunicorn).

`live_plane` creates jobs straight through the store with a job token the test knows, so tests can post
reports as the job would, without any way to read a job's token out of the production API.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
SCOPES = ("jobs:read", "jobs:write", "admin")


def make_spec(name: str = "demo", **overrides: Any) -> dict[str, Any]:
    """A small valid JobSpec as JSON (S3 URIs that are never read by the plane)."""
    spec = {
        "name": name,
        "base_model": "s3://models/smollm2/",
        "dataset": "s3://data/train.jsonl",
        "output": f"s3://out/{name}/",
    }
    spec.update(overrides)
    return spec


def make_tokens() -> dict[str, str]:
    """One fresh API token per scope."""
    return {scope: "sft_" + secrets.token_urlsafe(32) for scope in SCOPES}


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    """A tokens file naming each token after its scope (`jobs-read`, `jobs-write`, `admin`)."""
    from service.auth import tokens_file_entry, write_tokens_file

    return write_tokens_file(
        path, [tokens_file_entry(scope.replace(":", "-"), token, [scope]) for scope, token in tokens.items()]
    )


def auth(token: str) -> dict[str, str]:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def job_spec() -> dict[str, Any]:
    """A valid spec dict to post."""
    return make_spec()


@pytest.fixture
def tokens() -> dict[str, str]:
    """scope -> API token, all present in the `app` fixture's tokens file."""
    return make_tokens()


@pytest.fixture
def app_config(tmp_path: Path, tokens: dict[str, str]) -> dict[str, Any]:
    """Overrides for create_app: tmp data dir, known tokens, no background threads. Tests may edit it."""
    return {
        "TESTING": True,
        "DATA_DIR": str(tmp_path / "plane"),
        "DATABASE_URL": None,
        "TOKENS_FILE": str(write_tokens(tmp_path / "tokens.json", tokens)),
        "AUTH": "enabled",
        "RECONCILE_INTERVAL": 0,
        "PUBLIC_URL": "http://127.0.0.1:9",
    }


@pytest.fixture
def app(app_config: dict[str, Any]):
    """The plane app on SQLite in a tmp dir, reconciler thread off (drive it with reconcile_once())."""
    from service.app import create_app

    app = create_app(app_config)
    yield app
    app.extensions["sftops.store"].close()


@pytest.fixture
def client(app):
    """Flask test client of `app`."""
    return app.test_client()


@dataclass
class LivePlane:
    """A gunicorn-served plane on loopback; `.url`, `.tokens`, and helpers to make jobs that can report."""

    url: str
    tokens: dict[str, str]
    data_dir: Path
    env: dict[str, str]
    log_path: Path
    database_url: str | None = None
    process: subprocess.Popen | None = None
    _store: Any = field(default=None, repr=False)

    @property
    def store(self):
        """A Store on the plane's database (same SQLite file or PostgreSQL URL)."""
        if self._store is None:
            from service.store import Store, _sqlite_url

            self._store = Store(self.database_url or _sqlite_url(self.data_dir))
        return self._store

    def headers(self, scope: str = "admin") -> dict[str, str]:
        """Authorization header for the token of `scope`."""
        return auth(self.tokens[scope])

    def create_job(self, spec: dict | None = None, *, status: str = "running", submitter: str = "admin"):
        """Create a job straight in the store with a fresh known report token; returns (job_id, job_token)."""
        from job.spec import parse_spec
        from service.store import sha256_hex

        job_token = "sft_" + secrets.token_urlsafe(32)
        resolved = parse_spec(spec or make_spec()).model_dump(mode="json")
        job, _ = self.store.create_job(resolved, submitter=submitter, status=status, token_sha256=sha256_hex(job_token))
        return job["id"], job_token

    def report(self, job_id: str, job_token: str, body: dict) -> requests.Response:
        """POST a report as the job would."""
        return requests.post(f"{self.url}/v1/jobs/{job_id}/reports", json=body, headers=auth(job_token), timeout=10)

    def start(self, timeout: float = 30.0) -> None:
        """Start gunicorn and wait until /readyz answers."""
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "service" / "gunicorn.conf.py"),
             "service.app:create_app()"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop gunicorn (SIGTERM: graceful) and wait for it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None
        self.log.close()

    def close(self) -> None:
        """Stop the server and the helper store."""
        self.stop()
        if self._store is not None:
            self._store.close()


def plane_env(data_dir: Path, tokens_file: Path, port: int, **settings: Any) -> dict[str, str]:
    """The environment of a gunicorn plane: this interpreter's, minus any SFTOPS_* of the caller, plus settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFTOPS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        {
            "SFTOPS_DATA_DIR": str(data_dir),
            "SFTOPS_TOKENS_FILE": str(tokens_file),
            "SFTOPS_BIND": f"127.0.0.1:{port}",
            "SFTOPS_WORKERS": "2",
            "SFTOPS_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "SFTOPS_RECONCILE_INTERVAL": "0",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update({f"SFTOPS_{k}": str(v) for k, v in settings.items() if v is not None})
    return env


@pytest.fixture
def plane_factory(tmp_path: Path) -> Iterator:
    """Start gunicorn planes with settings: `plane_factory(RECONCILE_INTERVAL=0.5, ...)` -> started LivePlane."""
    planes: list[LivePlane] = []

    def start(*, data_dir: Path | None = None, tokens: dict[str, str] | None = None, start: bool = True,
              **settings: Any) -> LivePlane:
        """A new LivePlane (started unless start=False)."""
        tokens = tokens or make_tokens()
        data_dir = data_dir or tmp_path / f"plane{len(planes)}"
        data_dir.mkdir(parents=True, exist_ok=True)
        tokens_file = write_tokens(tmp_path / f"tokens{len(planes)}.json", tokens)
        port = free_port()
        plane = LivePlane(
            url=f"http://127.0.0.1:{port}", tokens=tokens, data_dir=data_dir,
            env=plane_env(data_dir, tokens_file, port, **settings), log_path=tmp_path / f"gunicorn{len(planes)}.log",
            database_url=settings.get("DATABASE_URL"),
        )
        planes.append(plane)
        if start:
            plane.start()
        return plane

    yield start
    for plane in planes:
        plane.close()


@pytest.fixture
def live_plane(plane_factory) -> LivePlane:
    """A real gunicorn plane (2 workers, SQLite in a tmp dir, reconciler off) on a free loopback port."""
    return plane_factory()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path):
    """A migrated Store on SQLite (file in tmp) and on a real PostgreSQL (fresh database)."""
    from service.store import Store, _sqlite_url

    url = _sqlite_url(tmp_path / "store") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = Store(url)
    yield store
    store.close()
