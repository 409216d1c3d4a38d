"""KubernetesLauncher against a fake API server on loopback, through the real kubernetes client."""

from __future__ import annotations

import base64
import json
import socket

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from service.launchers.base import LaunchError, LaunchRequest
from service.launchers.k8s_manifest import KubernetesSettings
from service.launchers.kubernetes import KubernetesLauncher
from tests.fake_k8s import FakeKube

NS = "ml"
TOKEN = "sft_" + "K8sJobTokenThatMustStayInTheSecret000000000"
SPEC = {"name": "tune", "base_model": "s3://m/smol/", "dataset": "s3://d/x.jsonl", "output": "s3://o/x/",
        "resources": {"gpus": 1, "memory": "32Gi"}}
REQUEST = LaunchRequest(job_id="job1", spec=SPEC, token=TOKEN, plane_url="http://sftops.ml.svc:8000")
JOBS = r"/apis/batch/v1/namespaces/ml/jobs"
SECRETS = r"/api/v1/namespaces/ml/secrets"


@pytest.fixture
def fake():
    """A running fake API server."""
    kube = FakeKube()
    kube.url = kube.start()
    yield kube
    kube.stop()


def make_launcher(host: str) -> KubernetesLauncher:
    """A launcher whose real ApiClient talks to host."""
    api = client.ApiClient(client.Configuration(host=host))
    return KubernetesLauncher(KubernetesSettings(namespace=NS, image="sftops:test", s3_secret_name="s3",
                                                 request_timeout_seconds=5), api_client=api)


@pytest.fixture
def launcher(fake):
    """A launcher wired to the fake."""
    kl = make_launcher(fake.url)
    yield kl
    kl.api_client.close()


def test_submit_creates_secret_and_job_and_ties_them(fake, launcher):
    """Secret then Job; the Secret's owner is the Job; the token is only in the Secret; handle names the Job."""
    handle = json.loads(launcher.submit(REQUEST))
    job = fake.get("jobs", NS, "sftops-job1")
    secret = fake.get("secrets", NS, "sftops-job1")
    assert handle == {"namespace": NS, "name": "sftops-job1", "uid": job["metadata"]["uid"]}
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in fake.requests] == [
        ("POST", "secrets"), ("POST", "jobs"), ("PATCH", "sftops-job1")]
    assert fake.calls("PATCH", "secrets")[0].content_type == "application/merge-patch+json"
    assert secret["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "sftops-job1", "uid": job["metadata"]["uid"]}]
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    assert json.loads(base64.b64decode(secret["data"]["spec.json"])) == SPEC
    assert TOKEN not in json.dumps(job)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SFTOPS_PLANE_URL"]["value"] == "http://sftops.ml.svc:8000"  # the request's URL when settings have none
    assert env["SFTOPS_JOB_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "sftops-job1", "key": "token"}}


def test_lifecycle_pending_running_succeeded(fake, launcher):
    """No pods yet: pending; a running pod: running; the Complete condition: succeeded."""
    handle = launcher.submit(REQUEST)
    assert launcher.poll("job1", handle).state == "pending"
    fake.add_pod(NS, "sftops-job1-abc", "job1", {"phase": "Running", "containerStatuses": [
        {"name": "job", "image": "sftops:test", "imageID": "", "ready": True, "restartCount": 0,
         "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]})
    assert launcher.poll("job1", handle).state == "running"
    fake.set_job_status(NS, "sftops-job1", {"succeeded": 1, "conditions": [
        {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]})
    status = launcher.poll("job1", handle)
    assert (status.state, status.exit_code, status.events) == ("succeeded", 0, [])
    pods_call = fake.calls("GET", "pods")[-1]
    assert pods_call.query["labelSelector"] == ["sftops.dev/job-id=job1"]


def test_cancel_deletes_with_foreground_propagation(fake, launcher):
    """cancel() deletes the Job with propagationPolicy Foreground; the Secret goes too; a second cancel is fine."""
    handle = launcher.submit(REQUEST)
    launcher.cancel("job1", handle)
    (delete,) = fake.calls("DELETE", "jobs")
    assert delete.path == f"{JOBS}/sftops-job1"
    assert delete.body["propagationPolicy"] == "Foreground"
    assert fake.get("jobs", NS, "sftops-job1") is None
    assert fake.get("secrets", NS, "sftops-job1") is None
    launcher.cancel("job1", handle)  # 404s are "already gone"
    status = launcher.poll("job1", handle)
    assert (status.state, status.reason) == ("failed", "NotFound")
    assert status.message.startswith("the Kubernetes Job disappeared: ml/sftops-job1 was deleted")


def test_forbidden_job_create_names_rbac_and_cleans_up(fake, launcher):
    """403 on creating the Job: Forbidden naming verb, resource and namespace; the Secret is removed again."""
    fake.fail("POST", JOBS + "$", 403, 'jobs.batch is forbidden: User "system:serviceaccount:ml:sftops" '
              'cannot create resource "jobs" in API group "batch" in the namespace "ml"')
    with pytest.raises(LaunchError) as info:
        launcher.submit(REQUEST)
    err = info.value
    assert (err.reason, err.retryable) == ("Forbidden", False)
    assert str(err).startswith(
        "ml/sftops-job1: the plane's ServiceAccount lacks RBAC permission to create jobs in ml "
        "(check the chart's Role): jobs.batch is forbidden")
    assert isinstance(err.__cause__, ApiException) and err.__cause__.status == 403
    assert fake.get("secrets", NS, "sftops-job1") is None
    assert TOKEN not in str(err)


def test_forbidden_secret_create(fake, launcher):
    """403 on the Secret stops before any Job is created."""
    fake.fail("POST", SECRETS + "$", 403, "secrets is forbidden")
    with pytest.raises(LaunchError, match="permission to create secrets in ml") as info:
        launcher.submit(REQUEST)
    assert info.value.reason == "Forbidden"
    assert fake.calls("POST", "jobs") == []


def test_already_exists(fake, launcher):
    """Submitting a job whose Job exists is AlreadyExists; the running job's Secret is untouched."""
    launcher.submit(REQUEST)
    before = fake.get("secrets", NS, "sftops-job1")
    with pytest.raises(LaunchError) as info:
        launcher.submit(REQUEST)
    assert info.value.reason == "AlreadyExists"
    assert str(info.value).startswith("ml/sftops-job1: a secret with this name already exists")
    assert fake.get("secrets", NS, "sftops-job1") == before


def test_job_conflict_is_already_exists(fake, launcher):
    """A 409 on the Job itself is AlreadyExists too, and the new Secret is removed."""
    fake.fail("POST", JOBS + "$", 409, 'jobs.batch "sftops-job1" already exists')
    with pytest.raises(LaunchError, match="a job with this name already exists") as info:
        launcher.submit(REQUEST)
    assert info.value.reason == "AlreadyExists"
    assert fake.get("secrets", NS, "sftops-job1") is None


def test_leftover_secret_without_job_is_replaced(fake, launcher):
    """A Secret left by a submit that died half-way is replaced, and the submit goes through."""
    fake.fail("POST", JOBS + "$", 500, "etcdserver: request timed out")
    fake.fail("DELETE", SECRETS + "/", 500, "etcdserver: request timed out")  # the clean-up fails too
    with pytest.raises(LaunchError):
        launcher.submit(REQUEST)
    assert fake.get("secrets", NS, "sftops-job1") is not None
    launcher.submit(REQUEST)
    assert fake.get("jobs", NS, "sftops-job1") is not None


def test_server_error_is_retryable(fake, launcher):
    """5xx is a retryable LaunchError; the Secret created before it is cleaned up."""
    fake.fail("POST", JOBS + "$", 500, "etcdserver: request timed out")
    with pytest.raises(LaunchError) as info:
        launcher.submit(REQUEST)
    assert (info.value.reason, info.value.retryable) == ("ServerError", True)
    assert "HTTP 500, will retry" in str(info.value)
    assert fake.get("secrets", NS, "sftops-job1") is None


def test_unreachable_api_is_retryable():
    """Connection refused is a retryable LaunchError naming the object."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kl = make_launcher(f"http://127.0.0.1:{port}")
    with pytest.raises(LaunchError) as info:
        kl.submit(REQUEST)
    assert (info.value.reason, info.value.retryable) == ("Unreachable", True)
    assert str(info.value).startswith("cannot reach the Kubernetes API to create secrets ml/sftops-job1")
    with pytest.raises(LaunchError, match="to get jobs ml/sftops-job1"):
        kl.poll("job1", json.dumps({"namespace": NS, "name": "sftops-job1", "uid": "u"}))


def test_forbidden_pod_list_on_poll(fake, launcher):
    """poll() needs to list pods; a 403 there names that permission."""
    handle = launcher.submit(REQUEST)
    fake.fail("GET", r"/pods$", 403, "pods is forbidden")
    with pytest.raises(LaunchError, match="permission to list pods in ml"):
        launcher.poll("job1", handle)


def test_owner_patch_failure_does_not_fail_submit(fake, launcher):
    """If the Secret cannot be tied to the Job the job still runs, and cancel() deletes the Secret itself."""
    fake.fail("PATCH", SECRETS + "/", 403, "cannot patch secrets")
    handle = launcher.submit(REQUEST)
    assert "ownerReferences" not in fake.get("secrets", NS, "sftops-job1")["metadata"]
    launcher.cancel("job1", handle)
    assert fake.get("secrets", NS, "sftops-job1") is None


def waiting(reason: str, message: str) -> dict:
    """A pod status whose job container waits for a reason."""
    return {"phase": "Pending", "containerStatuses": [
        {"name": "job", "image": "reg/sftops:nope", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": reason, "message": message}}}]}


def terminated(reason: str, exit_code: int, message: str | None = None) -> dict:
    """A failed pod status whose job container ended."""
    term = {"reason": reason, "exitCode": exit_code}
    if message:
        term["message"] = message
    return {"phase": "Failed", "containerStatuses": [
        {"name": "job", "image": "sftops:test", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": term}}]}


def failed_job(reason: str, message: str) -> dict:
    """A Job status with the Failed condition."""
    return {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": message}]}


UNSCHEDULABLE_MSG = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
CASES = {
    "unschedulable": (
        {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                             "message": UNSCHEDULABLE_MSG}]},
        None,
        ("pending", "Unschedulable", f"no node can run it (Unschedulable): {UNSCHEDULABLE_MSG}", None),
        [("warning", f"no node can run it (Unschedulable): {UNSCHEDULABLE_MSG}")],
    ),
    "image-pull-backoff": (
        waiting("ImagePullBackOff", 'Back-off pulling image "reg/sftops:nope"'),
        None,
        ("pending", "ImagePullBackOff", None, None),
        [("warning", 'cannot pull image reg/sftops:nope (ImagePullBackOff): Back-off pulling image "reg/sftops:nope" '
                     "(check SFTOPS_K8S_IMAGE and SFTOPS_K8S_IMAGE_PULL_SECRETS)")],
    ),
    "err-image-pull": (
        waiting("ErrImagePull", "manifest unknown"),
        None,
        ("pending", "ErrImagePull", None, None),
        [("warning", "cannot pull image reg/sftops:nope (ErrImagePull): manifest unknown "
                     "(check SFTOPS_K8S_IMAGE and SFTOPS_K8S_IMAGE_PULL_SECRETS)")],
    ),
    "missing-s3-secret": (
        waiting("CreateContainerConfigError", 'secret "s3" not found'),
        None,
        ("pending", "CreateContainerConfigError", 'cannot start the container (CreateContainerConfigError): '
                                                  'secret "s3" not found', None),
        [("warning", 'cannot start the container (CreateContainerConfigError): secret "s3" not found')],
    ),
    "oom-retrying": (
        terminated("OOMKilled", 137),
        None,
        ("pending", None, None, None),
        [("error", "pod sftops-job1-p1: the job ran out of memory (OOMKilled, exit code 137); "
                   "raise resources.memory or lower training.batch_size / training.max_length")],
    ),
    "oom-then-backoff-limit": (
        terminated("OOMKilled", 137),
        failed_job("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
        ("failed", "BackoffLimitExceeded", "BackoffLimitExceeded: Job has reached the specified backoff limit; "
                                           "last pod sftops-job1-p1: OOMKilled (exit code 137)", 137),
        [("error", "pod sftops-job1-p1: the job ran out of memory (OOMKilled, exit code 137); "
                   "raise resources.memory or lower training.batch_size / training.max_length")],
    ),
    "backoff-limit": (
        terminated("Error", 1, "error: training failed"),
        failed_job("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
        ("failed", "BackoffLimitExceeded", "BackoffLimitExceeded: Job has reached the specified backoff limit; "
                                           "last pod sftops-job1-p1: Error (exit code 1): error: training failed", 1),
        [("warning", "pod sftops-job1-p1: the job container exited with code 1 (Error)")],
    ),
    "deadline": (
        {"phase": "Failed", "reason": "DeadlineExceeded"},
        failed_job("DeadlineExceeded", "Job was active longer than specified deadline"),
        ("failed", "DeadlineExceeded", "DeadlineExceeded: Job was active longer than specified deadline", None),
        [],
    ),
    "bad-input-exit-2": (
        terminated("Error", 2),
        failed_job("PodFailurePolicy", "Container job for pod ml/sftops-job1-p1 failed with exit code 2 matching "
                                       "FailJob rule at index 1"),
        ("failed", "PodFailurePolicy", None, 2),
        [("warning", "pod sftops-job1-p1: the job container exited with code 2 (Error)")],
    ),
    "preempted": (
        {**terminated("Error", 143), "conditions": [{"type": "DisruptionTarget", "status": "True",
                                                     "reason": "PreemptionByScheduler"}]},
        None,
        ("pending", None, None, None),
        [("warning", "pod sftops-job1-p1 was preempted or evicted (DisruptionTarget); the Job retries it")],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_poll_maps_failure_reasons(fake, launcher, case):
    """Each pod state and Job condition becomes the right RunStatus and user-facing events."""
    pod_status, job_status, (state, reason, message, exit_code), events = CASES[case]
    handle = launcher.submit(REQUEST)
    fake.add_pod(NS, "sftops-job1-p1", "job1", pod_status)
    fake.add_pod(NS, "other-job-pod", "job2", waiting("ErrImagePull", "not ours"))  # another job's pod is ignored
    if job_status is not None:
        fake.set_job_status(NS, "sftops-job1", job_status)
    status = launcher.poll("job1", handle)
    assert (status.state, status.reason, status.exit_code) == (state, reason, exit_code)
    if message is not None:
        assert status.message == message
    assert status.events == events


def test_replaced_job_reads_as_disappeared(fake, launcher):
    """A Job of the same name but another uid is not ours."""
    handle = launcher.submit(REQUEST)
    other = json.dumps({**json.loads(handle), "uid": "some-other-uid"})
    assert launcher.poll("job1", other).reason == "NotFound"


@pytest.mark.parametrize("handle", ["", "[]", "{}", "nope"])
def test_bad_handle(launcher, handle):
    """A handle that is not ours is a BadHandle LaunchError."""
    with pytest.raises(LaunchError, match="kubernetes job job1: handle") as info:
        launcher.poll("job1", handle)
    assert info.value.reason == "BadHandle"
    assert launcher.capacity() is None


def test_kubeconfig_is_used_without_a_client(fake, tmp_path, monkeypatch):
    """Outside a cluster the launcher reads KUBECONFIG and talks to the server it names."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "me", "user": {"token": "kubeconfig-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": NS}}],
    }))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    kl = KubernetesLauncher(KubernetesSettings(namespace=NS))
    kl.submit(REQUEST)
    assert fake.get("jobs", NS, "sftops-job1") is not None
    assert {r.authorization for r in fake.requests} == {"Bearer kubeconfig-token"}


def test_no_credentials_is_a_launch_error(tmp_path, monkeypatch):
    """Neither in a cluster nor a kubeconfig: NoCredentials, saying what to do."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="no Kubernetes credentials") as info:
        KubernetesLauncher(KubernetesSettings(namespace=NS))
    assert info.value.reason == "NoCredentials"
