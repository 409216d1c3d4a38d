"""The Launcher interface shared by the local and Kubernetes launchers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# Environment a launched job reads (see job/reporter.py); the token is a secret: never log it.
ENV_JOB_ID = "SFTOPS_JOB_ID"
ENV_PLANE_URL = "SFTOPS_PLANE_URL"
ENV_JOB_TOKEN = "SFTOPS_JOB_TOKEN"
ENV_SPEC = "SFTOPS_SPEC"

RunState = Literal["pending", "running", "succeeded", "failed", "unknown"]


class LaunchError(Exception):
    """A launcher could not start, inspect or stop a job; the message names the object and the fix."""

    def __init__(self, message: str, *, reason: str = "LaunchFailed", retryable: bool = False):
        """Keep a machine-readable reason and whether a later attempt may succeed."""
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a launcher needs to start one job."""

    job_id: str
    spec: dict[str, Any]  # the resolved JobSpec as JSON
    token: str  # the job's own report token (secret)
    plane_url: str  # where the job posts /v1/jobs/{id}/reports


@dataclass
class RunStatus:
    """What a launcher sees of a job's run right now."""

    state: RunState
    reason: str | None = None  # e.g. OOMKilled, Unschedulable, DeadlineExceeded, exit code 2
    message: str | None = None
    exit_code: int | None = None
    events: list[tuple[str, str]] = field(default_factory=list)  # (level, message) worth an event once


class Launcher(Protocol):
    """Starts, inspects and stops job runs; holds no reference to the Flask app."""

    name: str

    def submit(self, request: LaunchRequest) -> str:
        """Start the job; return an opaque handle stored with the job. Raises LaunchError."""

    def poll(self, job_id: str, handle: str) -> RunStatus:
        """Report the run's current state. Raises LaunchError."""

    def cancel(self, job_id: str, handle: str) -> None:
        """Stop the run (idempotent). Raises LaunchError."""

    def capacity(self) -> int | None:
        """How many more jobs may start now; None for no limit."""
