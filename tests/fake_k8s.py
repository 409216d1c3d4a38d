"""A small fake Kubernetes API server on 127.0.0.1, so the real kubernetes client's HTTP and error handling run.

It keeps Jobs (batch/v1), Secrets and Pods in memory and serves the paths the KubernetesLauncher uses:
create/get/list/delete Jobs, create/get/patch (merge patch)/delete Secrets, list Pods by labelSelector.
Tests inject failures (`fail(...)`), set a Job's status and add pods, and read `requests` to see what
the client sent. Deleting a Job garbage-collects its pods and the Secrets it owns, as the real GC does.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

JOB_ID_LABEL = "sftops.dev/job-id"
ROUTES = [
    (re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs$"), "jobs", False),
    (re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)$"), "jobs", True),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/secrets$"), "secrets", False),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/]+)$"), "secrets", True),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods$"), "pods", False),
]
KINDS = {"jobs": ("Job", "batch/v1", "jobs.batch"), "secrets": ("Secret", "v1", "secrets"), "pods": ("Pod", "v1", "pods")}
REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "AlreadyExists", 415: "UnsupportedMediaType",
           422: "Invalid", 500: "InternalError", 503: "ServiceUnavailable"}


@dataclass
class Request:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    content_type: str | None
    authorization: str | None = None


@dataclass
class Failure:
    """An injected error: the next `times` requests matching method and path regex get `status`."""

    method: str
    path: re.Pattern
    status: int
    message: str | None
    times: int


def now() -> str:
    """RFC 3339 UTC timestamp like the API server's."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def matches_selector(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selector: `k=v,k2=v2`."""
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value.lstrip("="):
            return False
    return True


class FakeKube:
    """In-memory Kubernetes API for Jobs, Secrets and Pods, served over HTTP on loopback."""

    def __init__(self) -> None:
        """Empty state; call start() to serve."""
        self.objects: dict[str, dict[tuple[str, str], dict]] = {"jobs": {}, "secrets": {}, "pods": {}}
        self.requests: list[Request] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # -- test controls -------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on an ephemeral port; return the base URL."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            """Dispatch every method to FakeKube.handle."""

            def _any(self) -> None:
                """Read the request, let the fake answer, write the JSON reply."""
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body = fake.handle(
                    self.command, self.path, raw, self.headers.get("Content-Type"), self.headers.get("Authorization")
                )
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _any

            def log_message(self, *args: Any) -> None:
                """Keep test output quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def fail(self, method: str, path_regex: str, status: int, message: str | None = None, times: int = 1) -> None:
        """Answer the next `times` matching requests with an error Status."""
        with self.lock:
            self.failures.append(Failure(method, re.compile(path_regex), status, message, times))

    def set_job_status(self, namespace: str, name: str, status: dict) -> None:
        """Replace a Job's status (as the Job controller would)."""
        with self.lock:
            self.objects["jobs"][(namespace, name)]["status"] = status

    def add_pod(self, namespace: str, name: str, job_id: str, status: dict) -> dict:
        """Add a pod of a job (labelled like the Job's template) with the given status."""
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "creationTimestamp": now(),
                         "labels": {JOB_ID_LABEL: job_id, "app.kubernetes.io/name": "sftops"}},
            "spec": {"containers": [{"name": "job", "image": "sftops:test"}], "restartPolicy": "Never"},
            "status": status,
        }
        with self.lock:
            self.objects["pods"][(namespace, name)] = pod
        return pod

    def get(self, resource: str, namespace: str, name: str) -> dict | None:
        """An object as stored, or None."""
        with self.lock:
            return copy.deepcopy(self.objects[resource].get((namespace, name)))

    def calls(self, method: str, resource: str) -> list[Request]:
        """The requests of one method on one resource type."""
        return [r for r in self.requests if r.method == method and f"/{resource}" in r.path]

    # -- the API -------------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, raw: bytes, content_type: str | None, authorization: str | None = None
    ) -> tuple[int, dict]:
        """Answer one request: (HTTP status, JSON body)."""
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        body = json.loads(raw) if raw else None
        with self.lock:
            self.requests.append(Request(method, url.path, query, body, content_type, authorization))
            for failure in self.failures:
                if failure.times > 0 and failure.method == method and failure.path.search(url.path):
                    failure.times -= 1
                    return failure.status, self.status_body(failure.status, failure.message or "injected failure")
            for regex, resource, named in ROUTES:
                m = regex.match(url.path)
                if m:
                    return self.dispatch(method, resource, m.group(1), m.group(2) if named else None, query, body,
                                         content_type)
        return 404, self.status_body(404, f"the server could not find the requested resource {url.path}")

    def dispatch(self, method: str, resource: str, ns: str, name: str | None, query: dict, body: Any,
                 content_type: str | None) -> tuple[int, dict]:
        """CRUD on the in-memory store (called with the lock held)."""
        store = self.objects[resource]
        kind, api_version, group_name = KINDS[resource]
        if name is None and method == "POST":
            name = body["metadata"]["name"]
            if (ns, name) in store:
                return 409, self.status_body(409, f'{group_name} "{name}" already exists', name, group_name)
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            meta.update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion="1", creationTimestamp=now())
            if resource == "secrets" and "stringData" in obj:
                # stringData is write-only: the API server folds it into base64 data
                data = obj.setdefault("data", {})
                for key, value in obj.pop("stringData").items():
                    data[key] = base64.b64encode(value.encode()).decode()
            if resource == "jobs":
                obj["status"] = {}
            store[(ns, name)] = obj
            return 201, obj
        if name is None and method == "GET":
            selector = (query.get("labelSelector") or [""])[0]
            items = [o for (o_ns, _), o in store.items() if o_ns == ns
                     and matches_selector(o["metadata"].get("labels") or {}, selector)]
            return 200, {"apiVersion": api_version, "kind": f"{kind}List", "metadata": {}, "items": items}
        if name is None:
            return 405, self.status_body(405, f"{method} not allowed on {resource}")
        obj = store.get((ns, name))
        if obj is None:
            return 404, self.status_body(404, f'{group_name} "{name}" not found', name, group_name)
        if method == "GET":
            return 200, obj
        if method == "PATCH":
            if content_type != "application/merge-patch+json":
                return 415, self.status_body(415, f"the fake supports only merge patches, got {content_type}")
            patched = merge_patch(obj, body)
            patched["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
            store[(ns, name)] = patched
            return 200, patched
        if method == "DELETE":
            del store[(ns, name)]
            if resource == "jobs":
                self.collect_garbage(ns, obj)
            return 200, {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success",
                         "details": {"name": name, "kind": resource}}
        return 405, self.status_body(405, f"{method} not allowed on {resource}/{name}")

    def collect_garbage(self, ns: str, job: dict) -> None:
        """What the garbage collector does for a deleted Job: its pods and the objects it owns go too."""
        job_id = (job["metadata"].get("labels") or {}).get(JOB_ID_LABEL)
        for key, pod in list(self.objects["pods"].items()):
            if key[0] == ns and (pod["metadata"].get("labels") or {}).get(JOB_ID_LABEL) == job_id:
                del self.objects["pods"][key]
        uid = job["metadata"]["uid"]
        for key, secret in list(self.objects["secrets"].items()):
            if key[0] == ns and any(o.get("uid") == uid for o in secret["metadata"].get("ownerReferences") or []):
                del self.objects["secrets"][key]

    @staticmethod
    def status_body(code: int, message: str, name: str | None = None, kind: str | None = None) -> dict:
        """A Kubernetes Status object for an error."""
        body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": message,
                "reason": REASONS.get(code, "Unknown"), "code": code}
        if name:
            body["details"] = {"name": name, "kind": kind}
        return body
