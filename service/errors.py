"""The API's one error type and the handler that renders every error as JSON."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Machine-readable codes for werkzeug's own errors, by status.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_spec",
}


class APIError(Exception):
    """An error a client caused or must know about, rendered as {"error": {code, message, details}}."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, headers: dict | None = None):
        """Keep the HTTP status, a stable code, a message that says how to fix it, and details."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, details: Any = None, headers: dict | None = None):
    """The JSON response every error uses."""
    response = jsonify({"error": {"code": code, "message": message, "details": details}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """Register the JSON handlers for APIError, werkzeug's HTTPExceptions and anything unexpected."""

    @app.errorhandler(APIError)
    def _api_error(e: APIError):
        """Render our own errors."""
        return error_response(e.status, e.code, e.message, e.details, e.headers)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        """Render werkzeug's errors (404 route, 405, 413 ...) as JSON instead of HTML."""
        status = e.code or 500
        headers = {}
        if status == 405 and getattr(e, "valid_methods", None):
            headers["Allow"] = ", ".join(e.valid_methods)
        message = e.description or e.name
        if status == 413:
            limit = app.config.get("MAX_BODY_BYTES")
            message = f"request body is larger than the limit of {limit} bytes (SFTOPS_MAX_BODY_BYTES)"
        return error_response(status, _HTTP_CODES.get(status, "http_error"), message, None, headers)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        """Log the traceback once and answer 500 without internals."""
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error; the plane's log has the details")
