"""Liveness, readiness and Prometheus endpoints (no authentication: probes and scrapers call them)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify

from service.api import store

log = logging.getLogger(__name__)

bp = Blueprint("system", __name__)


@bp.get("/healthz")
def healthz():
    """The process is up."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """The store answers; 503 otherwise, so a load balancer stops sending traffic."""
    try:
        version = store().schema_version()
    except Exception as e:
        log.warning("readiness check failed: %s", type(e).__name__)
        response = jsonify({"status": "unavailable", "reason": f"store unreachable ({type(e).__name__})"})
        response.status_code = 503
        return response
    return jsonify({"status": "ready", "schema_version": version})


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition."""
    body, content_type = current_app.extensions["sftops.metrics"].exposition()
    return Response(body, content_type=content_type)
