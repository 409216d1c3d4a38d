"""Reports from a running job: status, loss points and events, accepted only with the job's own token."""

from __future__ import annotations

from typing import Literal

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field

from service.api import json_body, store, validated
from service.api.jobs import JOB_ID_RE
from service.auth import bearer_token, check_job_token
from service.errors import APIError

bp = Blueprint("reports", __name__, url_prefix="/v1/jobs")
UNIX_TIME_MAX = 32503680000.0  # year 3000: times are Unix seconds, not milliseconds


class _Body(BaseModel):
    """Report parts ignore keys they do not know, so a newer job can talk to an older plane."""

    model_config = ConfigDict(extra="ignore")


class ReportError(_Body):
    """Why the job failed."""

    code: str = Field(..., min_length=1, max_length=64)
    message: str = Field(..., max_length=10_000)


class MetricRecord(_Body):
    """One logged step; losses may be NaN or infinite (that is what non-finite detection is for)."""

    step: int = Field(..., ge=0, le=2**31 - 1)
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    time: float | None = Field(None, ge=0, le=UNIX_TIME_MAX, allow_inf_nan=False)


class ReportEvent(_Body):
    """Something the job wants in its event log."""

    time: float | None = Field(None, ge=0, le=UNIX_TIME_MAX, allow_inf_nan=False)
    level: Literal["info", "warning", "error"] = "info"
    message: str = Field(..., max_length=10_000)
    data: dict = Field(default_factory=dict)


class Report(_Body):
    """The body of POST /v1/jobs/{id}/reports (every key optional)."""

    status: Literal["running", "succeeded", "failed"] | None = None
    error: ReportError | None = None
    artifacts: dict[str, str | None] | None = None
    total_steps: int | None = Field(None, ge=0, le=2**31 - 1)
    metrics: list[MetricRecord] = Field(default_factory=list, max_length=20_000)
    events: list[ReportEvent] = Field(default_factory=list, max_length=1_000)


@bp.post("/<job_id>/reports")
def post_report(job_id: str):
    """Store a job's report; 409 when it asks for a status change the lifecycle refuses."""
    if bearer_token() is None:
        raise APIError(401, "unauthorized", "missing bearer token: reports need the job's own token",
                       headers={"WWW-Authenticate": 'Bearer realm="sftops"'})
    stored = store().job_token_sha256(job_id) if JOB_ID_RE.match(job_id) else False
    if stored is False:
        raise APIError(404, "not_found", f"no job {job_id!r}")
    check_job_token(job_id, stored)
    report = validated(Report, json_body(allow_nan=True), code="invalid_report", what="report")
    accepted = store().add_report(job_id, report.model_dump())
    response = jsonify({"accepted": accepted})
    response.status_code = 202
    return response
