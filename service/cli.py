"""`sftops`: submit fine-tuning jobs to the control plane and follow them from a terminal or a CI log.

Exit codes of `sftops submit --wait` (what a CI gate keys on):
0 succeeded, 1 failed or cancelled (or the API could not be reached), 2 invalid spec or request,
3 succeeded but the loss curve is unhealthy (with --fail-on-unhealthy), 4 timed out waiting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import requests
import yaml

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNHEALTHY, EXIT_TIMEOUT = 0, 1, 2, 3, 4
TERMINAL = ("succeeded", "failed", "cancelled")
SCOPES = ("jobs:read", "jobs:write", "admin")
DEFAULT_URL = "http://127.0.0.1:8000"
# consecutive failed polls tolerated while waiting: a plane restart must not fail a CI pipeline
MAX_POLL_FAILURES = 10


# ---------------------------------------------------------------- errors and the HTTP client


class CLIError(Exception):
    """An error shown as `error: <message>` plus detail lines, ending the command with `exit_code`."""

    def __init__(self, message: str, *, details: list[str] | None = None, exit_code: int = EXIT_FAILED):
        """Keep the detail lines and the exit code beside the message."""
        super().__init__(message)
        self.details = details or []
        self.exit_code = exit_code


class APIError(CLIError):
    """The API answered with an error document `{"error": {"code", "message", "details"}}`."""

    def __init__(self, status: int, code: str, message: str, details: Any = None):
        """4xx means the request must change (exit 2), anything else is a failure (exit 1)."""
        super().__init__(message, details=detail_lines(details),
                         exit_code=EXIT_INVALID if 400 <= status < 500 else EXIT_FAILED)
        self.status = status
        self.code = code


class Unreachable(CLIError):
    """The API could not be reached at all."""


def detail_lines(details: Any) -> list[str]:
    """Render an API error's `details` (a list of {field, message}, a mapping or text) as lines."""
    if details is None or details == [] or details == {}:
        return []
    if isinstance(details, list):
        lines = []
        for item in details:
            if isinstance(item, dict) and "message" in item:
                where = item.get("field") or item.get("loc") or item.get("line")
                lines.append(f"{where}: {item['message']}" if where else str(item["message"]))
            else:
                lines.append(str(item))
        return lines
    if isinstance(details, dict):
        return [f"{k}: {v}" for k, v in details.items()]
    return [str(details)]


class Client:
    """A thin requests wrapper over the /v1 API that turns every failure into a CLIError."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        """Remember the base URL and token; nothing is sent yet."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "sftops-cli"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, *, body: Any = None, params: Any = None,
                headers: dict[str, str] | None = None) -> Any:
        """Send one request and return the decoded JSON; raises APIError or Unreachable."""
        url = self.url + path
        try:
            resp = self.session.request(method, url, json=body, params=params, headers=headers, timeout=self.timeout)
        except requests.ConnectionError:
            raise Unreachable(f"cannot connect to the sftops API at {self.url} "
                              "(is the server running? set SFTOPS_URL or --url)") from None
        except requests.Timeout:
            raise Unreachable(f"the sftops API at {self.url} did not answer within {self.timeout:g}s") from None
        except requests.RequestException as e:
            raise Unreachable(f"request to {url} failed: {e}") from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                raise APIError(resp.status_code, str(err.get("code", "error")),
                               str(err.get("message", resp.reason)), err.get("details"))
            snippet = " ".join(resp.text.split())[:200]
            raise APIError(resp.status_code, "http_error", f"{method} {url} answered HTTP {resp.status_code}: {snippet}")
        if data is None:
            raise CLIError(f"{method} {url} answered HTTP {resp.status_code} without JSON (is {self.url} an sftops API?)")
        return data

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        """POST /v1/jobs."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.request("POST", "/v1/jobs", body=spec, headers=headers)

    def job(self, job_id: str) -> dict:
        """GET /v1/jobs/{id}."""
        return self.request("GET", f"/v1/jobs/{job_id}")

    def jobs(self, params: dict) -> dict:
        """GET /v1/jobs (one page)."""
        return self.request("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict:
        """POST /v1/jobs/{id}/cancel."""
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, after: str | None = None) -> dict:
        """GET /v1/jobs/{id}/events (one page after a cursor)."""
        return self.request("GET", f"/v1/jobs/{job_id}/events", params={"after": after} if after else None)

    def metrics(self, job_id: str) -> dict:
        """GET /v1/jobs/{id}/metrics."""
        return self.request("GET", f"/v1/jobs/{job_id}/metrics")


# ---------------------------------------------------------------- input parsing


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `30m`, `2h`, `1h30m` or a bare number of seconds; raises ValueError."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or re.sub(r"\d+(?:\.\d+)?\s*[hms]", "", text).strip():
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 30m, 2h or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)


def format_duration(seconds: float | None) -> str:
    """`1h02m`, `3m12s` or `45s`."""
    if seconds is None:
        return "?"
    s = int(round(max(seconds, 0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def yaml_line(text: str, path: list[str]) -> int | None:
    """1-based line of the deepest node along a field path in YAML text (a missing key gives its parent's line)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in path:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if str(key.value) == part:
                    # an unknown or bad key is best pointed at by the key itself
                    child, line = value, key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            child = node.value[int(part)]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def load_spec_file(path: str) -> dict:
    """Read and validate a spec locally; returns the mapping to post. Raises CLIError (exit 2) naming file, line, field."""
    from job.errors import InputError
    from job.spec import parse_spec_text

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CLIError(f"{path}: spec file not found", exit_code=EXIT_INVALID) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"{path}: cannot read spec: {e}", exit_code=EXIT_INVALID) from None
    try:
        parse_spec_text(text, path)
    except InputError as e:
        raise CLIError(f"{path}: invalid spec", details=with_lines(str(e), path, text),
                       exit_code=EXIT_INVALID) from None
    return yaml.safe_load(text)


def with_lines(message: str, source: str, text: str) -> list[str]:
    """Turn `source: field.path: message` lines into `source:LINE: field.path: message`."""
    out = []
    for line in message.splitlines():
        rest = line.removeprefix(f"{source}: ")
        field, sep, msg = rest.partition(": ")
        if line == rest or not sep or " " in field:
            out.append(line)  # already has a line number (a YAML syntax error) or is not per-field
            continue
        where = yaml_line(text, [] if field == "(root)" else field.split("."))
        out.append(f"{source}:{where}: {field}: {msg}" if where else line)
    return out


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """`key=value` strings as a dict; raises CLIError (exit 2) on a malformed one."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--label {pair!r}: use key=value", exit_code=EXIT_INVALID)
        labels[key] = value
    return labels


# ---------------------------------------------------------------- rendering


def fmt_loss(value: Any) -> str:
    """A loss with 3 decimals, or `-`."""
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def fmt_slope(value: Any) -> str:
    """A slope per 100 steps with its sign, or nothing."""
    return f" ({value:+.3f}/100)" if isinstance(value, (int, float)) else ""


def total_steps(job: dict) -> int | None:
    """The job's total steps: as reported, else (until the job reports it) the spec's max_steps."""
    reported = (job.get("progress") or {}).get("total_steps")
    return reported or (((job.get("spec") or {}).get("training")) or {}).get("max_steps")


def progress_line(job: dict) -> str:
    """One line of where a job is: status, step/total, losses and slopes, verdict, ETA."""
    status = job.get("status", "?")
    progress = job.get("progress") or {}
    health = job.get("health") or {}
    parts = [f"[{status}]"]
    step, total = progress.get("step"), total_steps(job)
    if step is not None:
        pct = f" {100 * step / total:.0f}%" if total else ""
        parts.append(f"step {step}/{total if total else '?'}{pct}")
    elif status == "queued":
        parts.append("waiting to start")
    elif status == "running":
        parts.append("starting")
    train = progress.get("train_loss")
    if train is None:
        train = (health.get("train") or {}).get("last")
    evl = progress.get("eval_loss")
    if evl is None:
        evl = (health.get("eval") or {}).get("last")
    if train is not None:
        parts.append(f"train {fmt_loss(train)}{fmt_slope((health.get('train') or {}).get('slope_per_100'))}")
    if evl is not None:
        parts.append(f"eval {fmt_loss(evl)}{fmt_slope((health.get('eval') or {}).get('slope_per_100'))}")
    if health.get("verdict"):
        parts.append(health["verdict"])
    if status == "running" and progress.get("eta_seconds") is not None:
        parts.append(f"ETA {format_duration(progress['eta_seconds'])}")
    return parts[0] + (" " + " | ".join(parts[1:]) if len(parts) > 1 else "")


def health_lines(health: dict | None) -> list[str]:
    """The verdict, its reasons and the five checks, one per line."""
    if not health:
        return ["health: no loss points yet"]
    lines = [f"health: {health.get('verdict', '?')}"]
    lines += [f"  - {r}" for r in health.get("reasons") or []]
    for check in health.get("checks") or []:
        mark = {"pass": "pass", "fail": "FAIL"}.get(check.get("status"), "n/a ")
        lines.append(f"  [{mark}] {check.get('id')}. {check.get('name')}: {check.get('detail', '')}")
    for key in ("train", "eval"):
        s = health.get(key) or {}
        if s.get("last") is not None:
            slope = s.get("slope_per_100")
            lines.append(f"  {key:<5} last {fmt_loss(s.get('last'))}  min {fmt_loss(s.get('min'))}  slope "
                         f"{f'{slope:+.3f}' if isinstance(slope, (int, float)) else '-'} per 100 steps"
                         f"  points {s.get('points')}")
    if health.get("gap") is not None:
        lines.append(f"  gap (eval - train) {health['gap']:+.3f}")
    return lines


def job_lines(job: dict) -> list[str]:
    """A job's summary for `status` and the end of `submit --wait`."""
    lines = [f"job {job['id']} ({job.get('name')}): {job.get('status')}"]
    for key in ("submitter", "created_at", "started_at", "finished_at"):
        if job.get(key):
            lines.append(f"  {key.replace('_', ' ')}: {job[key]}")
    if job.get("labels"):
        lines.append("  labels: " + ", ".join(f"{k}={v}" for k, v in sorted(job["labels"].items())))
    lines.append("  " + progress_line(job))
    if job.get("error"):
        lines.append(f"  error ({job['error'].get('code')}): {job['error'].get('message')}")
    lines += health_lines(job.get("health"))
    lines += artifact_lines(job)
    return lines


def artifact_lines(job: dict) -> list[str]:
    """The artifact URIs, one per line."""
    artifacts = job.get("artifacts") or {}
    if not artifacts:
        return []
    width = max(len(k) for k in artifacts)
    return ["artifacts:"] + [f"  {k:<{width}}  {v}" for k, v in artifacts.items() if v]


def event_line(event: dict) -> str:
    """`time level message` for one event."""
    when = str(event.get("time", ""))
    when = when[11:19] if len(when) >= 19 and when[10] == "T" else when
    return f"{when} {event.get('level', 'info'):<7} {event.get('message', '')}"


def ascii_plot(series: dict[str, list[tuple[float, float]]], width: int = 60, height: int = 12) -> list[str]:
    """Plot (x, y) series on a character grid; each series is drawn with the first letter of its name."""
    points = [(x, y) for pts in series.values() for x, y in pts if y is not None]
    if not points:
        return ["(no loss points yet)"]
    xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
    ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
    xspan, yspan = (xmax - xmin) or 1, (ymax - ymin) or 1
    grid = [[" "] * width for _ in range(height)]
    for name, pts in series.items():
        for x, y in pts:
            if y is None:
                continue
            col = round((x - xmin) / xspan * (width - 1))
            row = height - 1 - round((y - ymin) / yspan * (height - 1))
            grid[row][col] = name[0]
    lines = []
    for i, row in enumerate(grid):
        label = ymax - i * yspan / (height - 1) if height > 1 else ymax
        lines.append(f"{label:8.3f} |" + "".join(row))
    lines.append(" " * 9 + "+" + "-" * width)
    left, right = f"step {xmin:g}", f"{xmax:g}"
    lines.append(" " * 10 + left + " " * max(1, width - len(left) - len(right)) + right)
    lines.append(" " * 10 + "   ".join(f"{name[0]} = {name}" for name in series))
    return lines


# ---------------------------------------------------------------- following a job


class Display:
    """Writes the live progress line: redrawn in place on a terminal, one line per change otherwise (CI logs)."""

    def __init__(self, stream=None, tty: bool | None = None):
        """Decide once whether the stream is a terminal."""
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.current = ""
        self.last_printed = None

    def progress(self, line: str) -> None:
        """Show the progress line if it changed."""
        if line == self.last_printed:
            return
        self.last_printed = line
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            self.current = line[: cols - 1]
            self.stream.write("\r\x1b[K" + self.current)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, line: str) -> None:
        """Print a line above the progress line."""
        if self.tty and self.current:
            self.stream.write("\r\x1b[K" + line + "\n" + self.current)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Leave the cursor on a fresh line."""
        if self.tty and self.current:
            self.stream.write("\n")
            self.stream.flush()
        self.current = ""


class EventCursor:
    """Reads a job's events page by page, remembering where it stopped."""

    def __init__(self, client: Client, job_id: str):
        """Start before the first event."""
        self.client, self.job_id, self.after = client, job_id, None

    def new_events(self, max_pages: int = 20) -> list[dict]:
        """Events since the last call (bounded, so a huge backlog cannot stall the progress line)."""
        out = []
        for _ in range(max_pages):
            page = self.client.events(self.job_id, self.after)
            items = page.get("items") or []
            out += items
            if page.get("next"):
                self.after = str(page["next"])
            elif items:
                self.after = str(items[-1]["id"])
            if not page.get("next") or not items:
                break
        return out


def follow(client: Client, job_id: str, *, timeout: float | None, interval: float, display: Display,
           show_events: bool = True) -> dict | None:
    """Poll a job until it ends; returns the final job, or None when `timeout` passes first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    cursor = EventCursor(client, job_id)
    failures = 0
    while True:
        try:
            job = client.job(job_id)
            if show_events:
                for event in cursor.new_events():
                    if event.get("type") != "metrics":
                        display.message(event_line(event))
            failures = 0
        except (Unreachable, APIError) as e:
            # 4xx other than a passing hiccup means the job or token is wrong: stop at once
            if isinstance(e, APIError) and e.status < 500 and e.status != 429:
                raise
            failures += 1
            if failures > MAX_POLL_FAILURES:
                raise
            display.message(f"warning: {e} (retrying, {failures}/{MAX_POLL_FAILURES})")
            job = None
        if job is not None:
            display.progress(progress_line(job))
            if job.get("status") in TERMINAL:
                display.finish()
                return job
        if deadline is not None and time.monotonic() >= deadline:
            display.finish()
            return None
        pause = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
        time.sleep(pause)


def outcome(job: dict, fail_on_unhealthy: bool) -> int:
    """The exit code a finished job earns."""
    if job.get("status") != "succeeded":
        return EXIT_FAILED
    if fail_on_unhealthy:
        from job.health import UNHEALTHY_VERDICTS

        verdict = (job.get("health") or {}).get("verdict")
        if verdict in UNHEALTHY_VERDICTS:
            return EXIT_UNHEALTHY
    return EXIT_OK


# ---------------------------------------------------------------- commands


def out(*lines: str) -> None:
    """Print lines to stdout."""
    for line in lines:
        print(line)


def cmd_submit(args, client: Client) -> int:
    """Validate a spec locally, submit it, and with --wait follow it to the end."""
    spec = load_spec_file(args.spec)
    if args.label:
        spec["labels"] = {**(spec.get("labels") or {}), **parse_labels(args.label)}
        from job.errors import InputError
        from job.spec import parse_spec

        try:
            parse_spec(spec, args.spec)
        except InputError as e:
            raise CLIError(f"{args.spec}: invalid --label", details=str(e).splitlines(), exit_code=EXIT_INVALID) from None
    job = client.submit(spec, args.idempotency_key)
    print(job["id"], flush=True)
    if not args.wait:
        return EXIT_OK
    display = Display()
    display.message(f"following job {job['id']} ({job.get('name')}) at {client.url}")
    try:
        final = follow(client, job["id"], timeout=args.timeout, interval=args.interval, display=display)
    except KeyboardInterrupt:
        display.finish()
        print(f"stopped following; job {job['id']} keeps running (sftops cancel {job['id']} stops it)", file=sys.stderr)
        return 130
    if final is None:
        note = "it keeps running"
        if args.cancel_on_timeout:
            client.cancel(job["id"])
            note = "cancelled it"
        raise CLIError(f"timed out after {format_duration(args.timeout)} waiting for job {job['id']}; {note}"
                       + ("" if args.cancel_on_timeout else f" (sftops cancel {job['id']} stops it)"),
                       exit_code=EXIT_TIMEOUT)
    out(*job_lines(final))
    code = outcome(final, args.fail_on_unhealthy)
    if code == EXIT_UNHEALTHY:
        print(f"error: job {final['id']} succeeded but its loss curve is {final['health']['verdict']} "
              "(--fail-on-unhealthy)", file=sys.stderr)
    elif code == EXIT_FAILED:
        print(f"error: job {final['id']} {final['status']}", file=sys.stderr)
    return code


def cmd_status(args, client: Client) -> int:
    """Show one job."""
    job = client.job(args.id)
    if args.json:
        out(json.dumps(job, indent=2))
    else:
        out(*job_lines(job))
    return EXIT_OK


def cmd_list(args, client: Client) -> int:
    """List jobs newest first, following pages up to --limit."""
    params: dict[str, Any] = {"limit": min(args.limit, 100)}
    if args.status:
        params["status"] = args.status
    if args.label:
        parse_labels(args.label)
        params["label"] = args.label
    items: list[dict] = []
    while len(items) < args.limit:
        page = client.jobs(params)
        items += page.get("items") or []
        if not page.get("next"):
            break
        params["after"] = page["next"]
    items = items[: args.limit]
    if args.json:
        out(json.dumps(items, indent=2))
        return EXIT_OK
    if not items:
        out("no jobs")
        return EXIT_OK
    rows = [("ID", "NAME", "STATUS", "STEP", "VERDICT", "CREATED")]
    for j in items:
        p = j.get("progress") or {}
        step = f"{p.get('step')}/{total_steps(j) or '?'}" if p.get("step") is not None else "-"
        rows.append((j["id"], j.get("name", ""), j.get("status", ""), step,
                     (j.get("health") or {}).get("verdict") or "-", j.get("created_at") or ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out(*("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return EXIT_OK


def cmd_cancel(args, client: Client) -> int:
    """Cancel a job (idempotent)."""
    job = client.cancel(args.id)
    out(f"job {job['id']}: {job['status']}")
    return EXIT_OK


def cmd_events(args, client: Client) -> int:
    """Print a job's events; with --follow keep printing until the job ends."""
    cursor = EventCursor(client, args.id)
    while True:
        for event in cursor.new_events(max_pages=1000):
            out(json.dumps(event) if args.json else event_line(event))
        if not args.follow or client.job(args.id).get("status") in TERMINAL:
            # one last read: events written between the two calls above
            if args.follow:
                for event in cursor.new_events(max_pages=1000):
                    out(json.dumps(event) if args.json else event_line(event))
            return EXIT_OK
        time.sleep(args.interval)


def cmd_metrics(args, client: Client) -> int:
    """Show the loss curves as a terminal chart with the health summary, or the numbers as JSON."""
    data = client.metrics(args.id)
    if args.json:
        out(json.dumps(data, indent=2))
        return EXIT_OK
    series = {
        "train": [(p["step"], p["loss"]) for p in data.get("train") or []],
        "eval": [(p["step"], p["loss"]) for p in data.get("eval") or []],
    }
    out(f"job {args.id}: loss by step", *ascii_plot(series, width=args.width, height=args.height))
    out(*health_lines(data.get("health")))
    return EXIT_OK


def cmd_artifacts(args, client: Client) -> int:
    """List a job's artifact URIs."""
    job = client.job(args.id)
    artifacts = job.get("artifacts") or {}
    if args.json:
        out(json.dumps(artifacts, indent=2))
    elif not artifacts:
        out(f"job {job['id']} has no artifacts yet (status {job.get('status')})")
    else:
        out(*artifact_lines(job))
    return EXIT_OK


def new_token() -> str:
    """A fresh API token: `sft_` + 43 url-safe characters."""
    return "sft_" + secrets.token_urlsafe(32)


def token_entry(name: str, token: str, scopes: list[str]) -> dict:
    """The tokens-file entry for a token: its name, the hex sha256 of the token, its scopes."""
    return {"name": name, "token_sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": scopes}


def cmd_token_create(args, client: Client | None = None) -> int:
    """Print a new token (shown once) and the entry to add to SFTOPS_TOKENS_FILE."""
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise CLIError(f"--scopes: unknown scope(s) {unknown}" if unknown else "--scopes: give at least one scope",
                       details=[f"known scopes: {', '.join(SCOPES)}"], exit_code=EXIT_INVALID)
    token = new_token()
    out(f"# token for {args.name} (shown once: store it as a secret, e.g. SFTOPS_TOKEN in CI)",
        f"token: {token}",
        "# add this entry to the tokens file (SFTOPS_TOKENS_FILE); it holds only the hash",
        yaml.safe_dump([token_entry(args.name, token, scopes)], sort_keys=False).rstrip())
    return EXIT_OK


def cmd_serve(args, client: Client | None = None) -> int:
    """Replace this process with gunicorn serving the control plane (configured by service/gunicorn.conf.py)."""
    conf = Path(__file__).with_name("gunicorn.conf.py")
    argv = [sys.executable, "-m", "gunicorn", "-c", str(conf), *args.gunicorn_args, "service.app:create_app()"]
    os.execv(sys.executable, argv)
    return EXIT_FAILED  # not reached: execv does not return


def cmd_spec_reference(args, client: Client | None = None) -> int:
    """Print the spec reference (markdown) generated from the JobSpec model."""
    out(spec_reference())
    return EXIT_OK


# ---------------------------------------------------------------- the spec reference


def type_name(annotation: Any) -> str:
    """A readable name for a field's type: `int`, `str | null`, `"a" \\| "b"`, `list[str]`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def spec_reference() -> str:
    """The JobSpec reference as markdown tables, one per section, generated from the pydantic model."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from job.spec import JobSpec

    def section(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
        """Table rows of one model and the nested sections it has."""
        rows, nested = [], []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((prefix + name, ann))
                continue
            if f.is_required():
                default = "**required**"
            else:
                value = f.default_factory() if f.default_factory is not None else f.default
                default = "`" + json.dumps(value) + "`"
            cell = lambda s: s.replace("|", "\\|")  # noqa: E731 - table cells only
            rows.append(f"| `{prefix}{name}` | {cell(type_name(ann))} | {cell(default)} | {cell(f.description or '')} |")
        return rows, nested

    head = "| field | type | default | description |\n|---|---|---|---|"
    rows, nested = section(JobSpec, "")
    parts = [f"#### Top level\n\n{(JobSpec.__doc__ or '').strip()}\n\n{head}\n" + "\n".join(rows)]
    for prefix, model in nested:
        sub, _ = section(model, prefix + ".")
        parts.append(f"#### `{prefix}`\n\n{(model.__doc__ or '').strip()}\n\n{head}\n" + "\n".join(sub))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- argument parsing and main


def duration_arg(text: str) -> float:
    """argparse type for durations."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"API base URL (env SFTOPS_URL, default {DEFAULT_URL})")
    common.add_argument("--token", default=argparse.SUPPRESS, help="API token (env SFTOPS_TOKEN)")
    parser = argparse.ArgumentParser(prog="sftops", description="Submit LoRA fine-tuning jobs and follow them.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", parents=[common], help="submit a job spec (YAML or JSON); prints the job id")
    p.add_argument("spec", help="path of the spec file")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends; the exit code tells how")
    p.add_argument("--timeout", type=duration_arg, default=None, help="with --wait: give up after e.g. 30m (exit 4)")
    p.add_argument("--cancel-on-timeout", action="store_true", help="with --timeout: cancel the job when giving up")
    p.add_argument("--fail-on-unhealthy", action="store_true",
                   help="with --wait: exit 3 when the job succeeds but its loss curve is unhealthy")
    p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="add a label (repeatable)")
    p.add_argument("--interval", type=duration_arg, default=2.0, help="seconds between polls (default 2)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", parents=[common], help="show a job")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print the job object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument("--status", choices=("queued", "running", "cancelling", "succeeded", "failed", "cancelled"))
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="filter by label (repeatable)")
    p.add_argument("--limit", type=int, default=20, help="at most this many jobs (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("events", parents=[common], help="print a job's events")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument("--interval", type=duration_arg, default=2.0, help="seconds between polls with --follow")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("metrics", parents=[common], help="loss chart and health checks of a job")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print the numbers")
    p.add_argument("--width", type=int, default=60)
    p.add_argument("--height", type=int, default=12)
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("artifacts", parents=[common], help="list a job's artifacts")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_artifacts)

    p = sub.add_parser("token", help="manage API tokens")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", help="print a new token and its tokens-file entry")
    t.add_argument("name", help="who or what uses the token, e.g. ci-main")
    t.add_argument("--scopes", default="jobs:read,jobs:write",
                   help=f"comma-separated, from {', '.join(SCOPES)} (default jobs:read,jobs:write)")
    t.set_defaults(func=cmd_token_create, local=True)

    p = sub.add_parser("serve", help="run the control plane under gunicorn (extra args go to gunicorn)")
    p.add_argument("gunicorn_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_serve, local=True)

    p = sub.add_parser("spec-reference", help="print the job spec reference (markdown)")
    p.set_defaults(func=cmd_spec_reference, local=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors become `error: <message>` on stderr and an exit code, never a traceback."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    client = None
    if not getattr(args, "local", False):
        url = getattr(args, "url", None) or os.environ.get("SFTOPS_URL") or DEFAULT_URL
        token = getattr(args, "token", None) or os.environ.get("SFTOPS_TOKEN") or None
        client = Client(url, token)
    try:
        return args.func(args, client)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        for line in e.details:
            print(f"  {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`sftops list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
