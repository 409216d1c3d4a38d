"""The /v1 REST API through Flask's test client: every endpoint and every error status."""

from __future__ import annotations

import json
import threading

import pytest

from service.store import sha256_hex
from tests.plugins.plane import auth, make_spec


def _post_job(client, tokens, spec=None, **headers):
    """POST /v1/jobs with the write token."""
    return client.post("/v1/jobs", json=spec or make_spec(), headers={**auth(tokens["jobs:write"]), **headers})


def _running_job(app, token: str = "sft_jobtoken") -> str:
    """A running job whose report token is `token`."""
    store = app.extensions["sftops.store"]
    job, _ = store.create_job(
        client_spec(), submitter="ci", status="running", token_sha256=sha256_hex(token)
    )
    return job["id"]


def client_spec() -> dict:
    """A resolved spec (what the API stores)."""
    from job.spec import parse_spec

    return parse_spec(make_spec()).model_dump(mode="json")


def _error(response) -> dict:
    """The error object of a JSON error response."""
    assert response.is_json, response.data
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]


# -- submit -------------------------------------------------------------------------------------


def test_submit_returns_201_with_the_resolved_job(client, tokens):
    response = _post_job(client, tokens, make_spec("first", labels={"team": "nlp"}))
    assert response.status_code == 201
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["name"] == "first" and job["submitter"] == "jobs-write"
    assert job["labels"] == {"team": "nlp"}
    assert job["spec"]["training"]["learning_rate"] == 2e-4  # defaults filled in
    assert set(job) == {"id", "name", "status", "submitter", "labels", "spec", "created_at", "updated_at",
                        "started_at", "finished_at", "progress", "health", "error", "artifacts"}
    assert set(job["progress"]) == {"step", "total_steps", "epoch", "train_loss", "eval_loss", "learning_rate",
                                    "grad_norm", "tokens_per_second", "eta_seconds"}
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(tokens["jobs:read"])).get_json() == job


def test_invalid_spec_is_422_naming_each_field(client, tokens):
    spec = make_spec(lora={"r": 0}, format="xml")
    spec["learning_rat"] = 1
    error = _error(r := _post_job(client, tokens, spec))
    assert r.status_code == 422 and error["code"] == "invalid_spec"
    fields = {d["field"]: d["message"] for d in error["details"]}
    assert set(fields) == {"lora.r", "format", "learning_rat"}
    assert "greater than or equal to 1" in fields["lora.r"]
    assert fields["learning_rat"].startswith("unknown field")


@pytest.mark.parametrize("body", ["[1, 2]", "\"spec\"", "null", "3"])
def test_a_spec_that_is_not_an_object_is_422(client, tokens, body):
    r = client.post("/v1/jobs", data=body, content_type="application/json", headers=auth(tokens["jobs:write"]))
    assert r.status_code == 422 and _error(r)["details"][0]["field"] == "(root)"


@pytest.mark.parametrize("body", ["{", "{\"name\": }", "", "{\"a\": NaN}", "[" * 100_000, "{\"min_rows\": 1e999}"])
def test_malformed_json_is_400(client, tokens, body):
    r = client.post("/v1/jobs", data=body, content_type="application/json", headers=auth(tokens["jobs:write"]))
    assert r.status_code == 400 and _error(r)["code"] == "malformed_json"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(client, tokens, content_type):
    r = client.post("/v1/jobs", data=json.dumps(make_spec()), content_type=content_type,
                    headers=auth(tokens["jobs:write"]))
    assert r.status_code == 415 and _error(r)["code"] == "unsupported_media_type"


def test_body_over_the_limit_is_413(app_config, tokens):
    from service.app import create_app

    app_config["MAX_BODY_BYTES"] = 2048
    client = create_app(app_config).test_client()
    spec = make_spec(labels={f"k{i}": "v" * 100 for i in range(30)})
    r = client.post("/v1/jobs", json=spec, headers=auth(tokens["jobs:write"]))
    assert r.status_code == 413 and "2048" in _error(r)["message"]
    small = client.post("/v1/jobs", json=make_spec(), headers=auth(tokens["jobs:write"]))
    assert small.status_code == 201


def test_idempotency_key_replays_and_conflicts(client, tokens):
    first = _post_job(client, tokens, make_spec("a"), **{"Idempotency-Key": "build-41"})
    again = _post_job(client, tokens, make_spec("a"), **{"Idempotency-Key": "build-41"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    # the same spec with defaults spelled out is the same body
    spelled = _post_job(client, tokens, make_spec("a", lora={"r": 8}), **{"Idempotency-Key": "build-41"})
    assert spelled.status_code == 200
    other = _post_job(client, tokens, make_spec("b"), **{"Idempotency-Key": "build-41"})
    assert other.status_code == 409
    error = _error(other)
    assert error["code"] == "idempotency_conflict" and error["details"] == {"job_id": first.get_json()["id"]}
    bad = _post_job(client, tokens, make_spec("a"), **{"Idempotency-Key": "has space"})
    assert bad.status_code == 400


def test_two_concurrent_identical_posts_create_one_job(app, tokens):
    barrier = threading.Barrier(4)
    responses = []

    def post():
        """One POST in its own client, released with the others."""
        client = app.test_client()
        barrier.wait()
        responses.append(_post_job(client, tokens, make_spec("race"), **{"Idempotency-Key": "race-1"}))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.get_json()["id"] for r in responses}) == 1
    listed = app.test_client().get("/v1/jobs", headers=auth(tokens["jobs:read"])).get_json()["items"]
    assert len(listed) == 1


# -- list, get --------------------------------------------------------------------------------


def test_list_newest_first_with_filters_and_pages(client, tokens):
    ids = [_post_job(client, tokens, make_spec(f"j{i}", labels={"parity": "odd" if i % 2 else "even"}))
           .get_json()["id"] for i in range(5)]
    read = auth(tokens["jobs:read"])
    page = client.get("/v1/jobs?limit=2", headers=read).get_json()
    assert [j["id"] for j in page["items"]] == ids[:2:-1][:2] == [ids[4], ids[3]]
    page2 = client.get(f"/v1/jobs?limit=2&after={page['next']}", headers=read).get_json()
    page3 = client.get(f"/v1/jobs?limit=2&after={page2['next']}", headers=read).get_json()
    assert [j["id"] for j in page2["items"] + page3["items"]] == [ids[2], ids[1], ids[0]]
    assert page3["next"] is None
    odd = client.get("/v1/jobs?label=parity=odd", headers=read).get_json()["items"]
    assert [j["id"] for j in odd] == [ids[3], ids[1]]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(tokens["jobs:write"]))
    cancelled = client.get("/v1/jobs?status=cancelled", headers=read).get_json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    both = client.get("/v1/jobs?status=cancelled,queued&label=parity=even", headers=read).get_json()["items"]
    assert [j["id"] for j in both] == [ids[4], ids[2], ids[0]]


@pytest.mark.parametrize("query", ["limit=0", "limit=x", "limit=501", "after=abc", "status=bogus", "label=novalue"])
def test_bad_list_parameters_are_400(client, tokens, query):
    r = client.get(f"/v1/jobs?{query}", headers=auth(tokens["jobs:read"]))
    assert r.status_code == 400 and _error(r)["code"] == "invalid_parameter"


@pytest.mark.parametrize("job_id", ["jmissing", "UPPER", "a" * 40, "-x"])
def test_unknown_job_is_404_everywhere(client, tokens, job_id):
    read, write = auth(tokens["jobs:read"]), auth(tokens["jobs:write"])
    for r in (client.get(f"/v1/jobs/{job_id}", headers=read),
              client.get(f"/v1/jobs/{job_id}/events", headers=read),
              client.get(f"/v1/jobs/{job_id}/metrics", headers=read),
              client.post(f"/v1/jobs/{job_id}/cancel", headers=write),
              client.post(f"/v1/jobs/{job_id}/reports", json={}, headers=auth("sft_x"))):
        assert r.status_code == 404 and _error(r)["code"] == "not_found"


def test_unknown_route_and_method_are_json(client, tokens):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    r = client.delete("/v1/jobs", headers=auth(tokens["admin"]))
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]


# -- cancel -------------------------------------------------------------------------------------


def test_cancel_queued_then_again(client, tokens):
    job_id = _post_job(client, tokens).get_json()["id"]
    write = auth(tokens["jobs:write"])
    first = client.post(f"/v1/jobs/{job_id}/cancel", headers=write)
    second = client.post(f"/v1/jobs/{job_id}/cancel", headers=write)
    assert first.status_code == second.status_code == 200
    assert first.get_json()["status"] == second.get_json()["status"] == "cancelled"


def test_cancel_running_is_cancelling(app, client, tokens):
    job_id = _running_job(app)
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tokens["jobs:write"]))
    assert r.get_json()["status"] == "cancelling"


# -- events, metrics ----------------------------------------------------------------------------


def test_events_page_with_a_cursor(app, client, tokens):
    job_id = _running_job(app)
    store = app.extensions["sftops.store"]
    for i in range(4):
        store.add_event(job_id, "warning", f"note {i}", {"i": i})
    read = auth(tokens["jobs:read"])
    page = client.get(f"/v1/jobs/{job_id}/events?limit=2", headers=read).get_json()
    assert [e["type"] for e in page["items"]] == ["status", "message"]
    assert page["items"][0]["data"] == {"to": "running"}
    rest = client.get(f"/v1/jobs/{job_id}/events?after={page['next']}", headers=read).get_json()
    assert [e["message"] for e in rest["items"]] == ["note 1", "note 2", "note 3"]
    assert rest["next"] is None
    assert set(rest["items"][0]) == {"id", "time", "level", "type", "message", "data"}


def test_metrics_of_a_job_after_reports(app, client, tokens):
    job_id = _running_job(app, "sft_tok")
    body = {"total_steps": 40,
            "metrics": [{"step": s, "train_loss": 2 - s / 40, "time": 1.0 + s} for s in range(1, 41)]
            + [{"step": 20, "eval_loss": 1.6}, {"step": 40, "eval_loss": 1.2}]}
    assert client.post(f"/v1/jobs/{job_id}/reports", json=body, headers=auth("sft_tok")).status_code == 202
    m = client.get(f"/v1/jobs/{job_id}/metrics", headers=auth(tokens["jobs:read"])).get_json()
    assert m["eval"] == [{"step": 20, "loss": 1.6}, {"step": 40, "loss": 1.2}]
    assert [p["step"] for p in m["train"]] == list(range(1, 41))
    assert m["progress"]["step"] == 40 and m["progress"]["total_steps"] == 40
    assert m["health"]["verdict"] and m["health"]["train"]["points"] == 40


# -- reports ------------------------------------------------------------------------------------


def test_reports_need_the_jobs_own_token(app, client, tokens):
    job_id = _running_job(app, "sft_mine")
    other_id = _running_job(app, "sft_other")
    url = f"/v1/jobs/{job_id}/reports"
    assert client.post(url, json={}).status_code == 401
    assert client.post(url, json={}, headers=auth("sft_other")).status_code == 401  # another job's token
    assert client.post(url, json={}, headers=auth(tokens["admin"])).status_code == 403  # an API token
    assert client.post(url, json={}, headers=auth("sft_mine")).status_code == 202
    assert client.post(f"/v1/jobs/{other_id}/reports", json={}, headers=auth("sft_mine")).status_code == 401


def test_report_statuses_and_409_after_cancel(app, client, tokens):
    job_id = _running_job(app, "sft_t")
    url, headers = f"/v1/jobs/{job_id}/reports", auth("sft_t")
    r = client.post(url, json={"status": "running", "events": [{"message": "pulled data", "level": "info"}]},
                    headers=headers)
    assert r.status_code == 202 and r.get_json() == {"accepted": {"metrics": 0, "events": 1}}
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(tokens["jobs:write"]))
    r = client.post(url, json={"status": "running"}, headers=headers)
    assert r.status_code == 409 and _error(r)["code"] == "illegal_transition"
    assert _error(r)["details"] == {"status": "cancelling", "requested": "running"}


def test_succeeded_report_sets_artifacts(app, client, tokens):
    job_id = _running_job(app, "sft_t")
    artifacts = {"output": "s3://out/demo/", "manifest": "s3://out/demo/manifest.json", "adapter": "s3://out/demo/adapter/",
                 "merged": None, "report": "s3://out/demo/report.json", "loss_png": "s3://out/demo/loss.png"}
    r = client.post(f"/v1/jobs/{job_id}/reports", json={"status": "succeeded", "artifacts": artifacts},
                    headers=auth("sft_t"))
    assert r.status_code == 202
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(tokens["jobs:read"])).get_json()
    assert job["status"] == "succeeded" and job["artifacts"] == artifacts and job["finished_at"]


def test_nan_losses_are_accepted_in_reports(app, client, tokens):
    job_id = _running_job(app, "sft_t")
    body = '{"metrics": [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": NaN}]}'
    r = client.post(f"/v1/jobs/{job_id}/reports", data=body, content_type="application/json", headers=auth("sft_t"))
    assert r.status_code == 202
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(tokens["jobs:read"])).get_json()
    assert job["progress"]["train_loss"] is None and job["health"]["verdict"] == "diverging"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"status": "exploded"}, "status"), ({"metrics": [{"train_loss": 1.0}]}, "metrics.0.step"),
     ({"metrics": [{"step": -1}]}, "metrics.0.step"), ({"events": [{"level": "loud", "message": "x"}]}, "events.0.level"),
     ({"total_steps": "many"}, "total_steps"), ({"error": {"message": "no code"}}, "error.code"),
     ({"events": [{"message": "x", "time": 1.7e12}]}, "events.0.time"),
     ({"metrics": [{"step": 1, "time": -5}]}, "metrics.0.time")],
)
def test_invalid_reports_are_422(app, client, body, field):
    job_id = _running_job(app, "sft_t")
    r = client.post(f"/v1/jobs/{job_id}/reports", json=body, headers=auth("sft_t"))
    assert r.status_code == 422
    assert field in [d["field"] for d in _error(r)["details"]]


def test_report_wrong_content_type_is_415(app, client):
    job_id = _running_job(app, "sft_t")
    r = client.post(f"/v1/jobs/{job_id}/reports", data="{}", content_type="text/plain", headers=auth("sft_t"))
    assert r.status_code == 415


# -- probes ---------------------------------------------------------------------------------------


def test_healthz_readyz_metrics_need_no_token(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready", "schema_version": 1}
    r = client.get("/metrics")
    assert r.status_code == 200 and r.content_type.startswith("text/plain")
    assert b"sftops_jobs{status=\"queued\"} 0.0" in r.data


def test_readyz_is_503_when_the_store_is_gone(app, client, tokens):
    store = app.extensions["sftops.store"]
    from sqlalchemy import create_engine

    good = store.engine
    store.engine = create_engine("sqlite:////nonexistent-dir/x.db")
    try:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.get_json()["status"] == "unavailable"
        assert client.get("/metrics").status_code == 200  # a scrape never fails
        down = client.get("/v1/jobs/jabc", headers=auth(tokens["jobs:read"]))
        assert down.status_code == 503 and down.headers["Retry-After"] == "5"
        assert _error(down)["code"] == "store_unavailable"
    finally:
        store.engine = good


def test_tokens_never_appear_in_responses_or_events(app, client, tokens, caplog):
    caplog.set_level("DEBUG")
    job_id = _running_job(app, "sft_secret_job_token")
    client.post(f"/v1/jobs/{job_id}/reports", json={"status": "running"}, headers=auth("sft_secret_job_token"))
    client.post(f"/v1/jobs/{job_id}/reports", json={}, headers=auth("sft_wrong_token_value"))
    seen = json.dumps([client.get(f"/v1/jobs/{job_id}", headers=auth(tokens["jobs:read"])).get_json(),
                       client.get(f"/v1/jobs/{job_id}/events", headers=auth(tokens["jobs:read"])).get_json()])
    for secret in ("sft_secret_job_token", "sft_wrong_token_value", sha256_hex("sft_secret_job_token"),
                   *tokens.values()):
        assert secret not in seen
        assert secret not in caplog.text


def test_the_api_on_postgresql(app_config, tokens, postgres_url):
    from service.app import create_app

    app_config["DATABASE_URL"] = postgres_url
    app = create_app(app_config)
    client = app.test_client()
    write, read = auth(tokens["jobs:write"]), auth(tokens["jobs:read"])
    first = _post_job(client, tokens, make_spec("pg", labels={"db": "pg"}), **{"Idempotency-Key": "pg-1"})
    again = _post_job(client, tokens, make_spec("pg", labels={"db": "pg"}), **{"Idempotency-Key": "pg-1"})
    assert (first.status_code, again.status_code) == (201, 200) and first.get_json()["id"] == again.get_json()["id"]
    job_id = _running_job(app, "sft_pg")
    body = {"metrics": [{"step": s, "train_loss": 2 - s / 50} for s in range(1, 30)]}
    assert client.post(f"/v1/jobs/{job_id}/reports", json=body, headers=auth("sft_pg")).status_code == 202
    assert client.get(f"/v1/jobs/{job_id}", headers=read).get_json()["progress"]["step"] == 29
    assert [j["id"] for j in client.get("/v1/jobs?label=db=pg", headers=read).get_json()["items"]] == [first.get_json()["id"]]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=write).get_json()["status"] == "cancelling"
    assert client.get("/readyz").get_json()["status"] == "ready"
    app.extensions["sftops.store"].close()
