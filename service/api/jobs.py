"""The jobs resource: submit, list, read, cancel, events and loss curves."""

from __future__ import annotations

import re

from flask import Blueprint, g, jsonify, request, url_for

from job.spec import JobSpec, dump_spec
from service.api import cursor_arg, int_arg, json_body, store, validated
from service.auth import require
from service.errors import APIError
from service.store import STATUSES, sha256_hex

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

JOB_ID_RE = re.compile(r"^[a-z][a-z0-9]{0,31}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


def _job_or_404(job_id: str) -> dict:
    """The job, or APIError 404 (ids that cannot exist are refused without a query)."""
    job = store().get_job(job_id, raw=True) if JOB_ID_RE.match(job_id) else None
    if job is None:
        raise APIError(404, "not_found", f"no job {job_id!r}")
    return job


@bp.post("")
@require("jobs:write")
def submit():
    """Validate a JobSpec and queue it; an Idempotency-Key makes retries return the same job."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY_RE.match(key):
        raise APIError(400, "invalid_idempotency_key",
                       "Idempotency-Key must be 1-255 printable ASCII characters without spaces")
    spec = validated(JobSpec, json_body(), code="invalid_spec", what="job spec")
    job, created = store().create_job(
        spec.model_dump(mode="json"),
        submitter=g.principal.name,
        idempotency_key=key,
        body_sha256=sha256_hex(dump_spec(spec)) if key is not None else None,
    )
    response = jsonify(job)
    response.status_code = 201 if created else 200
    response.headers["Location"] = url_for("jobs.get", job_id=job["id"])
    return response


@bp.get("")
@require("jobs:read")
def list_():
    """Jobs newest first, filtered by status and label, in pages of `limit` after the cursor."""
    statuses = [s for value in request.args.getlist("status") for s in value.split(",") if s]
    unknown = sorted(set(statuses) - set(STATUSES))
    if unknown:
        raise APIError(400, "invalid_parameter", f"unknown status {unknown}; known: {list(STATUSES)}",
                       {"parameter": "status"})
    labels = {}
    for value in request.args.getlist("label"):
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise APIError(400, "invalid_parameter", f"label filter must be key=value, got {value!r}",
                           {"parameter": "label"})
        labels[key] = val
    limit = int_arg("limit", 50, low=1, high=500)
    items, cursor = store().list_jobs(status=statuses or None, labels=labels, limit=limit, after=cursor_arg(), raw=True)
    return jsonify({"items": items, "next": None if cursor is None else str(cursor)})


@bp.get("/<job_id>")
@require("jobs:read")
def get(job_id: str):
    """One job."""
    return jsonify(_job_or_404(job_id))


@bp.post("/<job_id>/cancel")
@require("jobs:write")
def cancel(job_id: str):
    """Cancel a job (idempotent): queued jobs stop at once, running ones go through cancelling."""
    _job_or_404(job_id)
    return jsonify(store().cancel(job_id))


@bp.get("/<job_id>/events")
@require("jobs:read")
def events(job_id: str):
    """A job's events oldest first, in pages after the cursor."""
    _job_or_404(job_id)
    items, cursor = store().list_events(job_id, after=cursor_arg(), limit=int_arg("limit", 100, low=1, high=1000))
    return jsonify({"items": items, "next": None if cursor is None else str(cursor)})


@bp.get("/<job_id>/metrics")
@require("jobs:read")
def metrics(job_id: str):
    """A job's loss curves, health and progress."""
    job = _job_or_404(job_id)
    curves = store().loss_points(job_id)
    return jsonify({**curves, "health": job["health"], "progress": job["progress"]})
