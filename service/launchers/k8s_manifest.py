"""Build the Kubernetes objects for one job: pure functions, no API calls (see kubernetes.py for those).

A job becomes two objects named `sftops-<id>`:
- a Secret holding the resolved spec (mounted read-only at /etc/sftops/spec.json; only that key is
  projected as a file) and the job's report token (reaches the container only as the env var
  SFTOPS_JOB_TOKEN through a secretKeyRef); the launcher makes the Job its owner, so it is deleted with it;
- a batch/v1 Job running `python -m job run --spec /etc/sftops/spec.json` in one pod with
  `resources.gpus` GPUs. With more than one GPU the command is
  `torchrun --standalone --nproc-per-node=N -m job run ...` (data-parallel on one node).
  Failure handling: exit code 2 (a user input error, see job/errors.py) fails the Job at once through
  the podFailurePolicy; a pod with the DisruptionTarget condition (preemption, node drain, eviction) is
  ignored, so it is retried without using up `backoffLimit`; other failures retry up to `backoffLimit`
  (the job resumes from its latest checkpoint). `activeDeadlineSeconds` comes from
  `resources.deadline_seconds`; finished Jobs are garbage-collected after `ttlSecondsAfterFinished`.
  The pod runs as a non-root user with a read-only root filesystem, so everything it writes goes to
  three volumes: /cache (model cache: an emptyDir with a size limit, or an existing PVC shared across
  jobs), /tmp (work files, checkpoints before upload, merged weights) and /dev/shm (memory-backed, for
  the data loader and NCCL).

Multi-node training is not built here; two ways to add it, both keeping this Job's pod template:
- an Indexed Job (`completionMode: Indexed`, `completions = parallelism = nodes`) plus a headless
  Service selecting its pods, each pod running
  `torchrun --nnodes=$NODES --nproc-per-node=$GPUS --node-rank=$JOB_COMPLETION_INDEX
  --rdzv-backend=c10d --rdzv-endpoint=sftops-<id>-0.sftops-<id>:29500 -m job run --spec ...`
  (pod 0 hosts the rendezvous; set `subdomain` on the pod template and `backoffLimitPerIndex`);
- or a Kubeflow Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1) with the torch-distributed runtime,
  `numNodes` and `resourcesPerNode`, which creates the JobSet, Services and torchrun env for you.
The chart's values sketch both (`multiNode`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from job.spec import ResourcesSpec, format_validation_error
from service.launchers.base import ENV_JOB_ID, ENV_JOB_TOKEN, ENV_PLANE_URL, ENV_SPEC, LaunchError

CONTAINER = "job"
SPEC_DIR = "/etc/sftops"
SPEC_KEY = "spec.json"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_KEY}"
TOKEN_KEY = "token"
CACHE_DIR = "/cache"
INPUT_ERROR_EXIT_CODE = 2  # job.errors.InputError: retrying cannot help
GPU_RESOURCE = "nvidia.com/gpu"
JOB_ID_LABEL = "sftops.dev/job-id"
USER_LABEL_PREFIX = "label.sftops.dev/"
JOB_ID_RE = re.compile(r"^[a-z][a-z0-9]{0,31}$")
_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class KubernetesSettings:
    """How the plane runs jobs on Kubernetes; each field is read from SFTOPS_K8S_<FIELD NAME IN CAPITALS>."""

    namespace: str = "default"
    image: str = "sftops:latest"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = field(default_factory=list)
    service_account: str | None = None  # the job's own ServiceAccount; the job never calls the API
    s3_secret_name: str | None = None  # an existing Secret with AWS_* keys, injected with envFrom
    plane_url: str | None = None  # the plane as pods reach it; None: the URL in the launch request
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    ttl_seconds_after_finished: int = 86400
    backoff_limit: int = 3
    cache_size: str = "50Gi"  # emptyDir size limit for /cache when cache_pvc is not set
    cache_pvc: str | None = None  # an existing PersistentVolumeClaim for /cache, shared across jobs
    shm_size: str = "8Gi"
    tmp_size: str | None = None
    run_as_user: int = 1000
    run_as_group: int = 1000
    termination_grace_seconds: int = 120  # time to save a checkpoint after SIGTERM
    request_timeout_seconds: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, Any] | None = None, prefix: str = "SFTOPS_K8S_") -> KubernetesSettings:
        """Read SFTOPS_K8S_* (or `prefix`*: pass app.config with prefix "K8S_"); raises ValueError naming the variable."""
        env = os.environ if env is None else env
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = {prefix + name.upper(): name for name in fields}
        unknown = sorted(k for k in env if k.startswith(prefix) and k not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        values = {}
        for var, name in known.items():
            if var in env and env[var] not in (None, ""):
                values[name] = _convert(var, env[var], fields[name].type)
        settings = cls(**values)
        if settings.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(
                f"{prefix}IMAGE_PULL_POLICY: must be Always, IfNotPresent or Never, got {settings.image_pull_policy!r}"
            )
        return settings


def _convert(var: str, value: Any, type_name: str) -> Any:
    """Turn an environment string (or an already-parsed config value) into the field's type."""
    try:
        if type_name == "int":
            if isinstance(value, bool) or (isinstance(value, str) and not value.strip().lstrip("-").isdigit()):
                raise ValueError(value)
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name.startswith("dict") or type_name.startswith("list[dict"):
            parsed = json.loads(value) if isinstance(value, str) else value
            want = dict if type_name.startswith("dict") else list
            if not isinstance(parsed, want):
                raise ValueError(f"expected a JSON {want.__name__}")
            return parsed
        if type_name == "list[str]":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        return str(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{var}: {value!r} is not a valid {type_name} ({e})") from e


def job_name(job_id: str) -> str:
    """The name of a job's Kubernetes Job and Secret."""
    return f"sftops-{job_id}"


def base_labels(job_id: str) -> dict[str, str]:
    """Labels every object of a job carries; `sftops.dev/job-id` is how pods are found."""
    return {
        "app.kubernetes.io/name": "sftops",
        "app.kubernetes.io/component": "job",
        "app.kubernetes.io/managed-by": "sftops",
        JOB_ID_LABEL: job_id,
    }


def sanitize_label_value(value: str) -> str:
    """Make any string a valid label value: [A-Za-z0-9_.-], at most 63 chars, alphanumeric at both ends."""
    return _LABEL_VALUE_BAD.sub("-", value)[:63].strip("-_.")


def job_labels(job_id: str, spec: Mapping[str, Any]) -> dict[str, str]:
    """Base labels plus the spec's labels under label.sftops.dev/ (spec keys are already valid label names)."""
    labels = {USER_LABEL_PREFIX + k: sanitize_label_value(str(v)) for k, v in (spec.get("labels") or {}).items()}
    return {**labels, **base_labels(job_id)}


def job_annotations(spec: Mapping[str, Any]) -> dict[str, str]:
    """The job name and the spec's labels unabridged (label values may have been sanitized)."""
    notes = {"sftops.dev/job-name": str(spec.get("name", ""))}
    if spec.get("labels"):
        notes["sftops.dev/labels"] = json.dumps(spec["labels"], sort_keys=True)
    return notes


def check_job_id(job_id: str) -> None:
    """Raise LaunchError unless the id is a valid sftops job id (it becomes part of object names)."""
    if not JOB_ID_RE.match(job_id):
        raise LaunchError(
            f"job id {job_id!r} must be lowercase letters and digits, start with a letter, at most 32 characters",
            reason="InvalidSpec",
        )


def parse_resources(spec: Mapping[str, Any]) -> ResourcesSpec:
    """The spec's resources section with defaults; raises LaunchError naming the field."""
    try:
        return ResourcesSpec.model_validate(spec.get("resources") or {})
    except ValidationError as e:
        raise LaunchError(format_validation_error(e, "spec: resources"), reason="InvalidSpec") from None


@functools.lru_cache(maxsize=1)
def _api_client() -> client.ApiClient:
    """One ApiClient used only to convert between dicts and models (it opens no connection)."""
    return client.ApiClient()


class _Raw:
    """Looks like an HTTP response to ApiClient.deserialize."""

    def __init__(self, obj: Any):
        """Hold obj as JSON text."""
        self.data = json.dumps(obj)


def to_model(obj: Any, klass: str, where: str) -> Any:
    """Turn a Kubernetes-style dict (camelCase keys) into a client model; raises LaunchError on unknown or bad fields."""
    try:
        model = _api_client().deserialize(_Raw(obj), klass)
    except (ValueError, TypeError, AttributeError) as e:
        raise LaunchError(f"{where}: not a valid {klass[2:]}: {e}", reason="InvalidSpec") from None
    back = _api_client().sanitize_for_serialization(model)
    if back != obj:
        # the client drops unknown keys silently; a typo would otherwise vanish without a word
        raise LaunchError(
            f"{where}: not a valid {klass[2:]}: {_first_difference(obj, back)} "
            "(use the Kubernetes field names, e.g. tolerationSeconds, nodeSelectorTerms)",
            reason="InvalidSpec",
        )
    return model


def _first_difference(given: Any, kept: Any, path: str = "") -> str:
    """Where a user dict and its round trip through the client's models first differ."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                return f"unknown field {path + key!r}"
            diff = _first_difference(value, kept[key], f"{path}{key}.")
            if diff:
                return diff
        return ""
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for i, (a, b) in enumerate(zip(given, kept)):
            diff = _first_difference(a, b, f"{path.rstrip('.')}[{i}].")
            if diff:
                return diff
        return ""
    if given != kept:
        return f"{path.rstrip('.') or 'value'}: {given!r} has the wrong type"
    return ""


def job_command(gpus: int) -> list[str]:
    """The container command: python, or torchrun with one process per GPU when there are several."""
    run = ["job", "run", "--spec", SPEC_PATH]
    if gpus > 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "-m", *run]
    return ["python", "-m", *run]


def merged_scheduling(
    resources: ResourcesSpec, settings: KubernetesSettings
) -> tuple[dict[str, str], list[client.V1Toleration], client.V1Affinity | None]:
    """Node selector (spec over defaults), tolerations (defaults, spec, GPU taint), affinity (spec replaces); raises LaunchError."""
    node_selector = {**settings.node_selector, **resources.node_selector}
    sourced = [(t, f"SFTOPS_K8S_TOLERATIONS[{i}]") for i, t in enumerate(settings.tolerations)]
    sourced += [(t, f"spec: resources.tolerations[{i}]") for i, t in enumerate(resources.tolerations)]
    if resources.gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t, _ in sourced):
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule so that only GPU work lands there
        sourced.append(({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}, "GPU toleration"))
    tolerations = [to_model(t, "V1Toleration", where) for t, where in sourced]
    if resources.affinity is not None:
        affinity = to_model(resources.affinity, "V1Affinity", "spec: resources.affinity")
    elif settings.affinity:
        affinity = to_model(settings.affinity, "V1Affinity", "SFTOPS_K8S_AFFINITY")
    else:
        affinity = None
    return node_selector, tolerations, affinity


def resource_requirements(resources: ResourcesSpec) -> client.V1ResourceRequirements | None:
    """GPUs as nvidia.com/gpu limits; cpu and memory with requests equal to limits (Guaranteed-like)."""
    limits: dict[str, str] = {}
    if resources.gpus > 0:
        limits[GPU_RESOURCE] = str(resources.gpus)
    if resources.cpu:
        limits["cpu"] = resources.cpu
    if resources.memory:
        limits["memory"] = resources.memory
    if not limits:
        return None
    requests = {k: v for k, v in limits.items() if k in ("cpu", "memory")}
    return client.V1ResourceRequirements(limits=limits, requests=requests or None)


def build_secret(job_id: str, spec: Mapping[str, Any], token: str, settings: KubernetesSettings) -> client.V1Secret:
    """The per-job Secret: the spec (mounted as a file) and the report token (env only)."""
    check_job_id(job_id)
    return client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=client.V1ObjectMeta(
            name=job_name(job_id),
            namespace=settings.namespace,
            labels=job_labels(job_id, spec),
            annotations=job_annotations(spec),
        ),
        type="Opaque",
        immutable=True,
        string_data={SPEC_KEY: json.dumps(spec, indent=2, sort_keys=True) + "\n", TOKEN_KEY: token},
    )


def _env(job_id: str, settings: KubernetesSettings) -> list[client.V1EnvVar]:
    """The job's environment: identity, plane URL, token by reference, and writable cache locations."""
    plain = {
        ENV_JOB_ID: job_id,
        ENV_PLANE_URL: settings.plane_url or "",
        ENV_SPEC: SPEC_PATH,
        "SFTOPS_MODEL_CACHE": CACHE_DIR,
        "HF_HOME": f"{CACHE_DIR}/hf",
        # the root filesystem is read-only: libraries that write under $HOME go to /tmp
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "PYTHONUNBUFFERED": "1",
    }
    env = [client.V1EnvVar(name=k, value=v) for k, v in plain.items()]
    env.append(
        client.V1EnvVar(
            name=ENV_JOB_TOKEN,
            value_from=client.V1EnvVarSource(
                secret_key_ref=client.V1SecretKeySelector(name=job_name(job_id), key=TOKEN_KEY)
            ),
        )
    )
    return env


def _volumes(job_id: str, settings: KubernetesSettings) -> tuple[list[client.V1Volume], list[client.V1VolumeMount]]:
    """The spec file, the model cache, /tmp and a memory-backed /dev/shm."""
    if settings.cache_pvc:
        cache = client.V1Volume(
            name="cache",
            persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name=settings.cache_pvc),
        )
    else:
        cache = client.V1Volume(name="cache", empty_dir=client.V1EmptyDirVolumeSource(size_limit=settings.cache_size))
    volumes = [
        client.V1Volume(
            name="spec",
            secret=client.V1SecretVolumeSource(
                secret_name=job_name(job_id),
                # only the spec becomes a file; the token stays out of the filesystem
                items=[client.V1KeyToPath(key=SPEC_KEY, path=SPEC_KEY)],
                default_mode=0o440,
            ),
        ),
        cache,
        client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource(size_limit=settings.tmp_size)),
        client.V1Volume(name="shm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit=settings.shm_size)),
    ]
    mounts = [
        client.V1VolumeMount(name="spec", mount_path=SPEC_DIR, read_only=True),
        client.V1VolumeMount(name="cache", mount_path=CACHE_DIR),
        client.V1VolumeMount(name="tmp", mount_path="/tmp"),
        client.V1VolumeMount(name="shm", mount_path="/dev/shm"),
    ]
    return volumes, mounts


def pod_failure_policy() -> client.V1PodFailurePolicy:
    """Preemption retries for free; exit code 2 (bad input) fails the Job without retrying."""
    return client.V1PodFailurePolicy(
        rules=[
            client.V1PodFailurePolicyRule(
                action="Ignore",
                on_pod_conditions=[client.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")],
            ),
            client.V1PodFailurePolicyRule(
                action="FailJob",
                on_exit_codes=client.V1PodFailurePolicyOnExitCodesRequirement(
                    container_name=CONTAINER, operator="In", values=[INPUT_ERROR_EXIT_CODE]
                ),
            ),
        ]
    )


def build_job(job_id: str, spec: Mapping[str, Any], settings: KubernetesSettings) -> client.V1Job:
    """The batch/v1 Job for a resolved spec; raises LaunchError (reason InvalidSpec) naming a bad field."""
    check_job_id(job_id)
    resources = parse_resources(spec)
    node_selector, tolerations, affinity = merged_scheduling(resources, settings)
    labels = job_labels(job_id, spec)
    volumes, mounts = _volumes(job_id, settings)
    container = client.V1Container(
        name=CONTAINER,
        image=settings.image,
        image_pull_policy=settings.image_pull_policy,
        command=job_command(resources.gpus),
        env=_env(job_id, settings),
        env_from=[client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=settings.s3_secret_name))]
        if settings.s3_secret_name
        else None,
        resources=resource_requirements(resources),
        volume_mounts=mounts,
        security_context=client.V1SecurityContext(
            run_as_non_root=True,
            run_as_user=settings.run_as_user,
            run_as_group=settings.run_as_group,
            read_only_root_filesystem=True,
            allow_privilege_escalation=False,
            capabilities=client.V1Capabilities(drop=["ALL"]),
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    pod = client.V1PodSpec(
        restart_policy="Never",  # required by podFailurePolicy; retries are the Job's, with a fresh pod
        containers=[container],
        volumes=volumes,
        service_account_name=settings.service_account,
        automount_service_account_token=False,
        enable_service_links=False,
        termination_grace_period_seconds=settings.termination_grace_seconds,
        priority_class_name=settings.priority_class_name,
        image_pull_secrets=[client.V1LocalObjectReference(name=n) for n in settings.image_pull_secrets] or None,
        node_selector=node_selector or None,
        tolerations=tolerations or None,
        affinity=affinity,
        security_context=client.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=settings.run_as_user,
            run_as_group=settings.run_as_group,
            fs_group=settings.run_as_group,
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(
            name=job_name(job_id), namespace=settings.namespace, labels=labels, annotations=job_annotations(spec)
        ),
        spec=client.V1JobSpec(
            backoff_limit=settings.backoff_limit,
            active_deadline_seconds=resources.deadline_seconds,
            ttl_seconds_after_finished=settings.ttl_seconds_after_finished,
            pod_failure_policy=pod_failure_policy(),
            # a replacement pod starts only once the old one is gone, so two never hold the GPUs at once
            pod_replacement_policy="Failed",
            completions=1,
            parallelism=1,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels, annotations=job_annotations(spec)), spec=pod
            ),
        ),
    )


def with_plane_url(settings: KubernetesSettings, plane_url: str) -> KubernetesSettings:
    """Settings whose plane_url is the configured one, else the given one."""
    return settings if settings.plane_url else dataclasses.replace(settings, plane_url=plane_url)
