"""The sftops CLI against a real gunicorn plane on loopback: exit codes a CI gate keys on, and what users read."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from service import cli
from tests.plugins.plane import ROOT, free_port, make_spec

HEALTHY_TRAIN = [(s, 0.4 + 2.0 * math.exp(-s / 12)) for s in range(1, 101)]
HEALTHY_EVAL = [(s, 0.45 + 2.0 * math.exp(-s / 12)) for s in range(10, 101, 10)]
FLAT_TRAIN = [(s, 2.0 + 0.01 * (s * 7 % 5)) for s in range(1, 41)]  # not_learning
ARTIFACTS = {"output": "s3://out/x/", "manifest": "s3://out/x/manifest.json", "adapter": "s3://out/x/adapter/",
             "merged": "s3://out/x/merged/", "report": "s3://out/x/report.json", "loss_png": "s3://out/x/loss.png"}


def metrics_body(train, evals=()) -> list[dict]:
    """Report metric records for train and eval points."""
    now = time.time()
    ev = dict(evals)
    return [{"step": s, "train_loss": loss, "eval_loss": ev.get(s), "time": now} for s, loss in train]


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """A valid spec on disk."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(make_spec("cli-test")))
    return path


@pytest.fixture
def env(live_plane) -> dict[str, str]:
    """Environment for a CLI subprocess talking to the live plane with a read+write token."""
    return {**os.environ, "SFTOPS_URL": live_plane.url, "SFTOPS_TOKEN": live_plane.tokens["admin"],
            "PYTHONPATH": str(ROOT)}


@pytest.fixture
def use_plane(live_plane, monkeypatch):
    """Point in-process `cli.main` calls at the live plane."""
    monkeypatch.setenv("SFTOPS_URL", live_plane.url)
    monkeypatch.setenv("SFTOPS_TOKEN", live_plane.tokens["admin"])
    return live_plane


def start_wait(spec_file: Path, env: dict, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start `sftops submit --wait` in the background (stdout is a pipe, not a terminal); returns it and its label."""
    label = uuid.uuid4().hex[:10]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "submit", str(spec_file), "--wait", "--interval", "0.2",
         "--label", f"run={label}", *extra],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc, label


def take_over(plane, label: str, timeout: float = 20.0) -> tuple[str, str]:
    """Find the job the CLI submitted and give it a report token the test knows (as a launch would)."""
    from service.store import sha256_hex

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs, _ = plane.store.list_jobs(labels={"run": label}, limit=5)
        if jobs:
            token = "sft_" + uuid.uuid4().hex
            plane.store.set_job_token(jobs[0]["id"], sha256_hex(token))
            return jobs[0]["id"], token
        time.sleep(0.1)
    raise AssertionError(f"no job with label run={label} within {timeout}s")


def finish(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[int, str, str]:
    """Wait for the CLI; returns (exit code, stdout, stderr)."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def post(plane, job_id: str, token: str, body: dict) -> None:
    """Post a report as the job and insist it was accepted."""
    resp = plane.report(job_id, token, body)
    assert resp.status_code == 202, resp.text


def test_wait_succeeded_exits_0_with_plain_lines(live_plane, spec_file, env):
    proc, label = start_wait(spec_file, env)
    job_id, token = take_over(live_plane, label)
    post(live_plane, job_id, token, {"status": "running", "total_steps": 100})
    time.sleep(0.6)
    post(live_plane, job_id, token, {"metrics": metrics_body(HEALTHY_TRAIN[:50], HEALTHY_EVAL[:5])})
    time.sleep(0.6)
    post(live_plane, job_id, token, {"metrics": metrics_body(HEALTHY_TRAIN[50:], HEALTHY_EVAL[5:]),
                                     "events": [{"time": time.time(), "level": "info", "message": "exporting"}]})
    time.sleep(0.8)
    post(live_plane, job_id, token, {"status": "succeeded", "artifacts": ARTIFACTS})
    code, out, err = finish(proc)
    assert code == 0, err
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == job_id
    progress = [line for line in lines if line.startswith("[running] step")]
    assert progress and len(progress) == len(set(progress))  # one line per change, never a repeat
    assert any("step 100/100 100%" in line and "train 0.40" in line for line in progress), out
    assert any(line.endswith("exporting") for line in lines)
    assert f"job {job_id} (cli-test): succeeded" in out
    assert "health: healthy" in out
    assert "s3://out/x/merged/" in out


def test_wait_failed_exits_1_and_shows_the_error(live_plane, spec_file, env):
    proc, label = start_wait(spec_file, env)
    job_id, token = take_over(live_plane, label)
    post(live_plane, job_id, token, {"status": "running"})
    post(live_plane, job_id, token, {"status": "failed", "error": {"code": "training_failed", "message": "CUDA OOM"}})
    code, out, err = finish(proc)
    assert code == 1
    assert "error (training_failed): CUDA OOM" in out
    assert f"error: job {job_id} failed" in err
    assert "Traceback" not in err


def test_wait_cancelled_exits_1(live_plane, spec_file, env, use_plane, capsys):
    proc, label = start_wait(spec_file, env)
    job_id, _ = take_over(live_plane, label)
    assert cli.main(["cancel", job_id]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id}: cancelled"
    code, out, err = finish(proc)
    assert code == 1
    assert f"job {job_id} cancelled" in err


@pytest.mark.parametrize("fail_on_unhealthy, expected", [(True, 3), (False, 0)])
def test_unhealthy_success_exits_3_only_when_asked(live_plane, spec_file, env, fail_on_unhealthy, expected):
    from job.health import UNHEALTHY_VERDICTS, analyze

    verdict = analyze(FLAT_TRAIN, [])["verdict"]
    assert verdict in UNHEALTHY_VERDICTS
    proc, label = start_wait(spec_file, env, *(["--fail-on-unhealthy"] if fail_on_unhealthy else []))
    job_id, token = take_over(live_plane, label)
    post(live_plane, job_id, token, {"status": "running", "metrics": metrics_body(FLAT_TRAIN)})
    post(live_plane, job_id, token, {"status": "succeeded", "artifacts": ARTIFACTS})
    code, out, err = finish(proc)
    assert code == expected, err
    assert f"health: {verdict}" in out
    assert ("--fail-on-unhealthy" in err) == fail_on_unhealthy


def test_timeout_exits_4_and_can_cancel(live_plane, spec_file, env):
    # the plane's reconciler is off, so the job stays queued
    started = time.monotonic()
    proc, label = start_wait(spec_file, env, "--timeout", "1s", "--cancel-on-timeout")
    code, out, err = finish(proc)
    assert code == 4
    assert time.monotonic() - started < 15
    job_id = out.splitlines()[0]
    assert f"timed out after 1s waiting for job {job_id}; cancelled it" in err
    assert "[queued] waiting to start" in out
    assert live_plane.store.get_job(job_id)["status"] == "cancelled"


def test_invalid_spec_names_file_line_and_field_and_sends_nothing(tmp_path, use_plane, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: ok-name\nbase_model: s3://m/x/\ndataset: s3://d/t.jsonl\noutput: s3://o/p/\n"
                    "training:\n  epochs: 1\n  learning_rat: 0.1\n  batch_size: 0\n")
    assert cli.main(["submit", str(path), "--wait"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: invalid spec" in err
    assert f"{path}:7: training.learning_rat: unknown field" in err
    assert f"{path}:8: training.batch_size: Input should be greater than or equal to 1" in err
    assert use_plane.store.list_jobs(limit=5)[0] == []


def test_yaml_syntax_error_and_missing_file_exit_2(tmp_path, use_plane, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nlabels: {a: [\n")
    assert cli.main(["submit", str(path)]) == 2
    assert re.search(rf"{re.escape(str(path))}:\d+: not valid YAML or JSON", capsys.readouterr().err)
    assert cli.main(["submit", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: spec file not found" in capsys.readouterr().err


def test_missing_required_field_points_at_the_mapping(tmp_path):
    text = "name: x\nbase_model: s3://m/x/\noutput: s3://o/p/\n"
    lines = cli.with_lines(f"s.yaml: dataset: field required", "s.yaml", text)
    assert lines == ["s.yaml:1: dataset: field required"]


def test_api_errors_are_messages_not_tracebacks(live_plane, spec_file, monkeypatch, capsys):
    monkeypatch.setenv("SFTOPS_URL", live_plane.url)
    monkeypatch.setenv("SFTOPS_TOKEN", live_plane.tokens["jobs:read"])
    assert cli.main(["submit", str(spec_file)]) == 2  # read-only token: 403
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "jobs:write" in err
    assert cli.main(["status", "nosuchjob"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nosuchjob" in err
    assert cli.main(["--token", "sft_wrong", "list"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_server_side_validation_details_are_listed(live_plane, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SFTOPS_URL", live_plane.url)
    monkeypatch.setenv("SFTOPS_TOKEN", live_plane.tokens["admin"])
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(make_spec("ok")))
    # a label key the spec rejects, added on the command line: caught locally, exit 2, nothing posted
    assert cli.main(["submit", str(spec), "--label", "bad key=1"]) == 2
    assert "labels" in capsys.readouterr().err
    client = cli.Client(live_plane.url, live_plane.tokens["admin"])
    with pytest.raises(cli.APIError) as info:
        client.submit({**make_spec("ok"), "training": {"batch_size": 0}})
    assert info.value.status in (400, 422) and info.value.exit_code == 2
    assert any("training.batch_size" in line for line in info.value.details)


def test_connection_refused_names_the_url(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert cli.main(["--url", url, "list"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: cannot connect to the sftops API at {url} (is the server running? set SFTOPS_URL or --url)"
    assert time.monotonic() - started < 10


def test_idempotency_key_returns_the_same_job(use_plane, spec_file, capsys):
    assert cli.main(["submit", str(spec_file), "--idempotency-key", "build-42"]) == 0
    first = capsys.readouterr().out.strip()
    assert cli.main(["submit", str(spec_file), "--idempotency-key", "build-42"]) == 0
    assert capsys.readouterr().out.strip() == first
    assert len(use_plane.store.list_jobs(limit=5)[0]) == 1


def test_status_list_events_metrics_artifacts(use_plane, capsys):
    job_id, token = use_plane.create_job(make_spec("shown", labels={"team": "a"}), status="running")
    other, _ = use_plane.create_job(make_spec("other"), status="queued")
    post(use_plane, job_id, token, {"total_steps": 100, "metrics": metrics_body(HEALTHY_TRAIN, HEALTHY_EVAL),
                                    "events": [{"time": time.time(), "level": "warning", "message": "slow disk"}]})
    post(use_plane, job_id, token, {"status": "succeeded", "artifacts": ARTIFACTS})

    assert cli.main(["status", job_id]) == 0
    out = capsys.readouterr().out
    assert f"job {job_id} (shown): succeeded" in out and "health: healthy" in out
    assert re.search(r"\[pass\] 1\. ", out) and "labels: team=a" in out

    assert cli.main(["status", job_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id

    assert cli.main(["list", "--label", "team=a"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["ID", "NAME", "STATUS", "STEP", "VERDICT", "CREATED"]
    assert len(rows) == 2 and rows[1].split()[:5] == [job_id, "shown", "succeeded", "100/100", "healthy"]
    assert cli.main(["list", "--status", "queued", "--json"]) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == [other]

    assert cli.main(["events", job_id]) == 0
    out = capsys.readouterr().out
    assert "warning slow disk" in out and "succeeded" in out

    assert cli.main(["metrics", job_id, "--width", "40", "--height", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    plot = [line for line in out if "|" in line and re.match(r"\s*\d+\.\d{3} \|", line)]
    assert len(plot) == 8 and all(len(line) == len(plot[0]) for line in plot)
    assert "t" in plot[0] and "t" in plot[-1] and any("e" in line for line in plot)
    assert cli.main(["metrics", job_id, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["train"]) == 100 and data["health"]["verdict"] == "healthy"

    assert cli.main(["artifacts", job_id]) == 0
    assert "merged    s3://out/x/merged/" in capsys.readouterr().out
    assert cli.main(["artifacts", other]) == 0
    assert "no artifacts yet (status queued)" in capsys.readouterr().out


def test_events_follow_stops_when_the_job_ends(live_plane, env):
    job_id, token = live_plane.create_job(make_spec("follow"), status="running")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "events", job_id, "--follow", "--interval", "0.2"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    post(live_plane, job_id, token, {"events": [{"time": time.time(), "level": "info", "message": "epoch 1 done"}]})
    post(live_plane, job_id, token, {"status": "failed", "error": {"code": "internal", "message": "boom"}})
    code, out, err = finish(proc)
    assert code == 0, err
    assert "epoch 1 done" in out and "running -> failed" in out


def test_token_create_entry_hashes_the_token_and_the_plane_accepts_it(plane_factory, tmp_path, capsys):
    assert cli.main(["token", "create", "ci-main", "--scopes", "jobs:read,jobs:write"]) == 0
    out = capsys.readouterr().out
    token = re.search(r"^token: (\S+)$", out, re.M).group(1)
    assert re.fullmatch(r"sft_[A-Za-z0-9_-]{43}", token)
    entries = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith(("#", "token:"))))
    assert entries == [{"name": "ci-main", "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "scopes": ["jobs:read", "jobs:write"]}]
    tokens_file = tmp_path / "ci-tokens.yaml"
    tokens_file.write_text(yaml.safe_dump(entries))
    plane = plane_factory(TOKENS_FILE=str(tokens_file))
    assert cli.main(["--url", plane.url, "--token", token, "list"]) == 0
    assert capsys.readouterr().out.strip() == "no jobs"
    assert cli.main(["--url", plane.url, "--token", token + "x", "list"]) == 2


def test_token_create_rejects_unknown_scopes(capsys):
    assert cli.main(["token", "create", "x", "--scopes", "jobs:read,root"]) == 2
    assert "unknown scope(s) ['root']" in capsys.readouterr().err


def test_cli_scopes_match_the_plane():
    from service.auth import SCOPES

    assert cli.SCOPES == SCOPES  # the CLI keeps its own copy so it runs without flask


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("45", 45),
                                           ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "5m10", "m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="invalid duration"):
        cli.parse_duration(text)


def test_bad_timeout_is_a_usage_error(spec_file, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["submit", str(spec_file), "--wait", "--timeout", "soon"])
    assert info.value.code == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_display_redraws_in_place_on_a_terminal_and_prints_lines_otherwise():
    tty, plain = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (plain, False)):
        d = cli.Display(stream, tty=is_tty)
        d.progress("step 1")
        d.progress("step 1")
        d.message("event")
        d.progress("step 2")
        d.finish()
    assert plain.getvalue() == "step 1\nevent\nstep 2\n"
    assert tty.getvalue() == "\r\x1b[Kstep 1\r\x1b[Kevent\nstep 1\r\x1b[Kstep 2\n"


def test_progress_line_shows_steps_losses_slopes_verdict_eta():
    job = {"status": "running",
           "progress": {"step": 30, "total_steps": 120, "train_loss": 0.61234, "eval_loss": 0.7, "eta_seconds": 192},
           "health": {"verdict": "still_improving", "train": {"slope_per_100": -0.2}, "eval": {"slope_per_100": -0.1}}}
    assert cli.progress_line(job) == ("[running] step 30/120 25% | train 0.612 (-0.200/100) | eval 0.700 (-0.100/100)"
                                      " | still_improving | ETA 3m12s")
    assert cli.progress_line({"status": "queued"}) == "[queued] waiting to start"


def test_serve_runs_the_plane_under_gunicorn(tmp_path):
    import signal

    import requests

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFTOPS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"SFTOPS_DATA_DIR": str(tmp_path), "SFTOPS_AUTH": "disabled", "SFTOPS_BIND": f"127.0.0.1:{port}",
                "SFTOPS_WORKERS": "1", "SFTOPS_RECONCILE_INTERVAL": "0"})
    entry = Path(sys.executable).with_name("sftops")  # the console script pyproject.toml installs
    proc = subprocess.Popen([str(entry), "serve"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise AssertionError("sftops serve did not become ready in 30s")
        assert cli.main(["--url", f"http://127.0.0.1:{port}", "list"]) == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert "gunicorn" in proc.stderr.read().decode().lower()


def test_progress_line_falls_back_to_the_specs_max_steps():
    job = {"status": "running", "progress": {"step": 3, "total_steps": None},
           "spec": {"training": {"max_steps": 12}}}
    assert cli.progress_line(job) == "[running] step 3/12 25%"


def test_cli_runs_without_the_plane_or_trainer_dependencies(spec_file):
    # CI runners install only the base package: the CLI must not pull in flask, sqlalchemy or torch
    code = ("import sys; from service import cli; cli.load_spec_file(sys.argv[1]); import job.health; "
            "print(sorted(m for m in ('flask', 'sqlalchemy', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(spec_file)], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the CI snippets in examples/ci

CI = ROOT / "examples" / "ci"


def ci_scripts() -> dict[str, tuple[str, str]]:
    """snippet -> (the curl job's bash script, the CLI job's sftops command line), CI variables filled in."""
    gh = yaml.safe_load((CI / "github-actions.yml").read_text())
    gl = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    gh_curl = gh["jobs"]["with-curl"]["steps"][-1]["run"]
    gh_cli = gh["jobs"]["with-cli"]["steps"][-1]["run"]
    gl_curl = gl["fine-tune-curl"]["script"][0]
    gl_cli = gl["fine-tune-cli"]["script"][-1]
    fill = {"${{ github.sha }}": "abc123", "${{ github.run_attempt }}": "1", "${CI_COMMIT_SHA}": "abc123",
            "${CI_PIPELINE_ID}": "7"}
    out = {}
    for name, (curl, cli_line) in {"github": (gh_curl, gh_cli), "gitlab": (gl_curl, gl_cli)}.items():
        for k, v in fill.items():
            curl, cli_line = curl.replace(k, v), cli_line.replace(k, v)
        out[name] = (curl, cli_line)
    return out


@pytest.mark.parametrize("snippet", ["github", "gitlab"])
def test_ci_snippets_cli_lines_parse_and_gate_on_every_unhealthy_verdict(snippet):
    import shlex

    from job.health import UNHEALTHY_VERDICTS

    curl, cli_line = ci_scripts()[snippet]
    argv = shlex.split(cli_line)
    assert argv[:2] == ["sftops", "submit"]
    args = cli.build_parser().parse_args(argv[1:])
    assert args.wait and args.fail_on_unhealthy and args.timeout == 7200 and args.idempotency_key
    gate = re.search(r'case "\$verdict" in ([a-z_|]+)\)', curl).group(1)
    assert set(gate.split("|")) == set(UNHEALTHY_VERDICTS)


@pytest.mark.parametrize("snippet, outcome, expected", [("github", "healthy", 0), ("github", "unhealthy", 3),
                                                         ("gitlab", "failed", 1)])
def test_ci_curl_snippets_submit_poll_and_gate(live_plane, tmp_path, snippet, outcome, expected):
    curl, _ = ci_scripts()[snippet]
    spec = tmp_path / "spec.json"
    label = uuid.uuid4().hex[:10]
    spec.write_text(json.dumps(make_spec("ci-curl", labels={"run": label})))
    # the runner's yq turns the YAML spec into JSON; here the spec is JSON already. Poll fast for the test.
    script = re.sub(r"yq -o=json examples/full\.yaml", f"cat {spec}", curl).replace("sleep 15", "sleep 0.3")
    env = {**os.environ, "SFTOPS_URL": live_plane.url, "SFTOPS_TOKEN": live_plane.tokens["admin"]}
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id, token = take_over(live_plane, label)
    if outcome == "failed":
        post(live_plane, job_id, token, {"status": "running"})
        post(live_plane, job_id, token, {"status": "failed", "error": {"code": "internal", "message": "boom"}})
    else:
        train, evals = (HEALTHY_TRAIN, HEALTHY_EVAL) if outcome == "healthy" else (FLAT_TRAIN, [])
        post(live_plane, job_id, token, {"status": "running", "metrics": metrics_body(train, evals)})
        post(live_plane, job_id, token, {"status": "succeeded", "artifacts": ARTIFACTS})
    code, out, err = finish(proc)
    assert code == expected, out + err
    assert f"job {job_id}" in out


def test_wait_rides_out_a_plane_restart(live_plane, spec_file, env):
    proc, label = start_wait(spec_file, env)
    job_id, token = take_over(live_plane, label)
    post(live_plane, job_id, token, {"status": "running"})
    live_plane.stop()
    time.sleep(1.0)  # a few polls fail meanwhile
    live_plane.start()
    post(live_plane, job_id, token, {"status": "succeeded", "artifacts": ARTIFACTS})
    code, out, err = finish(proc)
    assert code == 0, out + err
    assert f"warning: cannot connect to the sftops API at {live_plane.url}" in out
    assert f"job {job_id} (cli-test): succeeded" in out
