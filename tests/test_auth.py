"""Bearer tokens: scopes, the tokens file, the disabled mode."""

from __future__ import annotations

import json
import logging

import pytest

from service.auth import Auth, TokenFileError, load_tokens
from service.store import sha256_hex
from tests.plugins.plane import auth, make_spec

ENDPOINTS = [
    ("get", "/v1/jobs", "jobs:read"),
    ("get", "/v1/jobs/{id}", "jobs:read"),
    ("get", "/v1/jobs/{id}/events", "jobs:read"),
    ("get", "/v1/jobs/{id}/metrics", "jobs:read"),
    ("post", "/v1/jobs", "jobs:write"),
    ("post", "/v1/jobs/{id}/cancel", "jobs:write"),
]


@pytest.fixture
def job_id(client, tokens) -> str:
    """A queued job."""
    return client.post("/v1/jobs", json=make_spec(), headers=auth(tokens["admin"])).get_json()["id"]


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
def test_scopes(client, tokens, job_id, method, path, scope):
    url = path.format(id=job_id)
    call = getattr(client, method)
    kwargs = {"json": make_spec()} if path == "/v1/jobs" and method == "post" else {}
    missing = call(url, **kwargs)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert call(url, headers=auth("sft_not_a_token"), **kwargs).status_code == 401
    assert call(url, headers={"Authorization": f"Basic {tokens['admin']}"}, **kwargs).status_code == 401
    other = "jobs:write" if scope == "jobs:read" else "jobs:read"
    wrong = call(url, headers=auth(tokens[other]), **kwargs)
    assert wrong.status_code == 403
    assert wrong.get_json()["error"]["details"] == {"required_scope": scope}
    assert call(url, headers=auth(tokens[scope]), **kwargs).status_code in (200, 201)
    assert call(url, headers=auth(tokens["admin"]), **kwargs).status_code in (200, 201)


def test_submitter_is_the_token_name(client, tokens):
    job = client.post("/v1/jobs", json=make_spec(), headers=auth(tokens["admin"])).get_json()
    assert job["submitter"] == "admin"


def test_disabled_auth_warns_and_lets_everyone_in(app_config, caplog):
    from service.app import create_app

    app_config["AUTH"] = "disabled"
    with caplog.at_level(logging.WARNING):
        client = create_app(app_config).test_client()
    assert any(r.levelno == logging.WARNING and "AUTHENTICATION IS DISABLED" in r.message for r in caplog.records)
    r = client.post("/v1/jobs", json=make_spec())
    assert r.status_code == 201 and r.get_json()["submitter"] == "anonymous"


def test_tokens_file_yaml(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(f"- name: ci\n  token_sha256: {sha256_hex('sft_a')}\n  scopes: [jobs:read, jobs:write]\n")
    registry = Auth()
    registry.entries = load_tokens(path)
    principal = registry.authenticate("sft_a")
    assert principal.name == "ci" and principal.allows("jobs:write") and not principal.allows("admin")
    assert registry.authenticate("sft_b") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "must be a list"),
        ("- name: x\n  token_sha256: abc\n  scopes: [admin]\n", "entry 0 (x): token_sha256 must be 64 hex digits"),
        (json.dumps([{"name": "x", "token_sha256": "a" * 64, "scopes": ["root"]}]), "entry 0 (x): scopes"),
        (json.dumps([{"name": "x", "token": "a", "scopes": ["admin"]}]), "entry 0: must have exactly the keys"),
        ("[unclosed", "not valid YAML or JSON"),
    ],
)
def test_bad_tokens_files_name_the_entry(tmp_path, content, message):
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(TokenFileError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_tokens(path)


def test_missing_tokens_file_fails_at_start(app_config):
    from service.app import create_app

    app_config["TOKENS_FILE"] = str(app_config["DATA_DIR"]) + "/missing.yaml"
    with pytest.raises(TokenFileError, match="missing.yaml: cannot read the tokens file"):
        create_app(app_config)
