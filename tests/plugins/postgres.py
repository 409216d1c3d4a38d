"""A real PostgreSQL for the store tests: pytest-postgresql's `postgresql_proc` on 127.0.0.1, one database per test.

pg_ctl is called through a small wrapper: PostgreSQL refuses to run as root, and CI runs as root, so there it
runs pg_ctl as the `postgres` user and lets that user reach the test's data directory; and it keeps
mirakuru's process mark off the server (see _WRAPPER).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from pytest_postgresql import factories


def find_pg_ctl() -> str | None:
    """pg_ctl from /usr/local/bin, PATH, or `pg_config --bindir`; None when PostgreSQL is not installed."""
    if os.access("/usr/local/bin/pg_ctl", os.X_OK):
        return "/usr/local/bin/pg_ctl"
    found = shutil.which("pg_ctl")
    if found:
        return found
    try:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    candidate = Path(bindir) / "pg_ctl"
    return str(candidate) if os.access(candidate, os.X_OK) else None


_WRAPPER = """#!/bin/sh
# pg_ctl for pytest-postgresql.
# mirakuru marks what it starts with mirakuru_uuid=<pid>:<uuid4>, and every python process that imported it
# SIGKILLs, at exit, all processes whose mark merely *contains* its own pid: another test run ending on the
# same machine can hit our server that way. Drop the mark (`pg_ctl stop` still shuts the server down).
unset mirakuru_uuid
if [ "$(id -u)" != 0 ]; then exec "{pg_ctl}" "$@"; fi
# pg_ctl refuses to run as root: run it as postgres, after handing it the data dir and log file.
set -e
prev=""
for arg in "$@"; do
  case "$prev" in
    -D|--pgdata)
      mkdir -p "$arg"; chown postgres "$arg"; chmod 700 "$arg"; dir=$(dirname "$arg") ;;
    -l)
      touch "$arg"; chown postgres "$arg"; dir=$(dirname "$arg") ;;
    *) dir="" ;;
  esac
  # let postgres traverse (not list) the directories above
  while [ -n "$dir" ] && [ "$dir" != "/" ]; do chmod o+x "$dir"; dir=$(dirname "$dir"); done
  prev="$arg"
done
cd /
exec runuser -u postgres -- "{pg_ctl}" "$@"
"""


def pg_ctl_executable() -> str | None:
    """The pg_ctl to give pytest-postgresql: a wrapper script (see _WRAPPER); None without PostgreSQL."""
    pg_ctl = find_pg_ctl()
    if pg_ctl is None:
        return None
    wrapper = Path(tempfile.gettempdir()) / f"sftops-pg_ctl-{os.geteuid()}.sh"
    text = _WRAPPER.replace("{pg_ctl}", pg_ctl)
    if not wrapper.exists() or wrapper.read_text() != text:
        tmp = wrapper.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        tmp.replace(wrapper)
    return str(wrapper)


PG_CTL = pg_ctl_executable()

postgresql_proc = factories.postgresql_proc(
    executable=PG_CTL, host="127.0.0.1", port=None, unixsocketdir=tempfile.gettempdir()
)


@pytest.fixture
def postgres_url(request) -> str:
    """A fresh empty database on the session's PostgreSQL, as a SQLAlchemy psycopg URL (dropped afterwards)."""
    if PG_CTL is None:
        pytest.fail("PostgreSQL is not installed (no pg_ctl): run `make system-deps`")
    import psycopg

    proc = request.getfixturevalue("postgresql_proc")
    name = "sftops_" + secrets.token_hex(6)
    admin = f"host={proc.host} port={proc.port} user={proc.user} dbname=postgres"
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg://{proc.user}@{proc.host}:{proc.port}/{name}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.OperationalError as e:
        # The server went away: show why (its log) instead of only "connection refused".
        raise RuntimeError(f"PostgreSQL on port {proc.port} failed: {e}\n--- server log ---\n{_log_tail(proc)}") from e


def _log_tail(proc, lines: int = 40) -> str:
    """The end of the server's log file."""
    try:
        return "\n".join(Path(proc.logfile).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"
