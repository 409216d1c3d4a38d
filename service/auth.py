"""Bearer-token authentication: API tokens from SFTOPS_TOKENS_FILE, and each job's own report token."""

from __future__ import annotations

import functools
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from flask import current_app, g, request

from service.errors import APIError
from service.store import sha256_hex

log = logging.getLogger(__name__)

SCOPES = ("jobs:read", "jobs:write", "admin")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sftops"'}


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name (recorded as submitter) and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """admin may do everything; otherwise the scope must be granted."""
        return "admin" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class TokenEntry:
    """One line of the tokens file."""

    name: str
    token_sha256: str
    scopes: frozenset[str]


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the entry."""


def load_tokens(path: str | Path) -> list[TokenEntry]:
    """Read a YAML or JSON list of {name, token_sha256, scopes}; raises TokenFileError naming the entry."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenFileError(f"{path}: cannot read the tokens file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TokenFileError(f"{path}: not valid YAML or JSON: {e}") from None
    if not isinstance(data, list):
        raise TokenFileError(f"{path}: must be a list of {{name, token_sha256, scopes}} entries")
    entries = []
    for i, item in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(item, dict) or set(item) - {"name", "token_sha256", "scopes"}:
            raise TokenFileError(f"{where}: must have exactly the keys name, token_sha256, scopes")
        name, digest, scopes = item.get("name"), item.get("token_sha256"), item.get("scopes")
        if not isinstance(name, str) or not name:
            raise TokenFileError(f"{where}: name must be a non-empty string")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise TokenFileError(
                f"{where} ({name}): token_sha256 must be 64 hex digits (sha256 of the token, e.g. `sha256sum`)"
            )
        if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
            raise TokenFileError(f"{where} ({name}): scopes must be a non-empty list of {list(SCOPES)}")
        entries.append(TokenEntry(name, digest.lower(), frozenset(scopes)))
    return entries


class Auth:
    """The API token table; created unbound and attached with init_app."""

    def __init__(self):
        """Empty until init_app loads the tokens file."""
        self.entries: list[TokenEntry] = []
        self.enabled = True

    def init_app(self, app) -> None:
        """Load SFTOPS_TOKENS_FILE, or warn loudly when SFTOPS_AUTH=disabled."""
        self.enabled = str(app.config.get("AUTH", "enabled")).lower() != "disabled"
        if not self.enabled:
            log.warning(
                "AUTHENTICATION IS DISABLED (SFTOPS_AUTH=disabled): anyone who can reach this plane can submit "
                "and cancel jobs. Use this for the embedded demo only."
            )
        elif app.config.get("TOKENS_FILE"):
            self.entries = load_tokens(app.config["TOKENS_FILE"])
            log.info("loaded %d API token(s) from %s", len(self.entries), app.config["TOKENS_FILE"])
        else:
            log.warning("no SFTOPS_TOKENS_FILE: every API call will be refused with 401")
        app.extensions["sftops.auth"] = self

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a presented API token, comparing every entry in constant time."""
        digest = sha256_hex(token)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.token_sha256) and found is None:
                found = entry
        return None if found is None else Principal(found.name, found.scopes)


def bearer_token() -> str | None:
    """The token of an `Authorization: Bearer ...` header, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def current_principal(scope: str) -> Principal:
    """Authenticate the request for `scope`; raises APIError 401/403."""
    auth: Auth = current_app.extensions["sftops.auth"]
    if not auth.enabled:
        return Principal("anonymous", frozenset(SCOPES))
    token = bearer_token()
    if token is None:
        raise APIError(401, "unauthorized", "missing bearer token: send `Authorization: Bearer <token>`",
                       headers=_CHALLENGE)
    principal = auth.authenticate(token)
    if principal is None:
        raise APIError(401, "unauthorized", "invalid token", headers=_CHALLENGE)
    if not principal.allows(scope):
        raise APIError(403, "forbidden", f"token {principal.name!r} lacks the {scope!r} scope",
                       details={"required_scope": scope})
    return principal


def require(scope: str):
    """View decorator: the request needs a token with `scope`; the principal is in g.principal."""

    def decorate(view):
        """Wrap one view."""

        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            """Authenticate, then run the view."""
            g.principal = current_principal(scope)
            return view(*args, **kwargs)

        return wrapper

    return decorate


def check_job_token(job_id: str, stored_sha256: str | None) -> None:
    """Accept only the job's own report token; raises APIError 401 (no/unknown token) or 403 (another token)."""
    token = bearer_token()
    if token is None:
        raise APIError(401, "unauthorized", "missing bearer token: reports need the job's own token",
                       headers=_CHALLENGE)
    if stored_sha256 and hmac.compare_digest(sha256_hex(token), stored_sha256):
        return
    auth: Auth = current_app.extensions["sftops.auth"]
    if auth.authenticate(token) is not None:
        raise APIError(403, "forbidden", f"only job {job_id}'s own token may post its reports")
    raise APIError(401, "unauthorized", "invalid token for this job", headers=_CHALLENGE)


def tokens_file_entry(name: str, token: str, scopes: list[str]) -> dict:
    """A tokens-file entry for a token (used by fixtures and the CLI to write tokens files)."""
    return {"name": name, "token_sha256": sha256_hex(token), "scopes": list(scopes)}


def write_tokens_file(path: Path, entries: list[dict]) -> Path:
    """Write a JSON tokens file."""
    path.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    return path
