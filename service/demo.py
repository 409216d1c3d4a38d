"""`make demo`: from a fresh clone to a fine-tuned model, every part real and on this machine.

Starts an S3-compatible server on loopback (moto; a real endpoint is used when S3_ENDPOINT_URL is set),
starts the control plane under gunicorn (SQLite in a temp dir, auth disabled, local launcher), uploads
SmolLM2-135M-Instruct and the support-ticket dataset to S3, submits examples/demo.yaml with the CLI
(`sftops submit --wait`), then prints what the job produced and copies report.md and loss.png to ./demo-output/.
Everything it started is stopped at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "demo.yaml"
DATASET = ROOT / "examples" / "data" / "support_tickets.jsonl"
MODEL_NAME = "SmolLM2-135M-Instruct"
# moto accepts any credentials; a real endpoint (S3_ENDPOINT_URL) uses the caller's own AWS_* variables
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


def say(text: str = "") -> None:
    """Print a demo narration line."""
    print(text, flush=True)


def heading(text: str) -> None:
    """Print a section heading."""
    say()
    say(f"== {text}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir() -> Path:
    """Where `make model` puts the base model."""
    cache = Path(os.environ.get("SFTOPS_MODEL_CACHE") or ROOT / ".cache")
    return cache / "models" / MODEL_NAME


@contextlib.contextmanager
def s3_endpoint() -> Iterator[str]:
    """The S3 endpoint to use: S3_ENDPOINT_URL as given, or a moto server on loopback for the demo's lifetime."""
    given = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if given:
        say(f"using the S3 endpoint {given} (S3_ENDPOINT_URL)")
        yield given
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 request drowns the demo
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(MOTO_CREDENTIALS)
    say(f"S3-compatible server (moto) on http://127.0.0.1:{port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def plane(data_dir: Path, port: int, timeout: float = 60.0) -> Iterator[str]:
    """The control plane under gunicorn (SQLite, auth off, local launcher); yields its URL and stops it after."""
    env = dict(os.environ)
    env.update({
        "SFTOPS_DATA_DIR": str(data_dir),
        "SFTOPS_AUTH": "disabled",
        "SFTOPS_LAUNCHER": "local",
        "SFTOPS_BIND": f"127.0.0.1:{port}",
        "SFTOPS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "SFTOPS_WORKERS": "1",
        "SFTOPS_RECONCILE_INTERVAL": "1",
        "HF_HUB_OFFLINE": "1",  # the job gets everything from S3; never reach for the hub
        "PYTHONPATH": str(ROOT),
    })
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "gunicorn.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "service" / "gunicorn.conf.py"), "service.app:create_app()"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_ready(url, proc, log_path, timeout)
            say(f"control plane (gunicorn, SQLite in {data_dir}) on {url}; log: {log_path}")
            yield url
        finally:
            stop_process_group(proc)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Wait until /readyz answers 200; raises DemoError with the log's tail if gunicorn dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the control plane exited with code {proc.returncode}:\n{tail(log_path)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise DemoError(f"the control plane did not become ready within {timeout:.0f}s:\n{tail(log_path)}")


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM a process group started with start_new_session, SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file (empty when missing)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def ensure_bucket(endpoint: str, bucket: str) -> None:
    """Create the bucket unless it exists."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def bucket_of(uri: str) -> str:
    """The bucket of an s3:// URI."""
    return uri.removeprefix("s3://").split("/", 1)[0]


def upload_inputs(spec: dict[str, Any]) -> None:
    """Upload the base model directory and the dataset to where the spec expects them."""
    from job import storage

    mdir = model_dir()
    if not (mdir / "config.json").exists():
        raise DemoError(f"the base model is missing at {mdir}: run `make model` (make demo does it first)")
    if not DATASET.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_dataset.py")], check=True)
    started = time.monotonic()
    uris = storage.upload_prefix(mdir, spec["base_model"])
    size = sum(p.stat().st_size for p in mdir.iterdir() if p.is_file())
    say(f"uploaded {MODEL_NAME} ({len(uris)} files, {size / 1e6:.0f} MB) to {spec['base_model']}")
    storage.upload(DATASET, spec["dataset"])
    rows = sum(1 for _ in DATASET.open(encoding="utf-8"))
    say(f"uploaded the dataset ({rows} rows, examples/make_dataset.py) to {spec['dataset']} "
        f"in {time.monotonic() - started:.0f}s")


def submit(url: str, spec_path: Path, run_label: str) -> int:
    """Run `sftops submit SPEC --wait` as a user would; returns its exit code."""
    argv = ["sftops", "submit", str(spec_path.relative_to(ROOT) if spec_path.is_relative_to(ROOT) else spec_path),
            "--wait", "--label", f"demo-run={run_label}"]
    say("$ SFTOPS_URL=" + url + " " + " ".join(argv))
    env = {**os.environ, "SFTOPS_URL": url}
    return subprocess.call([sys.executable, "-m", "service.cli", *argv[1:]], cwd=ROOT, env=env)


def find_job(url: str, run_label: str) -> dict[str, Any] | None:
    """The job this demo run submitted (found by its label)."""
    resp = requests.get(f"{url}/v1/jobs", params={"label": f"demo-run={run_label}"}, timeout=10)
    resp.raise_for_status()
    items = resp.json().get("items") or []
    return items[0] if items else None


def human_size(size: int) -> str:
    """`532.1 MB`, `12.3 kB` or `512 B`."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def summarize(url: str, job: dict[str, Any], out_dir: Path) -> None:
    """Print splits, loss summary and health checks, verification scores and the artifacts; copy the report locally."""
    from job import storage

    artifacts = job.get("artifacts") or {}
    report = json.loads(storage.read_text(artifacts["report"])) if artifacts.get("report") else {}
    data = report.get("data") or {}
    splits = data.get("splits") or {}
    heading("data")
    say(f"{data.get('rows_valid')} valid rows of {data.get('rows_read')} read ({data.get('format')}); "
        f"split train {splits.get('train')} / test {splits.get('test')} / verification {splits.get('verification')}")

    from service.cli import ascii_plot, fmt_loss, health_lines

    heading("loss and health")
    curves = requests.get(f"{url}/v1/jobs/{job['id']}/metrics", timeout=10).json()
    for line in ascii_plot({"train": [(p["step"], p["loss"]) for p in curves.get("train") or []],
                            "eval": [(p["step"], p["loss"]) for p in curves.get("eval") or []]}, height=10):
        say(line)
    health = job.get("health") or report.get("health") or {}
    train = report.get("train") or {}
    if train:
        runtime = train.get("runtime_s")
        say(f"{train.get('steps')} steps on {train.get('device')} ({train.get('dtype')})"
            + (f" in {runtime:.0f}s" if isinstance(runtime, (int, float)) else "")
            + (f", {train['tokens_per_second']:.0f} tokens/s" if train.get("tokens_per_second") else ""))
    for key in ("train", "eval"):
        s = health.get(key) or {}
        slope = s.get("slope_per_100")
        say(f"{key:<5} loss: last {fmt_loss(s.get('last'))}, min {fmt_loss(s.get('min'))}, slope "
            f"{f'{slope:+.3f}' if isinstance(slope, (int, float)) else '-'} per 100 steps")
    for line in health_lines(health):
        if not line.startswith(("  train", "  eval")):
            say(line)

    heading("verification (greedy generation on the verification split)")
    ver = report.get("verification") or {}
    if ver.get("base") and ver.get("tuned"):
        say(f"{'':<6} {'exact match':>12} {'token F1':>9}")
        for which in ("base", "tuned"):
            s = ver[which]
            say(f"{which:<6} {fmt_loss(s.get('exact_match')):>12} {fmt_loss(s.get('token_f1')):>9}")
    else:
        say("no verification scores (verify.enabled is false?)")

    heading("artifacts")
    output = artifacts.get("output") or job["spec"]["output"]
    objects = storage.list_objects(output)
    by_top: dict[str, list[Any]] = {}
    for obj in objects:
        by_top.setdefault(obj.key.split("/", 1)[0], []).append(obj)
    for top, objs in sorted(by_top.items()):
        size = sum(o.size for o in objs)
        say(f"  {storage.join(output, top)}{'/' if len(objs) > 1 or '/' in objs[0].key else ''}"
            f"  ({len(objs)} file{'s' if len(objs) != 1 else ''}, {human_size(size)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    from job.errors import StorageError

    for name in ("report.md", "loss.png", "report.json"):
        try:
            storage.download(storage.join(output, name), out_dir / name)
        except StorageError as e:
            say(f"warning: could not copy {name}: {e}")
    copied = sorted(p.name for p in out_dir.iterdir())
    say(f"copied {', '.join(copied)} to {out_dir}/ (open loss.png for the curves)")
    say(f"S3 endpoint: {os.environ.get('AWS_ENDPOINT_URL_S3')} (the embedded one stops with the demo; "
        "set S3_ENDPOINT_URL to keep the artifacts in your own store)")


def interrupt(signum: int, frame: Any) -> None:
    """Turn SIGTERM into KeyboardInterrupt."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the CLI's exit code (0 when the job succeeded)."""
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC, help="spec to submit (default examples/demo.yaml)")
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"), help="where report.md and loss.png go")
    parser.add_argument("--keep", action="store_true", help="keep the plane and S3 running until Ctrl-C")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. a CI runner stopping us) unwinds like Ctrl-C so everything below is stopped
    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    try:
        return run(args, started)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    finally:
        say(f"\ndemo finished in {time.monotonic() - started:.0f}s")


def run(args: argparse.Namespace, started: float) -> int:
    """The demo's steps, with everything started inside an ExitStack so it is stopped in reverse order."""
    spec = yaml.safe_load(args.spec.read_text(encoding="utf-8"))
    with contextlib.ExitStack() as stack:
        heading("starting S3 and the control plane")
        endpoint = stack.enter_context(s3_endpoint())
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        data_dir = Path(tempfile.mkdtemp(prefix="sftops-demo-"))
        stack.callback(shutil.rmtree, data_dir, True)
        for uri in {spec["base_model"], spec["dataset"], spec["output"]}:
            ensure_bucket(endpoint, bucket_of(uri))
        url = stack.enter_context(plane(data_dir, free_port()))

        heading("uploading the base model and the dataset")
        upload_inputs(spec)

        heading("submitting the job (the CLI follows it; Ctrl-C stops the demo and the job)")
        run_label = uuid.uuid4().hex[:12]
        stack.callback(stop_job, url, run_label, data_dir)
        code = submit(url, args.spec, run_label)
        job = find_job(url, run_label)
        if job is None:
            raise DemoError(f"the CLI exited with {code} and no job was created")
        if job["status"] != "succeeded":
            log = data_dir / "jobs" / job["id"] / "job.log"
            raise DemoError(f"job {job['id']} {job['status']}: {(job.get('error') or {}).get('message')}\n"
                            f"last lines of its log ({log}):\n{tail(log)}")
        summarize(url, job, args.output_dir.resolve())
        if not args.keep:
            say(f"\nto explore the job afterwards with `sftops status|metrics|events|artifacts {job['id']}`, "
                "run `.venv/bin/python -m service.demo --keep`")
            return code
        say(f"\n--keep: the plane and S3 stay up until Ctrl-C; try: SFTOPS_URL={url} .venv/bin/sftops metrics {job['id']}")
        while True:
            time.sleep(3600)


def stop_job(url: str, run_label: str, data_dir: Path, timeout: float = 60.0) -> None:
    """On the way out, cancel the demo's job if it still runs (Ctrl-C) and wait until its process has exited.

    A job reports success a moment before its process ends (flushing, cleaning up), and the local launcher runs it
    outside gunicorn's process group, so stopping the plane alone could leave it behind.
    """
    from service.launchers.local_runner import EXIT_CODE_FILE

    try:
        job = find_job(url, run_label)
        if job is None:
            return
        if job["status"] not in ("succeeded", "failed", "cancelled"):
            requests.post(f"{url}/v1/jobs/{job['id']}/cancel", timeout=10)
    except requests.RequestException as e:
        say(f"warning: could not cancel the demo job: {e}")
        return
    run_dir = data_dir / "jobs" / job["id"]
    deadline = time.monotonic() + timeout
    while run_dir.exists() and not (run_dir / EXIT_CODE_FILE).exists():
        if time.monotonic() > deadline:
            say(f"warning: job {job['id']} has not exited after {timeout:.0f}s; see {run_dir}")
            return
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
