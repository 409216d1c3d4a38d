"""The plane's state: jobs, their events and loss points, in SQLite (default) or PostgreSQL.

Every status change goes through `_transition`, which checks the lifecycle and writes a status event in the
same transaction. Writers on SQLite take the write lock up front (BEGIN IMMEDIATE) so concurrent workers
queue on the busy timeout instead of failing on a lock upgrade.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from service import migrations

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"running", "cancelling"})
# The lifecycle: queued -> running -> succeeded | failed | cancelled, with cancelling on the way to cancelled.
ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelling", "cancelled"}),
    "cancelling": frozenset({"succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
TRAIN, EVAL = 0, 1
HEALTH_WINDOW = 1000  # points per series sampled from the run's tail for the health analysis on each report
HEALTH_TAIL_FRACTION = 0.3  # the tail covers the analysis' trailing window (job.health: last 20% of steps)
HEALTH_HEAD = 32  # the first points, from which the analysis takes the start level
CALLBACK_MAX_ATTEMPTS = 6

_Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("seq", _Id, primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("name", String(63), nullable=False),
    Column("status", String(16), nullable=False),
    Column("submitter", String(200), nullable=False),
    Column("labels", Text, nullable=False),
    Column("spec", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("handle", Text),
    Column("token_sha256", String(64)),
    Column("idempotency_key", String(255)),
    Column("body_sha256", String(64)),
    Column("progress", Text),
    Column("health", Text),
    Column("error", Text),
    Column("artifacts", Text),
    Column("curve", Text),  # first and min point per series, kept so health needs only a trailing window
    Column("gauges", Text),  # the numbers /metrics shows, flattened at report time so a scrape parses little
    Column("band_low", Float, nullable=False),
    Column("band_high", Float, nullable=False),
    Column("train_nonfinite", Boolean, nullable=False, default=False),
    Column("last_report_at", Float),
    Column("lease_owner", String(100)),
    Column("lease_until", Float),
    Column("run_gone_at", Float),
    Column("run_events", Text),
    Column("callback_state", String(16)),  # pending | delivered | failed
    Column("callback_attempts", Integer, nullable=False, default=0),
    Column("callback_next_at", Float),
    UniqueConstraint("submitter", "idempotency_key", name="uq_jobs_idempotency"),
    Index("ix_jobs_status_seq", "status", "seq"),
    Index("ix_jobs_finished_at", "finished_at"),
    Index("ix_jobs_callback", "callback_state", "callback_next_at"),
)

job_labels = Table(
    "job_labels",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", String(253), nullable=False),
    Index("ix_job_labels_kv", "key", "value"),
)

events = Table(
    "events",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("time", Float, nullable=False),
    Column("level", String(16), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", Text),
    Index("ix_events_job_id", "job_id", "id"),
)

points = Table(
    "points",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("series", SmallInteger, primary_key=True),  # TRAIN or EVAL
    Column("step", Integer, primary_key=True),
    Column("loss", Float),  # NULL when non-finite (SQLite cannot store NaN)
    Column("nonfinite", Boolean, nullable=False, default=False),
    Column("time", Float),
)

locks = Table(
    "locks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(100)),
    Column("expires_at", Float, nullable=False, default=0.0),
)


_VIEW_COLUMNS = ("id, name, status, submitter, labels, spec, created_at, updated_at, started_at, finished_at, "
                 "progress, health, error, artifacts")
_JOB_BY_ID = f"SELECT {_VIEW_COLUMNS} FROM jobs WHERE id = ?"
_TOKEN_BY_ID = "SELECT token_sha256 FROM jobs WHERE id = ?"


class StoreError(Exception):
    """Base of the store's domain errors."""


class NotFound(StoreError):
    """No job has this id."""


class IllegalTransition(StoreError):
    """The requested status change is not allowed from the job's current status."""

    def __init__(self, job_id: str, current: str, wanted: str):
        """Name the job, where it is and where it was asked to go."""
        super().__init__(f"job {job_id} is {current}; it cannot become {wanted}")
        self.current = current
        self.wanted = wanted


class IdempotencyConflict(StoreError):
    """The Idempotency-Key was used before with a different body."""

    def __init__(self, job_id: str):
        """Name the job the key belongs to."""
        super().__init__(
            f"Idempotency-Key was already used for job {job_id} with a different body; use a new key for a new job"
        )
        self.job_id = job_id


def new_job_id() -> str:
    """A job id: lowercase, starts with a letter, 17 characters (fits Kubernetes names as sftops-<id>)."""
    return "j" + secrets.token_hex(8)


def sha256_hex(value: str | bytes) -> str:
    """Hex SHA-256 of a token or body."""
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()


def _dumps(value: Any) -> str | None:
    """JSON text for a JSON column (None stays NULL; NaN and infinities become null)."""
    if value is None:
        return None
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_json_safe(value), separators=(",", ":"), allow_nan=False)


def _json_safe(value: Any) -> Any:
    """A copy with non-finite floats replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _loads(value: str | None) -> Any:
    """Parse a JSON column."""
    return None if value is None else orjson.loads(value)


def _finite(value: Any) -> float | None:
    """A float for JSON, or None for missing and non-finite values."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _sqlite_url(data_dir: str | Path) -> str:
    """The default database: one file in the data directory."""
    path = Path(data_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'sftops.db'}"


class Store:
    """Jobs, events and loss points; created unbound, attached to an app with init_app."""

    def __init__(self, url: str | None = None):
        """Connect now when a URL is given (scripts, fixtures); otherwise init_app does."""
        self.engine: Engine | None = None
        if url is not None:
            self.configure(url)

    # -- lifecycle -------------------------------------------------------------------------------

    def init_app(self, app) -> None:
        """Connect to SFTOPS_DATABASE_URL (or SQLite in SFTOPS_DATA_DIR), migrate, attach to the app."""
        url = app.config.get("DATABASE_URL") or _sqlite_url(app.config["DATA_DIR"])
        self.configure(url)
        app.extensions["sftops.store"] = self

    def configure(self, url: str) -> None:
        """Create the engine and bring the schema up to date."""
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        if url.startswith("sqlite"):
            self.engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            _tune_sqlite(self.engine)
        else:
            # pre-ping costs a round trip per checkout (about a fifth of a GET) but makes a database restart
            # invisible to clients, writes included.
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
        self._driver_errors = _driver_operational_errors(self.engine)
        migrations.upgrade(self.engine, metadata)

    def close(self) -> None:
        """Release the connection pool."""
        if self.engine is not None:
            self.engine.dispose()

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE)."""
        with self.engine.connect() as conn:
            conn.execution_options(sftops_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only connection."""
        with self.engine.connect() as conn:
            yield conn

    def ping(self) -> None:
        """Raise unless the database answers (readiness)."""
        with self._read() as conn:
            conn.execute(text("SELECT 1"))

    def schema_version(self) -> int:
        """The migration version in force."""
        with self._read() as conn:
            return migrations.current_version(conn)

    # -- jobs ------------------------------------------------------------------------------------

    def create_job(
        self,
        spec: dict[str, Any],
        *,
        submitter: str,
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
        status: str = "queued",
        token_sha256: str | None = None,
        job_id: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Insert a job (spec: the resolved JobSpec as JSON); returns (job, created).

        With an idempotency key already used by this submitter, returns the earlier job and False, or raises
        IdempotencyConflict when its body differs. `status`/`token_sha256` let fixtures and imports create a
        job that is already running with a known report token.
        """
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        now = time.time()
        job_id = job_id or new_job_id()
        band = spec.get("health", {}).get("target_band") or (0.3, 0.5)
        labels = dict(spec.get("labels") or {})
        row = {
            "id": job_id,
            "name": spec["name"],
            "status": status,
            "submitter": submitter,
            "labels": _dumps(labels),
            "spec": _dumps(spec),
            "created_at": now,
            "updated_at": now,
            "started_at": now if status != "queued" else None,
            "finished_at": now if status in TERMINAL else None,
            "token_sha256": token_sha256,
            "idempotency_key": idempotency_key,
            "body_sha256": body_sha256,
            "band_low": float(band[0]),
            "band_high": float(band[1]),
            "train_nonfinite": False,
            "callback_attempts": 0,
        }
        try:
            with self._write() as conn:
                if idempotency_key is not None:
                    earlier = self._by_idempotency(conn, submitter, idempotency_key)
                    if earlier is not None:
                        return self._replay(earlier, body_sha256), False
                conn.execute(jobs.insert().values(**row))
                if labels:
                    conn.execute(
                        job_labels.insert(), [{"job_id": job_id, "key": k, "value": v} for k, v in labels.items()]
                    )
                self._event(conn, job_id, now, "info", "status", f"job created as {status}", {"to": status})
        except IntegrityError:
            # A concurrent request with the same key won the race (PostgreSQL reaches here; SQLite serialises).
            if idempotency_key is None:
                raise
            with self._read() as conn:
                earlier = self._by_idempotency(conn, submitter, idempotency_key)
            if earlier is None:
                raise
            return self._replay(earlier, body_sha256), False
        return self.get_job(job_id), True

    def _by_idempotency(self, conn: Connection, submitter: str, key: str):
        """The job an idempotency key created, if any."""
        return (
            conn.execute(select(jobs).where(jobs.c.submitter == submitter, jobs.c.idempotency_key == key))
            .mappings()
            .first()
        )

    def _replay(self, row, body_sha256: str | None) -> dict[str, Any]:
        """The earlier job for a repeated key, or IdempotencyConflict when the body changed."""
        if row["body_sha256"] != body_sha256:
            raise IdempotencyConflict(row["id"])
        return job_view(row)

    def get_job(self, job_id: str, *, raw: bool = False) -> dict[str, Any] | None:
        """One job as the API shows it, or None (one indexed lookup on the hot path of GET /v1/jobs/{id}).

        raw=True: JSON columns stay serialised (see job_view), for responses only.
        """
        row = self._fetch_one(_JOB_BY_ID, job_id)
        return None if row is None else job_view(row, raw=raw)

    def _fetch_one(self, sql: str, *params: Any) -> dict[str, Any] | None:
        """Run one read straight on a pooled DB-API connection, as a dict or None.

        For the hottest reads only: SQLAlchemy's statement machinery costs several times the query itself.
        `sql` uses `?` placeholders, rewritten for psycopg. A connection that fails (dropped by the server
        after the pool's ping, or SQLite busy past its timeout) is discarded and the read tried once more.
        """
        if self.dialect == "postgresql":
            sql = sql.replace("?", "%s")
        for attempt in (1, 2):
            conn = self.engine.raw_connection()
            try:
                cursor = conn.cursor()
                try:
                    cursor.execute(sql, params)
                    row = cursor.fetchone()
                    names = [d[0] for d in cursor.description]
                finally:
                    cursor.close()
            except self._driver_errors as e:
                conn.invalidate(e)
                if attempt == 2:
                    raise
                continue
            finally:
                conn.close()  # back to the pool, which rolls back PostgreSQL's implicit transaction
            return None if row is None else dict(zip(names, row))
        return None  # unreachable: the second attempt returns or raises

    def get_row(self, job_id: str) -> dict[str, Any] | None:
        """One job's raw row (internal columns included), or None."""
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return None if row is None else dict(row)

    def job_token_sha256(self, job_id: str) -> str | None | bool:
        """The job's report-token hash; None when it has none yet, False when the job does not exist."""
        row = self._fetch_one(_TOKEN_BY_ID, job_id)
        return False if row is None else row["token_sha256"]

    def list_jobs(
        self,
        *,
        status: list[str] | None = None,
        labels: dict[str, str] | None = None,
        limit: int = 50,
        after: int | None = None,
        raw: bool = False,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Jobs newest first, filtered; returns (items, cursor of the next page or None); raw: see job_view."""
        query = select(jobs).order_by(jobs.c.seq.desc()).limit(limit + 1)
        if status:
            query = query.where(jobs.c.status.in_(status))
        for key, value in (labels or {}).items():
            query = query.where(
                jobs.c.id.in_(select(job_labels.c.job_id).where(job_labels.c.key == key, job_labels.c.value == value))
            )
        if after is not None:
            query = query.where(jobs.c.seq < after)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        more = len(rows) > limit
        rows = rows[:limit]
        return [job_view(r, raw=raw) for r in rows], (rows[-1]["seq"] if more else None)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: queued -> cancelled now, running -> cancelling (the reconciler finishes it). Idempotent."""
        with self._write() as conn:
            row = self._lock_row(conn, job_id)
            if row["status"] == "queued":
                self._transition(conn, row, "cancelled", message="cancelled before it started")
            elif row["status"] == "running":
                self._transition(conn, row, "cancelling", message="cancel requested")
        return self.get_job(job_id)

    def transition(self, job_id: str, to: str, *, message: str | None = None, **fields: Any) -> dict[str, Any]:
        """Move a job to status `to` (raises NotFound, IllegalTransition); extra fields: error, artifacts, level."""
        with self._write() as conn:
            row = self._lock_row(conn, job_id)
            if row["status"] != to:
                self._transition(conn, row, to, message=message, **fields)
        return self.get_job(job_id)

    def _lock_row(self, conn: Connection, job_id: str):
        """The job's row, locked for this transaction (FOR UPDATE on PostgreSQL); raises NotFound."""
        row = conn.execute(select(jobs).where(jobs.c.id == job_id).with_for_update()).mappings().first()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row

    def _transition(
        self,
        conn: Connection,
        row,
        to: str,
        *,
        message: str | None = None,
        error: dict | None = None,
        artifacts: dict | None = None,
        level: str | None = None,
        data: dict | None = None,
    ) -> None:
        """Apply one legal status change and its event; raises IllegalTransition."""
        current = row["status"]
        if to not in ALLOWED[current]:
            raise IllegalTransition(row["id"], current, to)
        now = time.time()
        values: dict[str, Any] = {"status": to, "updated_at": now, "lease_owner": None, "lease_until": None}
        if to == "running" and row["started_at"] is None:
            values["started_at"] = now
        if to in TERMINAL:
            values["finished_at"] = now
            if _loads(row["spec"]).get("callback_url"):
                values.update(callback_state="pending", callback_next_at=now, callback_attempts=0)
        if error is not None:
            values["error"] = _dumps(error)
        if artifacts is not None:
            values["artifacts"] = _dumps(artifacts)
        conn.execute(update(jobs).where(jobs.c.id == row["id"]).values(**values))
        detail = {"from": current, "to": to, **(data or {})}
        if error is not None:
            detail["error"] = error
        text_ = f"{current} -> {to}" + (f": {message}" if message else "")
        self._event(conn, row["id"], now, level or ("error" if to == "failed" else "info"), "status", text_, detail)

    def _event(self, conn: Connection, job_id: str, when: float, level: str, type_: str, message: str, data) -> None:
        """Append one event."""
        conn.execute(
            events.insert().values(
                job_id=job_id, time=when, level=level, type=type_, message=message, data=_dumps(data)
            )
        )

    def add_event(self, job_id: str, level: str, message: str, data: dict | None = None, type_: str = "message"):
        """Append an event to a job (reconciler and callbacks use this)."""
        with self._write() as conn:
            self._event(conn, job_id, time.time(), level, type_, message, data)

    def list_events(self, job_id: str, *, after: int | None = None, limit: int = 100):
        """A job's events oldest first after the cursor; returns (items, next cursor or None)."""
        query = select(events).where(events.c.job_id == job_id).order_by(events.c.id).limit(limit + 1)
        if after is not None:
            query = query.where(events.c.id > after)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            {
                "id": r["id"],
                "time": rfc3339(r["time"]),
                "level": r["level"],
                "type": r["type"],
                "message": r["message"],
                "data": _loads(r["data"]) or {},
            }
            for r in rows
        ]
        return items, (rows[-1]["id"] if more else None)

    # -- reports ---------------------------------------------------------------------------------

    def add_report(self, job_id: str, report: dict[str, Any]) -> dict[str, int]:
        """Store one job report atomically: status change, events, loss points, progress and health.

        `report` is the validated body (see the brief's report contract). Raises NotFound and
        IllegalTransition (nothing is stored then). Returns the counts accepted.
        """
        now = time.time()
        records = sorted(report.get("metrics") or [], key=lambda r: r["step"])
        with self._write() as conn:
            row = self._lock_row(conn, job_id)
            path = _status_path(row, report.get("status"))
            for level_event in report.get("events") or []:
                self._event(
                    conn,
                    job_id,
                    float(level_event.get("time") or now),
                    level_event.get("level", "info"),
                    "message",
                    level_event["message"],
                    level_event.get("data") or {},
                )
            values: dict[str, Any] = {"last_report_at": now, "updated_at": now}
            if records:
                values.update(self._store_points(conn, row, records, report.get("total_steps")))
            elif report.get("total_steps") is not None:
                progress = _loads(row["progress"]) or _empty_progress()
                progress["total_steps"] = report["total_steps"]
                values["progress"] = _dumps(progress)
                values["gauges"] = _dumps(_gauges(progress, _loads(row["health"])))
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            for to in path:
                row = self._lock_row(conn, job_id)
                self._transition(
                    conn,
                    row,
                    to,
                    message="reported by the job",
                    error=report.get("error") if to == "failed" else None,
                    artifacts=report.get("artifacts") if to == "succeeded" else None,
                )
        return {"metrics": len(records), "events": len(report.get("events") or [])}

    def _store_points(self, conn: Connection, row, records: list[dict], total_steps: int | None) -> dict[str, Any]:
        """Upsert loss points, fold the records into progress, recompute health; returns job columns to set."""
        job_id = row["id"]
        curve = _loads(row["curve"]) or {}
        new_points = []
        for r in records:
            for series, key in ((TRAIN, "train_loss"), (EVAL, "eval_loss")):
                if key not in r or r[key] is None:
                    continue
                loss = float(r[key])
                finite = math.isfinite(loss)
                new_points.append(
                    {
                        "job_id": job_id,
                        "series": series,
                        "step": int(r["step"]),
                        "loss": loss if finite else None,
                        "nonfinite": not finite,
                        "time": r.get("time"),
                    }
                )
                if finite:
                    _fold_curve(curve, key.removesuffix("_loss"), int(r["step"]), loss)
        if new_points:
            self._upsert_points(conn, new_points)

        progress = _loads(row["progress"]) or _empty_progress()
        nonfinite = bool(row["train_nonfinite"])
        for r in records:
            progress["step"] = max(progress.get("step") or 0, int(r["step"]))
            for key in ("epoch", "learning_rate", "grad_norm", "tokens_per_second"):
                if r.get(key) is not None:
                    progress[key] = _finite(r[key])
            if r.get("eval_loss") is not None:
                progress["eval_loss"] = _finite(r["eval_loss"])
            if r.get("train_loss") is not None:
                progress["train_loss"] = _finite(r["train_loss"])
                nonfinite = not math.isfinite(float(r["train_loss"]))
        if total_steps is not None:
            progress["total_steps"] = total_steps
        progress["eta_seconds"] = _eta(row["started_at"], records[-1].get("time"), progress)
        values: dict[str, Any] = {
            "progress": _dumps(progress),
            "curve": _dumps(curve),
            "train_nonfinite": nonfinite,
        }
        health = self._health(conn, row, curve) if new_points else _loads(row["health"])
        values["health"] = _dumps(health)
        values["gauges"] = _dumps(_gauges(progress, health))
        return values

    def _upsert_points(self, conn: Connection, rows: list[dict]) -> None:
        """Insert points; a repeated (series, step) from a retried report replaces the earlier value."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(points)
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "series", "step"],
            set_={"loss": stmt.excluded.loss, "nonfinite": stmt.excluded.nonfinite, "time": stmt.excluded.time},
        )
        conn.execute(stmt, rows)

    def _health(self, conn: Connection, row, curve: dict) -> dict | None:
        """Run job.health.analyze on a bounded sample: the first points, the lowest, and the run's tail.

        The tail is the last HEALTH_TAIL_FRACTION of the steps, thinned to about HEALTH_WINDOW points (every
        k-th; non-finite points always kept), so the work per report stays bounded for 100k-step runs.
        """
        from job.health import analyze

        spec = _loads(row["spec"])
        health_spec = spec.get("health") or {}
        series = {}
        for number, name in ((TRAIN, "train"), (EVAL, "eval")):
            mine = (points.c.job_id == row["id"]) & (points.c.series == number)
            cols = (points.c.step, points.c.loss, points.c.nonfinite)
            last = conn.execute(select(points.c.step).where(mine).order_by(points.c.step.desc()).limit(1)).scalar()
            if last is None:
                series[name] = []
                continue
            low = last - max(int(last * HEALTH_TAIL_FRACTION), HEALTH_WINDOW)
            tail = mine & (points.c.step >= low)
            count = conn.execute(select(func.count()).select_from(points).where(tail)).scalar_one()
            stride = max(1, math.ceil(count / HEALTH_WINDOW))
            numbered = select(*cols, func.row_number().over(order_by=points.c.step).label("rn")).where(tail).subquery()
            rows = conn.execute(
                select(numbered.c.step, numbered.c.loss, numbered.c.nonfinite).where(
                    or_((numbered.c.rn - 1) % stride == 0, numbered.c.step == last, numbered.c.nonfinite)
                )
            ).all()
            rows += conn.execute(select(*cols).where(mine).order_by(points.c.step).limit(HEALTH_HEAD)).all()
            by_step = {s: (math.nan if nf else loss) for s, loss, nf in rows}
            pinned = curve.get(name, {}).get("min")
            if pinned is not None:
                by_step.setdefault(int(pinned[0]), float(pinned[1]))
            series[name] = sorted(by_step.items())
        try:
            return analyze(
                series["train"],
                series["eval"],
                target_band=tuple(health_spec.get("target_band") or (0.3, 0.5)),
                thresholds=health_spec.get("thresholds") or None,
            )
        except Exception:
            # A bug in the analysis must not lose the report; the points are stored and the next report retries.
            log.exception("health analysis failed for job %s", row["id"])
            return _loads(row["health"])

    def loss_points(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        """Every stored train and eval point of a job, by step (non-finite losses as null)."""
        with self._read() as conn:
            rows = conn.execute(
                select(points.c.series, points.c.step, points.c.loss)
                .where(points.c.job_id == job_id)
                .order_by(points.c.series, points.c.step)
            ).all()
        out: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
        for series, step, loss in rows:
            out["train" if series == TRAIN else "eval"].append({"step": step, "loss": loss})
        return out

    # -- reconciler ------------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew a named lease (one reconciler leader across workers and replicas)."""
        now = time.time()
        with self._write() as conn:
            result = conn.execute(
                update(locks)
                .where(locks.c.name == name, or_(locks.c.owner == owner, locks.c.expires_at < now))
                .values(owner=owner, expires_at=now + ttl)
            )
            if result.rowcount == 1:
                return True
            exists = conn.execute(select(locks.c.name).where(locks.c.name == name)).first()
            if exists is None:
                try:
                    with conn.begin_nested():
                        conn.execute(locks.insert().values(name=name, owner=owner, expires_at=now + ttl))
                    return True
                except IntegrityError:
                    return False
            return False

    def release_lock(self, name: str, owner: str) -> None:
        """Give a lease back early (clean shutdown)."""
        with self._write() as conn:
            conn.execute(update(locks).where(locks.c.name == name, locks.c.owner == owner).values(expires_at=0.0))

    def queued_job_ids(self, limit: int) -> list[str]:
        """Oldest queued jobs not leased by a launch in progress."""
        now = time.time()
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.id)
                .where(jobs.c.status == "queued", or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now))
                .order_by(jobs.c.seq)
                .limit(limit)
            ).all()
        return [r[0] for r in rows]

    def count_active(self) -> int:
        """Jobs holding capacity: running, cancelling, or queued and being launched now."""
        now = time.time()
        with self._read() as conn:
            return conn.execute(
                select(func.count())
                .select_from(jobs)
                .where(
                    or_(
                        jobs.c.status.in_(ACTIVE),
                        (jobs.c.status == "queued") & (jobs.c.lease_until >= now),
                    )
                )
            ).scalar_one()

    def claim_for_launch(self, job_id: str, owner: str, ttl: float) -> bool:
        """Atomically lease a queued job for launching; False when another process has it."""
        now = time.time()
        with self._write() as conn:
            result = conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status == "queued",
                    or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now),
                )
                .values(lease_owner=owner, lease_until=now + ttl)
            )
            return result.rowcount == 1

    def set_job_token(self, job_id: str, token_sha256: str) -> None:
        """Store the hash of the report token a launch hands the job."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(token_sha256=token_sha256))

    def mark_launched(self, job_id: str, handle: str) -> str:
        """Record the run's handle and make the job running; returns the job's status afterwards.

        The job may have reported already (running or beyond) or been cancelled meanwhile; then only the
        handle is stored and the caller reacts to the returned status.
        """
        with self._write() as conn:
            row = self._lock_row(conn, job_id)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(handle=handle, run_gone_at=None))
            if row["status"] == "queued":
                self._transition(conn, row, "running", message="launched", data={"handle": handle})
                return "running"
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(lease_owner=None, lease_until=None))
            return row["status"]

    def launch_failed(self, job_id: str, reason: str, message: str, retryable: bool) -> None:
        """Fail a job whose launch failed, or release its lease for a retry."""
        with self._write() as conn:
            row = self._lock_row(conn, job_id)
            if row["status"] != "queued":
                return
            if retryable:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(lease_owner=None, lease_until=None))
                self._event(conn, job_id, time.time(), "warning", "message", f"launch will be retried: {message}",
                            {"reason": reason})
            else:
                self._transition(
                    conn, row, "failed", message=message, error={"code": "launch_failed", "message": message},
                    data={"reason": reason},
                )

    def active_jobs(self) -> list[dict[str, Any]]:
        """Running and cancelling jobs with a run handle (what the reconciler polls)."""
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.status, jobs.c.handle, jobs.c.run_events, jobs.c.run_gone_at)
                .where(jobs.c.status.in_(ACTIVE), jobs.c.handle.is_not(None))
                .order_by(jobs.c.seq)
            ).mappings().all()
        return [dict(r) for r in rows]

    def record_run_events(self, job_id: str, items: list[tuple[str, str]]) -> int:
        """Turn launcher events into job events, each (level, message) only once; returns how many were new."""
        with self._write() as conn:
            row = self._lock_row(conn, job_id)
            seen = set(_loads(row["run_events"]) or [])
            added = 0
            for level, message in items:
                digest = sha256_hex(f"{level}\0{message}")[:16]
                if digest in seen:
                    continue
                seen.add(digest)
                level = level if level in ("info", "warning", "error") else "info"
                self._event(conn, job_id, time.time(), level, "message", message, {"source": "launcher"})
                added += 1
            if added:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(run_events=_dumps(sorted(seen))))
            return added

    def note_run_gone(self, job_id: str) -> float:
        """Remember when the run was first seen gone without a final report; returns that time."""
        now = time.time()
        with self._write() as conn:
            conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.run_gone_at.is_(None)).values(run_gone_at=now)
            )
            return conn.execute(select(jobs.c.run_gone_at).where(jobs.c.id == job_id)).scalar_one()

    def finish_if(self, job_id: str, expect: set[str], to: str, *, message: str, error: dict | None = None) -> bool:
        """Move a job to `to` only while its status is in `expect` (no error when it moved on); True if done."""
        with self._write() as conn:
            row = self._lock_row(conn, job_id)
            if row["status"] not in expect:
                return False
            self._transition(conn, row, to, message=message, error=error)
            return True

    # -- callbacks -------------------------------------------------------------------------------

    def due_callbacks(self, limit: int = 20) -> list[str]:
        """Jobs whose terminal-status callback is due now."""
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.id)
                .where(jobs.c.callback_state == "pending", jobs.c.callback_next_at <= time.time())
                .order_by(jobs.c.callback_next_at)
                .limit(limit)
            ).all()
        return [r[0] for r in rows]

    def claim_callback(self, job_id: str, lease: float) -> int | None:
        """Lease a due callback for one delivery attempt; returns the attempt number or None if taken."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                select(jobs.c.callback_attempts, jobs.c.callback_next_at).where(
                    jobs.c.id == job_id, jobs.c.callback_state == "pending"
                )
            ).first()
            if row is None or row[1] > now:
                return None
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.callback_state == "pending", jobs.c.callback_next_at == row[1])
                .values(callback_attempts=row[0] + 1, callback_next_at=now + lease)
            )
            return row[0] + 1 if result.rowcount == 1 else None

    def callback_done(self, job_id: str, *, delivered: bool, retry_at: float | None, message: str) -> None:
        """Record a delivery attempt: delivered, retry later, or given up (with an event)."""
        with self._write() as conn:
            if delivered:
                values = {"callback_state": "delivered", "callback_next_at": None}
                level = "info"
            elif retry_at is not None:
                values = {"callback_next_at": retry_at}
                level = "warning"
            else:
                values = {"callback_state": "failed", "callback_next_at": None}
                level = "error"
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            self._event(conn, job_id, time.time(), level, "message", message, {"source": "callback"})

    # -- metrics ---------------------------------------------------------------------------------

    def metric_rows(self, retention_seconds: float) -> list[dict[str, Any]]:
        """Jobs /metrics shows: unfinished ones and those finished within the retention."""
        cutoff = time.time() - retention_seconds
        with self._read() as conn:
            rows = conn.execute(
                select(
                    jobs.c.id,
                    jobs.c.name,
                    jobs.c.status,
                    jobs.c.gauges,
                    jobs.c.band_low,
                    jobs.c.band_high,
                    jobs.c.train_nonfinite,
                    jobs.c.last_report_at,
                ).where(or_(jobs.c.finished_at.is_(None), jobs.c.finished_at >= cutoff))
            ).mappings().all()
        return [dict(r) for r in rows]

    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        with self._read() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
        return {status: n for status, n in rows}

    def delete_job(self, job_id: str) -> None:
        """Remove a job and everything of it (tests and admin clean-up)."""
        with self._write() as conn:
            for table in (points, events, job_labels):
                conn.execute(delete(table).where(table.c.job_id == job_id))
            conn.execute(delete(jobs).where(jobs.c.id == job_id))


def _driver_operational_errors(engine: Engine) -> tuple[type[Exception], ...]:
    """The DB-API driver's OperationalError (connection lost, database locked) for raw reads."""
    return (engine.dialect.loaded_dbapi.OperationalError,)


def _tune_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout, and explicit BEGIN (IMMEDIATE for writers) on every SQLite connection."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        """Take transaction control from the driver and set pragmas."""
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        """Writers lock up front so concurrent writers wait instead of failing on a lock upgrade.

        Readers get no BEGIN: every read is one SELECT, which SQLite runs as its own consistent snapshot,
        and skipping the extra round trips is most of a GET's time.
        """
        if conn.get_execution_options().get("sftops_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _status_path(row, wanted: str | None) -> list[str]:
    """The status changes a report asks for; raises IllegalTransition (a repeat of the current one is none)."""
    current = row["status"]
    if current in TERMINAL:
        if wanted == current:
            return []  # a retried final report
        raise IllegalTransition(row["id"], current, wanted or "updated (it has finished)")
    if wanted is None or wanted == current:
        return []
    if current == "cancelling" and wanted == "running":
        raise IllegalTransition(row["id"], current, wanted)
    if current == "queued" and wanted in ("succeeded", "failed"):
        return ["running", wanted]  # the job finished before the launcher's bookkeeping caught up
    if wanted not in ALLOWED[current]:
        raise IllegalTransition(row["id"], current, wanted)
    return [wanted]


def _fold_curve(curve: dict, name: str, step: int, loss: float) -> None:
    """Keep the first and lowest point of a series."""
    entry = curve.setdefault(name, {})
    if entry.get("first") is None or step < entry["first"][0]:
        entry["first"] = [step, loss]
    if entry.get("min") is None or loss < entry["min"][1]:
        entry["min"] = [step, loss]


def _gauges(progress: dict[str, Any], health: dict[str, Any] | None) -> dict[str, Any]:
    """The per-job numbers /metrics exposes, from progress and the health analysis."""
    health = health or {}
    train, eval_ = health.get("train") or {}, health.get("eval") or {}
    return {
        "train_loss": progress.get("train_loss"),
        "eval_loss": progress.get("eval_loss"),
        "train_slope": train.get("slope_per_100"),
        "eval_slope": eval_.get("slope_per_100"),
        "train_relative_slope": train.get("relative_slope"),
        "eval_relative_slope": eval_.get("relative_slope"),
        "gap": health.get("gap"),
        "verdict": health.get("verdict"),
        "step": progress.get("step"),
        "total_steps": progress.get("total_steps"),
        "tokens_per_second": progress.get("tokens_per_second"),
        "grad_norm": progress.get("grad_norm"),
    }


def _empty_progress() -> dict[str, Any]:
    """Progress before any report."""
    return {
        "step": None,
        "total_steps": None,
        "epoch": None,
        "train_loss": None,
        "eval_loss": None,
        "learning_rate": None,
        "grad_norm": None,
        "tokens_per_second": None,
        "eta_seconds": None,
    }


def _eta(started_at: float | None, last_time: float | None, progress: dict) -> float | None:
    """Seconds left at the average pace so far, or None when unknown."""
    step, total = progress.get("step"), progress.get("total_steps")
    if not (started_at and last_time and step and total) or last_time <= started_at:
        return None
    return round(max(0.0, (last_time - started_at) / step * (total - step)), 1)


def rfc3339(ts: float | None) -> str | None:
    """A Unix time as RFC 3339 UTC with milliseconds."""
    if ts is None:
        return None
    seconds = int(ts)
    millis = int(round((ts - seconds) * 1000))
    if millis == 1000:
        seconds, millis = seconds + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def job_view(row, *, raw: bool = False) -> dict[str, Any]:
    """The job object of the API from a jobs row (no token, lease or other internals).

    raw=True leaves the JSON columns as orjson Fragments: a response embeds them without parsing and
    re-serialising (most of the cost of listing jobs); use it only for what goes straight to a client.
    """
    load = _fragment if raw else _loads
    return {
        "id": row["id"],
        "name": row["name"],
        "status": row["status"],
        "submitter": row["submitter"],
        "labels": load(row["labels"]),
        "spec": load(row["spec"]),
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "progress": load(row["progress"]) if row["progress"] is not None else _empty_progress(),
        "health": load(row["health"]),
        "error": load(row["error"]),
        "artifacts": load(row["artifacts"]),
    }


def _fragment(value: str | None) -> orjson.Fragment | None:
    """A JSON column as an already-serialised fragment (None stays null)."""
    return None if value is None else orjson.Fragment(value)
