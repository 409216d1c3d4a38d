"""The REST API's blueprints and the request helpers they share."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, current_app, request
from pydantic import ValidationError

from job.spec import format_validation_error

from service.errors import APIError, error_response
from service.store import IdempotencyConflict, IllegalTransition, NotFound, Store

log = logging.getLogger(__name__)


def register(app: Flask) -> None:
    """Register every blueprint and map the store's domain errors to HTTP statuses."""
    from service.api import jobs, reports, system

    app.register_blueprint(jobs.bp)
    app.register_blueprint(reports.bp)
    app.register_blueprint(system.bp)

    @app.errorhandler(NotFound)
    def _not_found(e: NotFound):
        """404 for an unknown job."""
        return error_response(404, "not_found", str(e))

    @app.errorhandler(IllegalTransition)
    def _illegal(e: IllegalTransition):
        """409 for a status change the lifecycle does not allow."""
        return error_response(409, "illegal_transition", str(e), {"status": e.current, "requested": e.wanted})

    def _unavailable(e: Exception):
        """503 when the database cannot be reached or stays locked: the client may retry."""
        log.warning("store unavailable: %s", type(e).__name__)
        return error_response(503, "store_unavailable", "the job store is unavailable; retry shortly",
                              headers={"Retry-After": "5"})

    for error in _store_outage_errors():
        app.register_error_handler(error, _unavailable)

    @app.errorhandler(IdempotencyConflict)
    def _idempotency(e: IdempotencyConflict):
        """409 for a reused Idempotency-Key with another body."""
        return error_response(409, "idempotency_conflict", str(e), {"job_id": e.job_id})


def _store_outage_errors() -> list[type[Exception]]:
    """Database errors that mean "down or locked", wrapped by SQLAlchemy or raised raw by the drivers."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    errors: list[type[Exception]] = [OperationalError, sqlite3.OperationalError]
    try:
        import psycopg

        errors.append(psycopg.OperationalError)
    except ImportError:  # PostgreSQL support is optional
        pass
    return errors


def store() -> Store:
    """The app's store."""
    return current_app.extensions["sftops.store"]


def json_body(*, allow_nan: bool = False) -> Any:
    """The request's JSON body; raises APIError 415 (not JSON), 413 (too large, via werkzeug) or 400 (malformed)."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise APIError(
            415,
            "unsupported_media_type",
            f"send the body as JSON with Content-Type: application/json (got {mimetype or 'no content type'!r})",
        )
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise APIError(400, "malformed_json", "the request body is empty; send a JSON document")

    def _no_constants(name: str):
        """Reject NaN and Infinity, which are not JSON."""
        raise ValueError(f"{name} is not valid JSON")

    def _finite(text: str) -> float:
        """Reject numbers too large for a double (1e999 would become infinity)."""
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"number {text} is out of range")
        return value

    try:
        if allow_nan:
            return json.loads(raw)
        return json.loads(raw, parse_constant=_no_constants, parse_float=_finite)
    except RecursionError:
        raise APIError(400, "malformed_json", "the JSON body is nested too deeply") from None
    except ValueError as e:
        raise APIError(400, "malformed_json", f"the body is not valid JSON: {e}") from None


def int_arg(name: str, default: int | None, *, low: int, high: int | None = None) -> int | None:
    """An integer query parameter within bounds; raises APIError 400 naming it."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise APIError(400, "invalid_parameter", f"{name} must be an integer, got {raw!r}", {"parameter": name}) from None
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, "invalid_parameter", f"{name} must be {bounds}, got {value}", {"parameter": name})
    return value


def cursor_arg(name: str = "after") -> int | None:
    """A pagination cursor as the store knows it (opaque to clients); raises APIError 400."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise APIError(400, "invalid_parameter", f"{name} must be a cursor returned as `next`, got {raw!r}",
                       {"parameter": name})
    return int(raw)


class _OneError:
    """One pydantic error in the shape format_validation_error reads."""

    def __init__(self, error: dict):
        """Wrap a single entry of ValidationError.errors()."""
        self._error = error

    def errors(self) -> list[dict]:
        """The wrapped error as a list."""
        return [self._error]


def field_errors(err: ValidationError) -> list[dict[str, str]]:
    """[{field, message}] for a 422, one per pydantic error, in job.spec's wording.

    Built error by error (not by splitting job.spec.validation_details' lines) because a client's dict key
    may hold a newline or ": ", which would break a line-based split.
    """
    details = []
    for error in err.errors():
        loc = tuple(json.dumps(p)[1:-1] if isinstance(p, str) else p for p in error["loc"])
        path = ".".join(str(p) for p in loc) or "(root)"
        line = format_validation_error(_OneError({**error, "loc": loc}), "spec")
        details.append({"field": path, "message": line[len(f"spec: {path}: "):]})
    return details


def validated(model, data: Any, *, code: str, what: str):
    """`data` validated as the pydantic `model`; raises APIError 422 listing each field's path and message."""
    if not isinstance(data, dict):
        raise APIError(422, code, f"the {what} must be a JSON object of fields",
                       [{"field": "(root)", "message": f"expected an object, got {type(data).__name__}"}])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        details = field_errors(e)
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:3])
        raise APIError(422, code, f"invalid {what}: {summary}", details) from None
