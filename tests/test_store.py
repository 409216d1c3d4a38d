"""The store on SQLite and on a real PostgreSQL: lifecycle, idempotency, reports, leases, migrations."""

from __future__ import annotations

import math
import threading
import time

import pytest

from job.spec import parse_spec
from service.store import (
    HEALTH_HEAD,
    HEALTH_WINDOW,
    IdempotencyConflict,
    IllegalTransition,
    NotFound,
    Store,
    sha256_hex,
)
from tests.plugins.plane import make_spec


def _spec(name: str = "demo", **overrides) -> dict:
    """A resolved spec as the API stores it."""
    return parse_spec(make_spec(name, **overrides)).model_dump(mode="json")


def _statuses(store: Store, job_id: str) -> list[str]:
    """The status each status event moved the job to, in order."""
    items, _ = store.list_events(job_id, limit=1000)
    return [e["data"]["to"] for e in items if e["type"] == "status"]


def test_create_and_get(store):
    job, created = store.create_job(_spec(labels={"team": "nlp"}), submitter="ci")
    assert created
    got = store.get_job(job["id"])
    assert got == job
    assert got["status"] == "queued" and got["submitter"] == "ci" and got["labels"] == {"team": "nlp"}
    assert got["spec"]["lora"]["r"] == 8
    assert got["created_at"].endswith("Z") and got["started_at"] is None
    assert got["progress"]["step"] is None and got["health"] is None
    assert "token_sha256" not in got and "handle" not in got
    assert store.get_job("jdoesnotexist") is None


def test_list_newest_first_with_filters_and_cursor(store):
    ids = [store.create_job(_spec(f"n{i}", labels={"i": str(i % 2)}), submitter="ci")[0]["id"] for i in range(5)]
    items, cursor = store.list_jobs(limit=2)
    assert [j["id"] for j in items] == [ids[4], ids[3]]
    items2, cursor2 = store.list_jobs(limit=2, after=cursor)
    assert [j["id"] for j in items2] == [ids[2], ids[1]]
    items3, cursor3 = store.list_jobs(limit=2, after=cursor2)
    assert [j["id"] for j in items3] == [ids[0]] and cursor3 is None
    odd, _ = store.list_jobs(labels={"i": "1"})
    assert [j["id"] for j in odd] == [ids[3], ids[1]]
    store.cancel(ids[0])
    cancelled, _ = store.list_jobs(status=["cancelled"])
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert store.list_jobs(status=["running"])[0] == []


def test_idempotency_same_body_same_job_other_body_conflicts(store):
    spec = _spec()
    first, created = store.create_job(spec, submitter="ci", idempotency_key="k1", body_sha256="aa")
    again, created2 = store.create_job(spec, submitter="ci", idempotency_key="k1", body_sha256="aa")
    assert created and not created2 and again["id"] == first["id"]
    with pytest.raises(IdempotencyConflict) as err:
        store.create_job(spec, submitter="ci", idempotency_key="k1", body_sha256="bb")
    assert err.value.job_id == first["id"]
    # keys are per submitter
    other, created3 = store.create_job(spec, submitter="other", idempotency_key="k1", body_sha256="aa")
    assert created3 and other["id"] != first["id"]


def test_concurrent_identical_creates_make_one_job(store):
    results, errors = [], []
    barrier = threading.Barrier(6)

    def create():
        """One create, released with the others."""
        barrier.wait()
        try:
            results.append(store.create_job(_spec(), submitter="ci", idempotency_key="race", body_sha256="x"))
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len({job["id"] for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list_jobs()[0]) == 1


def test_cancel_queued_is_immediate_and_idempotent(store):
    job, _ = store.create_job(_spec(), submitter="ci")
    assert store.cancel(job["id"])["status"] == "cancelled"
    again = store.cancel(job["id"])
    assert again["status"] == "cancelled" and again["finished_at"] is not None
    assert _statuses(store, job["id"]) == ["queued", "cancelled"]


def test_cancel_running_goes_through_cancelling(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    assert store.cancel(job["id"])["status"] == "cancelling"
    assert store.cancel(job["id"])["status"] == "cancelling"
    assert store.finish_if(job["id"], {"cancelling"}, "cancelled", message="stopped")
    assert _statuses(store, job["id"]) == ["running", "cancelling", "cancelled"]
    with pytest.raises(NotFound):
        store.cancel("jnope")


@pytest.mark.parametrize(
    ("start", "to"),
    [("queued", "succeeded"), ("succeeded", "running"), ("failed", "cancelled"), ("cancelled", "running"),
     ("queued", "cancelling")],
)
def test_illegal_transitions_are_refused(store, start, to):
    job, _ = store.create_job(_spec(), submitter="ci", status=start)
    with pytest.raises(IllegalTransition):
        store.transition(job["id"], to)
    assert store.get_job(job["id"])["status"] == start


def test_report_stores_points_progress_and_health(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    metrics = [{"step": s, "train_loss": 2.0 * 0.97**s, "learning_rate": 1e-4, "grad_norm": 1.5,
                "tokens_per_second": 900.0, "epoch": s / 100, "time": time.time()} for s in range(1, 61)]
    metrics += [{"step": s, "eval_loss": 2.1 * 0.97**s} for s in (20, 40, 60)]
    accepted = store.add_report(job["id"], {"status": "running", "total_steps": 100, "metrics": metrics,
                                            "events": [{"level": "info", "message": "training", "data": {}}]})
    assert accepted == {"metrics": 63, "events": 1}
    got = store.get_job(job["id"])
    assert got["progress"]["step"] == 60 and got["progress"]["total_steps"] == 100
    assert got["progress"]["train_loss"] == pytest.approx(2.0 * 0.97**60)
    assert got["progress"]["eval_loss"] == pytest.approx(2.1 * 0.97**60)
    assert got["progress"]["grad_norm"] == 1.5 and got["progress"]["tokens_per_second"] == 900.0
    assert got["health"]["verdict"] in __import__("job.health").health.VERDICTS
    assert got["health"]["train"]["points"] == 60 and got["health"]["eval"]["points"] == 3
    curves = store.loss_points(job["id"])
    assert [p["step"] for p in curves["eval"]] == [20, 40, 60]
    assert len(curves["train"]) == 60


def test_total_steps_alone_sets_progress(store):
    """The job announces its total when training starts, before any metric point."""
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    assert store.add_report(job["id"], {"total_steps": 80}) == {"metrics": 0, "events": 0}
    got = store.get_job(job["id"])
    assert got["progress"]["total_steps"] == 80 and got["progress"]["step"] is None


def test_retried_report_does_not_duplicate_points(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    body = {"metrics": [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.9}]}
    store.add_report(job["id"], body)
    store.add_report(job["id"], body)
    assert [p["loss"] for p in store.loss_points(job["id"])["train"]] == [1.0, 0.9]


def test_nonfinite_train_loss_is_flagged_and_kept(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    store.add_report(job["id"], {"metrics": [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": math.nan}]})
    row = store.get_row(job["id"])
    assert row["train_nonfinite"] is True or row["train_nonfinite"] == 1
    assert store.get_job(job["id"])["progress"]["train_loss"] is None
    assert store.loss_points(job["id"])["train"] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": None}]
    store.add_report(job["id"], {"metrics": [{"step": 3, "train_loss": 0.8}]})
    assert not store.get_row(job["id"])["train_nonfinite"]


def test_health_sees_a_bounded_sample_of_a_long_run(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    n = 10 * HEALTH_WINDOW
    losses = [3.0 - s * 0.0002 for s in range(n)]
    for start in range(0, n, 2000):  # reports of 2,000 steps, as a long run sends them
        store.add_report(job["id"], {"metrics": [{"step": s, "train_loss": losses[s]} for s in range(start, start + 2000)]})
    health = store.get_job(job["id"])["health"]
    assert HEALTH_WINDOW <= health["train"]["points"] <= HEALTH_WINDOW + HEALTH_HEAD + 2
    assert health["train"]["first"] == pytest.approx(3.0, abs=0.01)  # the start level comes from the first points
    assert health["train"]["last"] == pytest.approx(losses[-3], abs=1e-3)
    assert health["train"]["slope_per_100"] == pytest.approx(-0.02, rel=1e-3)
    assert len(store.loss_points(job["id"])["train"]) == n


def test_a_nonfinite_point_inside_the_tail_is_never_thinned_away(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    metrics = [{"step": s, "train_loss": 2.0 - s * 0.0001} for s in range(3 * HEALTH_WINDOW)]
    metrics[-7]["train_loss"] = math.inf
    store.add_report(job["id"], {"metrics": metrics})
    assert store.get_job(job["id"])["health"]["verdict"] == "diverging"


def test_reports_move_status_and_refuse_after_the_end(store):
    job, _ = store.create_job(_spec(), submitter="ci")
    store.add_report(job["id"], {"status": "succeeded", "artifacts": {"output": "s3://out/demo/"}})
    got = store.get_job(job["id"])
    assert got["status"] == "succeeded" and got["artifacts"] == {"output": "s3://out/demo/"}
    assert _statuses(store, job["id"]) == ["queued", "running", "succeeded"]
    # the same final report again (a retry) is accepted without a change
    store.add_report(job["id"], {"status": "succeeded"})
    with pytest.raises(IllegalTransition):
        store.add_report(job["id"], {"status": "running", "metrics": [{"step": 5, "train_loss": 1.0}]})
    assert store.loss_points(job["id"])["train"] == []


def test_failed_report_keeps_the_error(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    error = {"code": "non_finite_loss", "message": "train loss became NaN at step 7"}
    store.add_report(job["id"], {"status": "failed", "error": error})
    got = store.get_job(job["id"])
    assert got["status"] == "failed" and got["error"] == error
    events, _ = store.list_events(job["id"])
    assert events[-1]["level"] == "error" and events[-1]["data"]["error"] == error


def test_cancelled_job_refuses_running_reports(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    store.cancel(job["id"])
    with pytest.raises(IllegalTransition):
        store.add_report(job["id"], {"status": "running"})
    store.add_report(job["id"], {"metrics": [{"step": 1, "train_loss": 1.0}]})  # metrics while stopping are kept
    assert store.finish_if(job["id"], {"cancelling"}, "cancelled", message="stopped")
    with pytest.raises(IllegalTransition):
        store.add_report(job["id"], {"metrics": [{"step": 2, "train_loss": 1.0}]})


def test_launch_claim_is_exclusive_and_marks_running(store):
    job, _ = store.create_job(_spec(), submitter="ci")
    assert store.queued_job_ids(5) == [job["id"]]
    assert store.claim_for_launch(job["id"], "a", 60)
    assert not store.claim_for_launch(job["id"], "b", 60)
    assert store.queued_job_ids(5) == []
    assert store.count_active() == 1
    store.set_job_token(job["id"], sha256_hex("tok"))
    assert store.job_token_sha256(job["id"]) == sha256_hex("tok")
    assert store.mark_launched(job["id"], "h1") == "running"
    assert store.active_jobs() == [{"id": job["id"], "status": "running", "handle": "h1", "run_events": None,
                                    "run_gone_at": None}]


def test_leader_lock_has_one_holder_until_it_expires(store):
    assert store.try_lock("reconciler", "a", 60)
    assert store.try_lock("reconciler", "a", 60)  # renew
    assert not store.try_lock("reconciler", "b", 60)
    store.release_lock("reconciler", "a")
    assert store.try_lock("reconciler", "b", 0.01)
    time.sleep(0.05)
    assert store.try_lock("reconciler", "a", 60)


def test_run_events_are_recorded_once(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    assert store.record_run_events(job["id"], [("warning", "Unschedulable: 0/3 nodes")]) == 1
    assert store.record_run_events(job["id"], [("warning", "Unschedulable: 0/3 nodes"), ("error", "OOMKilled")]) == 1
    messages = [e["message"] for e in store.list_events(job["id"])[0] if e["type"] == "message"]
    assert messages == ["Unschedulable: 0/3 nodes", "OOMKilled"]


def test_metric_rows_drop_finished_jobs_after_retention(store):
    running, _ = store.create_job(_spec("a"), submitter="ci", status="running")
    done, _ = store.create_job(_spec("b"), submitter="ci", status="running")
    store.add_report(done["id"], {"status": "succeeded"})
    assert {r["id"] for r in store.metric_rows(3600)} == {running["id"], done["id"]}
    time.sleep(0.05)
    assert {r["id"] for r in store.metric_rows(0.01)} == {running["id"]}
    assert store.status_counts() == {"running": 1, "succeeded": 1}


def test_migrations_are_safe_when_several_processes_start_at_once(store):
    url = store.engine.url.render_as_string(hide_password=False)
    stores, errors = [], []
    barrier = threading.Barrier(4)

    def start():
        """One process start, released with the others."""
        barrier.wait()
        try:
            stores.append(Store(url))
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert [s.schema_version() for s in stores] == [1, 1, 1, 1]
    for s in stores:
        s.close()


def test_events_paginate_with_a_cursor(store):
    job, _ = store.create_job(_spec(), submitter="ci", status="running")
    for i in range(5):
        store.add_event(job["id"], "info", f"m{i}")
    first, cursor = store.list_events(job["id"], limit=3)
    rest, end = store.list_events(job["id"], after=cursor, limit=10)
    assert [e["message"] for e in first + rest][1:] == [f"m{i}" for i in range(5)]
    assert end is None


def test_reads_survive_connections_the_server_dropped(store):
    job, _ = store.create_job(_spec(), submitter="ci")
    store.get_job(job["id"])  # leaves idle connections in the pool
    if store.dialect == "postgresql":  # what a server restart does to every idle pooled connection
        import psycopg

        url = store.engine.url
        with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database,
                             autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        assert killed >= 1
    assert [store.get_job(job["id"])["id"] for _ in range(3)] == [job["id"]] * 3
