"""The pure Job/Secret builders: valid client models, secrets kept out of the Job, scheduling merged over defaults."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes import client

from service.launchers.base import LaunchError
from service.launchers.k8s_manifest import (
    KubernetesSettings,
    build_job,
    build_secret,
    sanitize_label_value,
)

TOKEN = "sft_" + "SecretJobTokenValue0123456789abcdefghijklmno"
BASE = {"name": "tune-1", "base_model": "s3://models/smol/", "dataset": "s3://data/d.jsonl", "output": "s3://out/x/"}
SETTINGS = KubernetesSettings(
    namespace="ml",
    image="registry.example/sftops:1.2",
    image_pull_secrets=["regcred"],
    s3_secret_name="s3-creds",
    plane_url="http://sftops.ml.svc:8000",
    node_selector={"pool": "gpu", "zone": "a"},
    tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
)
SPECS = {
    "defaults": {**BASE},
    "cpu-only": {**BASE, "resources": {"gpus": 0, "cpu": "4", "memory": "16Gi"}},
    "four-gpus": {
        **BASE,
        "labels": {"team": "search ranking/v2", "ci.run": "12345"},
        "resources": {
            "gpus": 4,
            "memory": "200Gi",
            "node_selector": {"zone": "b"},
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}],
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}}]}},
            "deadline_seconds": 7200,
        },
    },
}
API = client.ApiClient()


class _Raw:
    """Looks like an HTTP response to ApiClient.deserialize."""

    def __init__(self, obj):
        """Hold obj as JSON text."""
        self.data = json.dumps(obj)


def as_dict(model) -> dict:
    """A model as the JSON the API server would receive."""
    return API.sanitize_for_serialization(model)


def container(job: client.V1Job) -> client.V1Container:
    """The job's only container."""
    (c,) = job.spec.template.spec.containers
    return c


@pytest.mark.parametrize("case", SPECS)
def test_round_trips_through_client_models_and_yaml(case):
    """The Job and Secret survive serialize -> deserialize unchanged, and dump as YAML that reloads equal."""
    for obj, klass in ((build_job("abc1", SPECS[case], SETTINGS), "V1Job"),
                       (build_secret("abc1", SPECS[case], TOKEN, SETTINGS), "V1Secret")):
        data = as_dict(obj)
        assert API.deserialize(_Raw(data), klass) == obj
        assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert as_dict(build_job("abc1", SPECS[case], SETTINGS))["apiVersion"] == "batch/v1"


@pytest.mark.parametrize("case", SPECS)
def test_secrets_stay_out_of_the_job(case):
    """The token is only a secretKeyRef; the spec is a projected file; S3 creds come by envFrom."""
    job = build_job("abc1", SPECS[case], SETTINGS)
    text = json.dumps(as_dict(job))
    assert TOKEN not in text
    env = {e.name: e for e in container(job).env}
    ref = env["SFTOPS_JOB_TOKEN"].value_from.secret_key_ref
    assert (env["SFTOPS_JOB_TOKEN"].value, ref.name, ref.key) == (None, "sftops-abc1", "token")
    assert not any(e.name.startswith("AWS_") for e in container(job).env)
    assert [f.secret_ref.name for f in container(job).env_from] == ["s3-creds"]
    spec_volume = next(v for v in job.spec.template.spec.volumes if v.name == "spec")
    assert [(i.key, i.path) for i in spec_volume.secret.items] == [("spec.json", "spec.json")]

    secret = build_secret("abc1", SPECS[case], TOKEN, SETTINGS)
    assert secret.string_data["token"] == TOKEN
    assert json.loads(secret.string_data["spec.json"]) == SPECS[case]
    assert (secret.metadata.name, secret.metadata.namespace, secret.immutable) == ("sftops-abc1", "ml", True)


@pytest.mark.parametrize("case", SPECS)
def test_environment_command_and_volumes(case):
    """Job identity and caches in env; python (or torchrun for >1 GPU); writable /cache, /tmp and a memory /dev/shm."""
    job = build_job("abc1", SPECS[case], SETTINGS)
    c = container(job)
    env = {e.name: e.value for e in c.env}
    assert env["SFTOPS_JOB_ID"] == "abc1"
    assert env["SFTOPS_PLANE_URL"] == "http://sftops.ml.svc:8000"
    assert (env["HF_HOME"], env["SFTOPS_MODEL_CACHE"]) == ("/cache/hf", "/cache")
    gpus = SPECS[case].get("resources", {}).get("gpus", 1)
    run = ["job", "run", "--spec", "/etc/sftops/spec.json"]
    expected = ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "-m", *run] if gpus > 1 else ["python", "-m", *run]
    assert c.command == expected
    mounts = {m.mount_path: m for m in c.volume_mounts}
    assert set(mounts) == {"/etc/sftops", "/cache", "/tmp", "/dev/shm"}
    assert mounts["/etc/sftops"].read_only is True
    volumes = {v.name: v for v in job.spec.template.spec.volumes}
    assert (volumes["shm"].empty_dir.medium, volumes["shm"].empty_dir.size_limit) == ("Memory", "8Gi")
    assert volumes["cache"].empty_dir.size_limit == "50Gi"
    assert volumes["tmp"].empty_dir is not None


@pytest.mark.parametrize(
    ("case", "limits", "requests"),
    [
        ("defaults", {"nvidia.com/gpu": "1"}, None),
        ("cpu-only", {"cpu": "4", "memory": "16Gi"}, {"cpu": "4", "memory": "16Gi"}),
        ("four-gpus", {"nvidia.com/gpu": "4", "memory": "200Gi"}, {"memory": "200Gi"}),
    ],
)
def test_resources(case, limits, requests):
    """GPUs as nvidia.com/gpu limits; cpu/memory requests equal their limits."""
    res = container(build_job("abc1", SPECS[case], SETTINGS)).resources
    assert (res.limits, res.requests) == (limits, requests)


@pytest.mark.parametrize("case", SPECS)
def test_security_context(case):
    """Non-root, read-only root, no capabilities, no privilege escalation, RuntimeDefault seccomp; no API token."""
    job = build_job("abc1", SPECS[case], SETTINGS)
    pod = job.spec.template.spec
    sc = container(job).security_context
    assert (sc.run_as_non_root, sc.run_as_user, sc.read_only_root_filesystem, sc.allow_privilege_escalation) == (
        True, 1000, True, False)
    assert sc.capabilities.drop == ["ALL"]
    assert sc.seccomp_profile.type == "RuntimeDefault"
    assert (pod.security_context.run_as_non_root, pod.security_context.run_as_user) == (True, 1000)
    assert pod.security_context.seccomp_profile.type == "RuntimeDefault"
    assert pod.automount_service_account_token is False
    assert [s.name for s in pod.image_pull_secrets] == ["regcred"]


@pytest.mark.parametrize("case", SPECS)
def test_failure_policy_and_lifecycle(case):
    """Exit code 2 fails at once, disruption is ignored, restartPolicy Never; backoff, TTL and deadline set."""
    job = build_job("abc1", SPECS[case], SETTINGS)
    rules = as_dict(job)["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "job", "operator": "In", "values": [2]}},
    ]
    assert job.spec.template.spec.restart_policy == "Never"
    assert container(job).name == "job"
    assert (job.spec.backoff_limit, job.spec.ttl_seconds_after_finished) == (3, 86400)
    assert job.spec.active_deadline_seconds == SPECS[case].get("resources", {}).get("deadline_seconds")


def test_labels_and_annotations():
    """Standard labels, the job id, and the spec's labels sanitized under label.sftops.dev/ (originals annotated)."""
    job = build_job("abc1", SPECS["four-gpus"], SETTINGS)
    expected = {
        "app.kubernetes.io/name": "sftops",
        "app.kubernetes.io/component": "job",
        "app.kubernetes.io/managed-by": "sftops",
        "sftops.dev/job-id": "abc1",
        "label.sftops.dev/team": "search-ranking-v2",
        "label.sftops.dev/ci.run": "12345",
    }
    assert job.metadata.name == "sftops-abc1"
    assert job.metadata.labels == expected
    assert job.spec.template.metadata.labels == expected
    assert json.loads(job.metadata.annotations["sftops.dev/labels"]) == SPECS["four-gpus"]["labels"]
    assert job.metadata.annotations["sftops.dev/job-name"] == "tune-1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("ok", "ok"), ("a b/c", "a-b-c"), ("-x-", "x"), ("x" * 80, "x" * 63), ("é", ""), ("v1.2_rc", "v1.2_rc")],
)
def test_sanitize_label_value(value, expected):
    """Any string becomes a valid label value."""
    assert sanitize_label_value(value) == expected


def test_scheduling_merged_over_defaults():
    """Node selector: spec wins per key; tolerations: defaults, spec, then the GPU taint; affinity: spec replaces."""
    pod = build_job("abc1", SPECS["four-gpus"], SETTINGS).spec.template.spec
    assert pod.node_selector == {"pool": "gpu", "zone": "b"}
    assert [t.key for t in pod.tolerations] == ["dedicated", "spot", "nvidia.com/gpu"]
    assert pod.tolerations[1].toleration_seconds == 60
    assert pod.affinity.node_affinity.required_during_scheduling_ignored_during_execution is None
    assert pod.affinity.node_affinity.preferred_during_scheduling_ignored_during_execution[0].weight == 10

    default_pod = build_job("abc1", SPECS["defaults"], SETTINGS).spec.template.spec
    assert default_pod.node_selector == {"pool": "gpu", "zone": "a"}
    assert [t.key for t in default_pod.tolerations] == ["dedicated", "nvidia.com/gpu"]
    terms = default_pod.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
    assert terms[0].match_expressions[0].values == ["a100"]

    cpu_pod = build_job("abc1", SPECS["cpu-only"], KubernetesSettings()).spec.template.spec
    assert (cpu_pod.node_selector, cpu_pod.tolerations, cpu_pod.affinity) == (None, None, None)


def test_cache_on_an_existing_pvc():
    """With cache_pvc the model cache is that claim, shared across jobs."""
    job = build_job("abc1", BASE, KubernetesSettings(cache_pvc="model-cache"))
    cache = next(v for v in job.spec.template.spec.volumes if v.name == "cache")
    assert (cache.persistent_volume_claim.claim_name, cache.empty_dir) == ("model-cache", None)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"tolerations": [{"key": "a", "toleration_seconds": 5}]},
         "spec: resources.tolerations[0]: not a valid Toleration: unknown field 'toleration_seconds'"),
        ({"affinity": {"nodeAffinity": {"requiredDuringScheduling": {}}}},
         "spec: resources.affinity: not a valid Affinity: unknown field 'nodeAffinity.requiredDuringScheduling'"),
        ({"gpus": 99}, "spec: resources: gpus: Input should be less than or equal to 16"),
    ],
)
def test_bad_scheduling_fields_name_the_field(resources, message):
    """A typo in a Kubernetes field is an InvalidSpec LaunchError naming it, not silently dropped."""
    with pytest.raises(LaunchError) as info:
        build_job("abc1", {**BASE, "resources": resources}, SETTINGS)
    assert str(info.value).startswith(message)
    assert info.value.reason == "InvalidSpec"


@pytest.mark.parametrize("job_id", ["", "Abc", "1abc", "a-b", "a" * 33])
def test_bad_job_id(job_id):
    """Ids that cannot be part of an object name are refused."""
    with pytest.raises(LaunchError, match="job id"):
        build_job(job_id, BASE, SETTINGS)


def test_settings_from_env():
    """SFTOPS_K8S_* strings are parsed into typed settings."""
    settings = KubernetesSettings.from_env({
        "SFTOPS_K8S_NAMESPACE": "ml",
        "SFTOPS_K8S_IMAGE": "reg/sftops:2",
        "SFTOPS_K8S_IMAGE_PULL_SECRETS": "a, b",
        "SFTOPS_K8S_S3_SECRET_NAME": "s3",
        "SFTOPS_K8S_NODE_SELECTOR": '{"pool": "gpu"}',
        "SFTOPS_K8S_TOLERATIONS": '[{"key": "x", "operator": "Exists"}]',
        "SFTOPS_K8S_BACKOFF_LIMIT": "5",
        "SFTOPS_K8S_TTL_SECONDS_AFTER_FINISHED": "60",
        "SFTOPS_K8S_CACHE_PVC": "cache",
        "SFTOPS_K8S_REQUEST_TIMEOUT_SECONDS": "2.5",
        "SFTOPS_K8S_SERVICE_ACCOUNT": "",
        "OTHER": "ignored",
    })
    assert (settings.namespace, settings.image, settings.image_pull_secrets) == ("ml", "reg/sftops:2", ["a", "b"])
    assert (settings.s3_secret_name, settings.node_selector) == ("s3", {"pool": "gpu"})
    assert settings.tolerations == [{"key": "x", "operator": "Exists"}]
    assert (settings.backoff_limit, settings.ttl_seconds_after_finished) == (5, 60)
    assert (settings.cache_pvc, settings.request_timeout_seconds, settings.service_account) == ("cache", 2.5, None)
    assert KubernetesSettings.from_env({}) == KubernetesSettings()


def test_settings_from_flask_style_config():
    """Flask's from_prefixed_env parses JSON values; prefix K8S_ reads app.config."""
    settings = KubernetesSettings.from_env({"K8S_BACKOFF_LIMIT": 2, "K8S_NODE_SELECTOR": {"a": "b"}}, prefix="K8S_")
    assert (settings.backoff_limit, settings.node_selector) == (2, {"a": "b"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SFTOPS_K8S_BACKOFF_LIMIT": "three"}, "SFTOPS_K8S_BACKOFF_LIMIT: 'three' is not a valid int"),
        ({"SFTOPS_K8S_NODE_SELECTOR": "[1]"}, "SFTOPS_K8S_NODE_SELECTOR: '[1]' is not a valid dict"),
        ({"SFTOPS_K8S_TOLERATIONS": "{bad"}, "SFTOPS_K8S_TOLERATIONS: '{bad' is not a valid list"),
        ({"SFTOPS_K8S_NAMESPCE": "ml"}, "unknown setting(s) ['SFTOPS_K8S_NAMESPCE']"),
        ({"SFTOPS_K8S_IMAGE_PULL_POLICY": "Sometimes"}, "SFTOPS_K8S_IMAGE_PULL_POLICY: must be Always"),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    """A bad or misspelt variable is a ValueError naming it."""
    with pytest.raises(ValueError) as info:
        KubernetesSettings.from_env(env)
    assert str(info.value).startswith(message)
