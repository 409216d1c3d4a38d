"""Run each job as a Kubernetes batch/v1 Job: the API calls around the pure builders in k8s_manifest.py.

submit: create the per-job Secret, create the Job, then make the Job the Secret's owner so the
Secret is garbage-collected with it (if the Job cannot be created the Secret is deleted again).
poll: read the Job and its pods and turn conditions and container states into a RunStatus, with
events for what a user must act on (Unschedulable, image pull failures, OOMKilled, ...).
cancel: delete the Job with Foreground propagation, so its pods go first and none is orphaned.
Every API failure becomes a LaunchError naming namespace/name, chained to the client's exception.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from service.launchers.base import LaunchError, LaunchRequest, RunStatus
from service.launchers.k8s_manifest import (
    CONTAINER,
    JOB_ID_LABEL,
    KubernetesSettings,
    build_job,
    build_secret,
    job_name,
    with_plane_url,
)

log = logging.getLogger(__name__)

IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
CREATE_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")
MESSAGE_MAX_CHARS = 500


def load_api_client() -> client.ApiClient:
    """An ApiClient from the pod's ServiceAccount, else from ~/.kube/config; raises LaunchError if neither works."""
    from kubernetes import config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            # read KUBECONFIG now: the client reads it once at import time
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration, persist_config=False
            )
        except (config.ConfigException, OSError) as e:
            raise LaunchError(
                "no Kubernetes credentials: the plane is not running in a cluster and has no usable kubeconfig "
                f"({e}); run it in-cluster with the chart, set KUBECONFIG, or use SFTOPS_LAUNCHER=local",
                reason="NoCredentials",
            ) from e
    return client.ApiClient(configuration)


def api_error(e: Exception, verb: str, resource: str, namespace: str, name: str) -> LaunchError:
    """Translate a client failure into a LaunchError that names namespace/name and says what to do."""
    where = f"{namespace}/{name}"
    if not isinstance(e, ApiException):
        return LaunchError(
            f"cannot reach the Kubernetes API to {verb} {resource} {where}: {type(e).__name__}: {_short(str(e))} "
            "(the plane retries; check the API server and the plane's network policy)",
            reason="Unreachable",
            retryable=True,
        )
    detail = _status_message(e)
    if e.status == 403:
        return LaunchError(
            f"{where}: the plane's ServiceAccount lacks RBAC permission to {verb} {resource} in {namespace} "
            f"(check the chart's Role): {detail}",
            reason="Forbidden",
        )
    if e.status == 401:
        return LaunchError(
            f"{where}: the Kubernetes API rejected the plane's credentials (expired token or kubeconfig?): {detail}",
            reason="Unauthorized",
        )
    if e.status == 409:
        return LaunchError(
            f"{where}: a {resource[:-1]} with this name already exists "
            f"(delete it with `kubectl -n {namespace} delete {resource[:-1]} {name}` if it is left over): {detail}",
            reason="AlreadyExists",
        )
    if e.status == 404:
        return LaunchError(f"{where}: not found while trying to {verb} {resource}: {detail}", reason="NotFound")
    if e.status == 422:
        return LaunchError(f"{where}: Kubernetes rejected the {resource[:-1]}: {detail}", reason="Invalid")
    if e.status == 429 or (e.status or 0) >= 500:
        return LaunchError(
            f"{where}: the Kubernetes API failed to {verb} {resource} (HTTP {e.status}, will retry): {detail}",
            reason="ServerError",
            retryable=True,
        )
    return LaunchError(f"{where}: cannot {verb} {resource} (HTTP {e.status}): {detail}", reason=f"HTTP{e.status}")


def _status_message(e: ApiException) -> str:
    """The message of a Kubernetes Status body, else the HTTP reason (never the whole response)."""
    body = e.body.decode("utf-8", "replace") if isinstance(e.body, bytes) else e.body
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    return _short(message or str(e.reason or "no details"))


def _short(text: str) -> str:
    """One line of at most MESSAGE_MAX_CHARS characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= MESSAGE_MAX_CHARS else text[: MESSAGE_MAX_CHARS - 3] + "..."


class KubernetesLauncher:
    """Starts, inspects and stops jobs as Kubernetes Jobs in one namespace."""

    name = "kubernetes"

    def __init__(self, settings: KubernetesSettings, api_client: client.ApiClient | None = None):
        """Use api_client, else in-cluster config, else kubeconfig. Raises LaunchError without credentials."""
        self.settings = settings
        self.api_client = api_client if api_client is not None else load_api_client()
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self._timeout = settings.request_timeout_seconds

    def _call(self, verb: str, resource: str, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one API call with the request timeout; raise LaunchError naming the object on failure."""
        try:
            return fn(*args, _request_timeout=self._timeout, **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise api_error(e, verb, resource, self.settings.namespace, name) from e

    def submit(self, request: LaunchRequest) -> str:
        """Create the Secret and the Job, then tie the Secret to the Job; return the handle. Raises LaunchError."""
        ns, name = self.settings.namespace, job_name(request.job_id)
        settings = with_plane_url(self.settings, request.plane_url)
        secret = build_secret(request.job_id, request.spec, request.token, settings)
        job = build_job(request.job_id, request.spec, settings)
        self._create_secret(secret, name)
        try:
            created = self._call("create", "jobs", name, self.batch.create_namespaced_job, ns, job)
        except LaunchError:
            self._delete_secret_quietly(name)
            raise
        uid = created.metadata.uid
        self._own_secret(name, uid)
        log.info("kubernetes job %s created as %s/%s (uid %s)", request.job_id, ns, name, uid)
        return json.dumps({"namespace": ns, "name": name, "uid": uid}, sort_keys=True)

    def _create_secret(self, secret: client.V1Secret, name: str) -> None:
        """Create the job's Secret, replacing one left by an earlier failed submit (but not a live job's)."""
        ns = self.settings.namespace
        try:
            self._call("create", "secrets", name, self.core.create_namespaced_secret, ns, secret)
            return
        except LaunchError as e:
            if e.reason != "AlreadyExists":
                raise
            if self._job_exists(name):
                raise
            log.warning("replacing Secret %s/%s left over from an earlier submit", ns, name)
        self._call("delete", "secrets", name, self.core.delete_namespaced_secret, name, ns)
        self._call("create", "secrets", name, self.core.create_namespaced_secret, ns, secret)

    def _job_exists(self, name: str) -> bool:
        """Whether a Job of this name exists now. Raises LaunchError on other failures."""
        try:
            self._call("get", "jobs", name, self.batch.read_namespaced_job, name, self.settings.namespace)
        except LaunchError as e:
            if e.reason == "NotFound":
                return False
            raise
        return True

    def _own_secret(self, name: str, uid: str) -> None:
        """Make the Job the Secret's owner so it is deleted with it; a failure only leaks the Secret, so warn."""
        patch = {
            "metadata": {
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid}]
            }
        }
        try:
            self._call(
                "patch",
                "secrets",
                name,
                self.core.patch_namespaced_secret,
                name,
                self.settings.namespace,
                patch,
                _content_type="application/merge-patch+json",
            )
        except LaunchError as e:
            # the Job runs either way; cancel() deletes the Secret explicitly too
            log.warning("%s; the Secret will outlive its Job until the job is cancelled or deleted", e)

    def _delete_secret_quietly(self, name: str) -> None:
        """Delete a job's Secret after a failed submit; a failure here is logged, the original error wins."""
        try:
            self._call("delete", "secrets", name, self.core.delete_namespaced_secret, name, self.settings.namespace)
        except LaunchError as e:
            if e.reason != "NotFound":
                log.warning("could not clean up after a failed submit: %s", e)

    def poll(self, job_id: str, handle: str) -> RunStatus:
        """Read the Job and its pods and map them to a RunStatus. Raises LaunchError on API failures."""
        ns, name, uid = self._parse_handle(job_id, handle)
        try:
            job = self._call("get", "jobs", name, self.batch.read_namespaced_job, name, ns)
        except LaunchError as e:
            if e.reason == "NotFound":
                return disappeared(ns, name)
            raise
        if uid and job.metadata.uid != uid:
            return disappeared(ns, name)
        pods = self._call(
            "list", "pods", name, self.core.list_namespaced_pod, ns, label_selector=f"{JOB_ID_LABEL}={job_id}"
        ).items
        return run_status(job, pods)

    def cancel(self, job_id: str, handle: str) -> None:
        """Delete the Job (pods first: Foreground) and its Secret; already gone is fine. Raises LaunchError."""
        ns, name, _ = self._parse_handle(job_id, handle)
        try:
            self._call(
                "delete",
                "jobs",
                name,
                self.batch.delete_namespaced_job,
                name,
                ns,
                body=client.V1DeleteOptions(propagation_policy="Foreground"),
            )
        except LaunchError as e:
            if e.reason != "NotFound":
                raise
        try:
            self._call("delete", "secrets", name, self.core.delete_namespaced_secret, name, ns)
        except LaunchError as e:
            if e.reason != "NotFound":
                raise

    def capacity(self) -> int | None:
        """No limit here: the scheduler queues pods, and the reconciler counts running jobs."""
        return None

    def _parse_handle(self, job_id: str, handle: str) -> tuple[str, str, str | None]:
        """Decode a handle from submit(); raises LaunchError if it is not one."""
        try:
            data = json.loads(handle)
            return str(data["namespace"]), str(data["name"]), data.get("uid")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise LaunchError(
                f"kubernetes job {job_id}: handle {handle[:80]!r} is not a Kubernetes launcher handle "
                "(was the job started by another launcher? check SFTOPS_LAUNCHER)",
                reason="BadHandle",
            ) from e


def disappeared(namespace: str, name: str) -> RunStatus:
    """The status of a Job that is no longer there."""
    return RunStatus(
        "failed",
        reason="NotFound",
        message=f"the Kubernetes Job disappeared: {namespace}/{name} was deleted "
        "(by hand, or by ttlSecondsAfterFinished before the plane saw it finish)",
    )


def run_status(job: client.V1Job, pods: list[client.V1Pod]) -> RunStatus:
    """Map a Job's conditions and its pods' states to a RunStatus with events worth telling the user."""
    pods = sorted(pods, key=_created)
    events: list[tuple[str, str]] = []
    for pod in pods:
        events.extend(pod_events(pod))
    true = {c.type: c for c in (job.status.conditions or []) if c.status == "True"} if job.status else {}
    if "Complete" in true or "SuccessCriteriaMet" in true:
        return RunStatus("succeeded", exit_code=0, events=events)
    failed = true.get("Failed") or true.get("FailureTarget")
    if failed is not None:
        reason = failed.reason or "Failed"
        message = f"{reason}: {_short(failed.message or 'the Job failed')}"
        exit_code = None
        last = last_termination(pods)
        if last is not None:
            pod_name, term = last
            exit_code = term.exit_code
            message += f"; last pod {pod_name}: {term.reason or 'Error'} (exit code {term.exit_code})"
            if term.message:
                message += f": {_short(term.message)}"
        return RunStatus("failed", reason=reason, message=message, exit_code=exit_code, events=events)
    live = [p for p in pods if p.metadata.deletion_timestamp is None and p.status and p.status.phase in ("Pending", "Running")]
    if any(p.status.phase == "Running" for p in live):
        return RunStatus("running", events=events)
    for pod in live:
        why = pending_reason(pod)
        if why is not None:
            return RunStatus("pending", reason=why[0], message=why[1], events=events)
    return RunStatus("pending", events=events)


def _created(pod: client.V1Pod) -> tuple[float, str]:
    """Sort key: creation time, then name."""
    ts = pod.metadata.creation_timestamp
    return (ts.timestamp() if ts is not None else 0.0, pod.metadata.name or "")


def _job_container_statuses(pod: client.V1Pod) -> list[client.V1ContainerStatus]:
    """The job container's statuses (init containers are not ours)."""
    return [s for s in (pod.status.container_statuses or []) if s.name == CONTAINER] if pod.status else []


def pending_reason(pod: client.V1Pod) -> tuple[str, str] | None:
    """Why a pod is not running yet, as (reason, message), if Kubernetes says."""
    for cond in (pod.status.conditions or []) if pod.status else []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            return "Unschedulable", f"no node can run it (Unschedulable): {_short(cond.message or '')}"
    for status in _job_container_statuses(pod):
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason in IMAGE_PULL_REASONS + CREATE_REASONS:
            return waiting.reason, waiting_message(status.image, waiting.reason, waiting.message)
    return None


def waiting_message(image: str | None, reason: str, message: str | None) -> str:
    """A user-facing sentence for a container stuck waiting."""
    if reason in IMAGE_PULL_REASONS:
        return (
            f"cannot pull image {image} ({reason}): {_short(message or '')} "
            "(check SFTOPS_K8S_IMAGE and SFTOPS_K8S_IMAGE_PULL_SECRETS)"
        )
    return f"cannot start the container ({reason}): {_short(message or '')}"


def pod_events(pod: client.V1Pod) -> list[tuple[str, str]]:
    """(level, message) pairs a user should see once for this pod; stable across polls so they can be deduplicated."""
    name = pod.metadata.name
    events: list[tuple[str, str]] = []
    why = pending_reason(pod)
    if why is not None:
        events.append(("warning", why[1]))
    status = pod.status
    disrupted = any(
        c.type == "DisruptionTarget" and c.status == "True" for c in ((status.conditions or []) if status else [])
    )
    for cs in _job_container_statuses(pod):
        term = cs.state.terminated if cs.state else None
        if term is None:
            continue
        if term.reason == "OOMKilled":
            events.append(
                (
                    "error",
                    f"pod {name}: the job ran out of memory (OOMKilled, exit code {term.exit_code}); "
                    "raise resources.memory or lower training.batch_size / training.max_length",
                )
            )
        elif term.exit_code and not disrupted:
            events.append(("warning", f"pod {name}: the job container exited with code {term.exit_code} ({term.reason or 'Error'})"))
    if disrupted:
        events.append(("warning", f"pod {name} was preempted or evicted (DisruptionTarget); the Job retries it"))
    elif status is not None and status.phase == "Failed" and status.reason == "Evicted":
        events.append(("warning", f"pod {name} was evicted: {_short(status.message or '')}"))
    return events


def last_termination(pods: list[client.V1Pod]) -> tuple[str, client.V1ContainerStateTerminated] | None:
    """The most recent terminated state of the job container across pods (pods in creation order)."""
    found = None
    for pod in pods:
        for cs in _job_container_statuses(pod):
            term = cs.state.terminated if cs.state else None
            if term is not None:
                found = (pod.metadata.name, term)
    return found
