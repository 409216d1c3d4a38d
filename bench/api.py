"""Load on the plane over loopback: requests/s and p50/p99 per endpoint with 1,000 jobs stored, SQLite and PostgreSQL.

Runs gunicorn as deployed (service/gunicorn.conf.py, 2 workers) and `wrk` for a bounded time per endpoint
(rounds interleaved, medians shown), then times /metrics scrapes one by one. POST rows add jobs as they go. GET /healthz (no database) is the baseline each row is compared with.
Prints a table; asserts nothing. Usage: python bench/api.py [--seconds 5] [--rounds 3] [--jobs 1000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.spec import parse_spec  # noqa: E402
from service.store import Store, _sqlite_url, sha256_hex  # noqa: E402
from tests.plugins.plane import free_port, make_spec, make_tokens, write_tokens  # noqa: E402


def seed(url: str, n: int) -> list[str]:
    """n jobs, a third running with 50 loss points each (so /metrics has per-job series); returns their ids."""
    store = Store(url)
    ids = []
    for i in range(n):
        spec = parse_spec(make_spec(f"bench-{i}", labels={"team": f"t{i % 7}"})).model_dump(mode="json")
        status = "running" if i % 3 == 0 else "queued"
        job, _ = store.create_job(spec, submitter="bench", status=status, token_sha256=sha256_hex(f"tok{i}"))
        if status == "running":
            store.add_report(job["id"], {"total_steps": 500, "metrics": [
                {"step": s, "train_loss": 2.0 / (1 + s / 10), "grad_norm": 1.0, "tokens_per_second": 1e3}
                for s in range(1, 51)] + [{"step": 50, "eval_loss": 0.9}]})
        ids.append(job["id"])
    store.close()
    return ids


@contextmanager
def postgres_url():
    """A throwaway PostgreSQL server (pytest-postgresql's executor; run as `postgres` when we are root)."""
    from pytest_postgresql.executors import PostgreSQLExecutor

    from tests.plugins.postgres import pg_ctl_executable

    executable = pg_ctl_executable()
    if executable is None:
        raise SystemExit("PostgreSQL is not installed (no pg_ctl): run `make system-deps`")
    tmp = Path(tempfile.mkdtemp(prefix="sftops-bench-pg-"))
    port = free_port()
    executor = PostgreSQLExecutor(
        executable=executable, host="127.0.0.1", port=port, datadir=str(tmp / "data"),
        unixsocketdir=tempfile.gettempdir(), logfile=str(tmp / "pg.log"), startparams="-w", dbname="sftops",
    )
    executor.start()
    try:
        import psycopg

        deadline = time.monotonic() + 30
        while True:  # the port opens before the server accepts sessions ("the database system is starting up")
            try:
                conn = psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with conn:
            conn.execute("CREATE DATABASE sftops")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/sftops"
    finally:
        executor.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def gunicorn(data_dir: Path, database_url: str | None, tokens: dict[str, str], worker_class: str = "gthread"):
    """The plane under gunicorn with the repository's config; yields its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFTOPS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"SFTOPS_DATA_DIR": str(data_dir), "SFTOPS_BIND": f"127.0.0.1:{port}", "SFTOPS_WORKERS": "2",
                "SFTOPS_TOKENS_FILE": str(write_tokens(data_dir / "tokens.json", tokens)),
                "SFTOPS_RECONCILE_INTERVAL": "0", "SFTOPS_WORKER_CLASS": worker_class, "PYTHONPATH": str(ROOT)})
    if database_url:
        env["SFTOPS_DATABASE_URL"] = database_url
    log = (data_dir / "gunicorn.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "service/gunicorn.conf.py"),
                             "service.app:create_app()"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"gunicorn did not start; see {data_dir / 'gunicorn.log'}")
            time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


LUA_GET = """
ids = {%s}
headers = {["Authorization"] = "Bearer %s"}
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/jobs/" .. ids[(counter %% #ids) + 1], headers)
end
"""

LUA_POST = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def run_wrk(url: str, path: str, seconds: float, connections: int, script: str | None = None) -> dict:
    """One bounded wrk run; returns requests/s, p50 and p99 in ms, and the non-2xx count."""
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "--timeout", "10s"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script or "")
    if script:
        cmd += ["-s", f.name]
    run = subprocess.run(cmd + [url + path], capture_output=True, text=True, timeout=seconds + 60)
    out = run.stdout
    if "Requests/sec" not in out:
        raise SystemExit(f"wrk failed on {path}: {run.stdout}{run.stderr}")
    os.unlink(f.name)

    def latency(pct: str) -> float:
        """A latency percentile in ms from wrk's distribution."""
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency("50"),
            "p99": latency("99"), "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def scrape_times(url: str, n: int = 30) -> dict:
    """Sequential /metrics scrapes: median and max seconds, and the body size."""
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        size = len(requests.get(f"{url}/metrics", timeout=30).content)
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000, "bytes": size}


def bench_backend(name: str, database_url: str | None, args) -> tuple[list[dict], dict]:
    """Seed, serve and load one backend."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"sftops-bench-{name}-"))
    try:
        url_db = database_url or _sqlite_url(data_dir)
        ids = seed(url_db, args.jobs)
        tokens = make_tokens()
        with gunicorn(data_dir, database_url, tokens, args.worker_class) as url:
            read_auth = f'wrk.headers["Authorization"] = "Bearer {tokens["jobs:read"]}"'
            reads = [
                ("GET /healthz (baseline)", "/healthz", None, 16),
                (f"GET /v1/jobs/{{id}} ({args.jobs} ids)", "/",
                 LUA_GET % (", ".join(f'"{i}"' for i in ids), tokens["jobs:read"]), 16),
                ("GET /v1/jobs?limit=50", "/v1/jobs?limit=50", read_auth, 8),
                ("GET /metrics", "/metrics", None, 4),
            ]
            # Reads first, with exactly args.jobs jobs stored; POST adds jobs, so it runs after them.
            scrape = scrape_times(url)
            rows = _rounds(name, url, reads, args)
            post = LUA_POST % (json.dumps(make_spec("bench-post")), tokens["jobs:write"])
            rows += _rounds(name, url, [("POST /v1/jobs", "/v1/jobs", post, 8)], args)
        return rows, scrape
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _rounds(backend: str, url: str, plan: list[tuple], args) -> list[dict]:
    """Run each (label, path, lua, connections) args.rounds times, interleaved; one row of medians each."""
    results: dict[str, list[dict]] = {label: [] for label, *_ in plan}
    for _ in range(args.rounds):  # interleaved, so a burst of outside load hits every endpoint alike
        for label, path, script, conns in plan:
            results[label].append(run_wrk(url, path, args.seconds, conns, script))
    rows = []
    for label, _, _, conns in plan:
        runs = results[label]
        rows.append({"backend": backend, "endpoint": label, "connections": conns,
                     **{k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99", "errors")},
                     "socket_errors": "; ".join(r["socket_errors"] for r in runs if r["socket_errors"])})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per endpoint")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs stored before the load")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--rounds", type=int, default=3, help="runs per endpoint; the table shows medians")
    parser.add_argument("--worker-class", default="gthread", choices=["gthread", "sync"],
                        help="gunicorn worker class (service/gunicorn.conf.py defaults to gthread)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    all_rows, scrapes = [], {}
    load_before = os.getloadavg()[0]  # other work on the machine shifts every number: say how busy it was
    for backend in args.backends.split(","):
        if backend == "sqlite":
            rows, scrapes[backend] = bench_backend("sqlite", None, args)
        else:
            with postgres_url() as url:
                rows, scrapes[backend] = bench_backend("postgresql", url, args)
        all_rows += rows

    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"\nplane under gunicorn (2 {args.worker_class} workers), {os.cpu_count()} CPUs, load average {load}, wrk -t2, median of {args.rounds} x {args.seconds}s per row, "
          f"{args.jobs} jobs stored")
    print(f"{'backend':<11} {'endpoint':<28} {'conns':>5} {'req/s':>9} {'vs base':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for row in all_rows:
        base = next(r["rps"] for r in all_rows if r["backend"] == row["backend"] and "baseline" in r["endpoint"])
        print(f"{row['backend']:<11} {row['endpoint']:<28} {row['connections']:>5} {row['rps']:>9.0f} "
              f"{row['rps'] / base:>8.2f} {row['p50']:>8.2f} {row['p99']:>8.2f} {row['errors']:>8}"
              + (f"  socket errors: {row['socket_errors']}" if row["socket_errors"] else ""))
    print(f"\n/metrics scrape, one at a time, {args.jobs} jobs stored:")
    for backend, s in scrapes.items():
        print(f"  {backend:<11} median {s['median_ms']:.1f} ms, max {s['max_ms']:.1f} ms, {s['bytes'] / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
