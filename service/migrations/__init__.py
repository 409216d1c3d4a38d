"""Versioned schema migrations, applied at start under a lock so several workers can start at once.

Each step is (version, description, function(connection, metadata)). Version 1 creates the schema as
store.py defines it; every later change must be a new step with explicit DDL (never edit a shipped step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, inspect, select
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every process of the plane.
_PG_LOCK_KEY = 7_310_402_101

_version_meta = MetaData()
schema_version = Table(
    "schema_version",
    _version_meta,
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
    Column("applied_at", Float, nullable=False),
)


def _v1_initial(conn: Connection, metadata: MetaData) -> None:
    """Create jobs, job_labels, events, points and locks."""
    metadata.create_all(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, str, Callable[[Connection, MetaData], None]]] = [
    (1, "initial schema: jobs, job_labels, events, points, locks", _v1_initial),
]
LATEST = MIGRATIONS[-1][0]


def current_version(conn: Connection) -> int:
    """The schema version recorded in the database (0 for an empty database)."""
    if not inspect(conn).has_table("schema_version"):
        return 0
    return conn.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc())).scalar() or 0


def upgrade(engine: Engine, metadata: MetaData) -> int:
    """Apply missing migrations in one locked transaction; returns the version now in force."""
    with engine.connect() as conn:
        conn.execution_options(sftops_write=True)  # SQLite: BEGIN IMMEDIATE takes the write lock first
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # Serialises concurrent starts; released at commit.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
            _version_meta.create_all(conn, checkfirst=True)
            version = current_version(conn)
            if version > LATEST:
                raise RuntimeError(
                    f"database schema version {version} is newer than this plane ({LATEST}); upgrade the plane"
                )
            for number, description, step in MIGRATIONS:
                if number <= version:
                    continue
                log.info("applying schema migration %d: %s", number, description)
                step(conn, metadata)
                conn.execute(
                    schema_version.insert().values(version=number, description=description, applied_at=time.time())
                )
                version = number
            return version
