"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk), checked as Kubernetes objects."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from kubernetes.client import ApiClient

ROOT = Path(__file__).resolve().parents[1]
# SFTOPS_CHART_DIR lets the same tests check a copy of the chart (e.g. one unpacked from the package).
CHART = Path(os.environ.get("SFTOPS_CHART_DIR", ROOT / "charts" / "sftops"))
SHARED_FILES = ("files/alerts.yaml", "files/dashboard.json")  # owned by the health area
FILES_WAIT_SECONDS = 240
RELEASE, NAMESPACE, JOBS_NAMESPACE = "ci", "sftops", "training"

# Every optional part switched on, with several replicas on PostgreSQL.
ALL_ON = {
    "replicaCount": 2,
    "database": {"type": "postgres", "postgres": {"secretName": "sftops-postgres", "secretKey": "url"}},
    "callbacks": {"secretName": "sftops-callbacks"},
    "imagePullSecrets": ["registry-cred"],
    "extraEnv": [{"name": "LOG_LEVEL", "value": "debug"}],
    "job": {
        "namespace": JOBS_NAMESPACE,
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "cache": {"existingClaim": "model-cache"},
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "2m"},
        "hosts": [{"host": "sftops.ci.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
        "tls": [{"secretName": "sftops-tls", "hosts": ["sftops.ci.example.com"]}],
    },
    "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
    "networkPolicy": {
        "enabled": True,
        "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 5432, "protocol": "TCP"}]}],
    },
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "dashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "LLM"}},
    },
}

# kind -> the kubernetes client model each rendered object must deserialize into.
MODELS = {
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "ServiceAccount": "V1ServiceAccount",
    "Role": "V1Role",
    "RoleBinding": "V1RoleBinding",
    "ConfigMap": "V1ConfigMap",
    "PersistentVolumeClaim": "V1PersistentVolumeClaim",
    "PodDisruptionBudget": "V1PodDisruptionBudget",
    "NetworkPolicy": "V1NetworkPolicy",
    "Ingress": "V1Ingress",
}


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (which Kubernetes would silently collapse)."""


def _no_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """Build a mapping, failing on a repeated key."""
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    repeated = {k for k in keys if keys.count(k) > 1}
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(repeated)}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    """The chart directory, once the health area's alerts.yaml and dashboard.json are in it."""
    deadline = time.monotonic() + FILES_WAIT_SECONDS
    while missing := [f for f in SHARED_FILES if not (CHART / f).is_file()]:
        if time.monotonic() > deadline:
            pytest.fail(f"{CHART}: {missing} still missing after {FILES_WAIT_SECONDS}s (the health area writes them)")
        time.sleep(5)
    helm.disable_logging()  # `fail` in lint mode logs to stderr; the tests read the results instead
    return CHART


@pytest.fixture(scope="session")
def chart(chart_dir):
    """The loaded chart (immutable, shared by every test)."""
    with helm.Chart.load(chart_dir) as loaded:
        yield loaded


def render(chart, values: dict | None = None) -> list[dict]:
    """Render like `helm install`, returning every object (NOTES.txt excluded)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(text, Loader=StrictLoader):
            if doc:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"
                objects.append(doc)
    return objects


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of a kind (and name)."""
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def lint_problems(chart_dir: Path, values: dict | None) -> list[dict]:
    """helm lint --strict findings above 'info' (the only info is Chart.yaml's optional icon)."""
    report = helm.lint(chart_dir, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    infos = [m for m in report["messages"] if m["severity"] <= 1]
    assert all(m["error"] == "icon is recommended" for m in infos), infos
    return [m for m in report["messages"] if m["severity"] > 1] + [{"error": e} for e in report["errors"]]


# ------------------------------------------------------------------------------------- lint and schema


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "everything-on"])
def test_lint_is_clean(chart_dir, chart, values):
    """helm lint --strict passes, and the templates render (lint alone tolerates `fail`)."""
    assert lint_problems(chart_dir, values) == []
    assert render(chart, values)


@pytest.mark.parametrize(
    ("values_yaml", "named"),
    [
        ("replicas: 2\n", "replicas"),  # a typo of replicaCount: unknown top-level key
        ("ingress:\n  enable: true\n", "enable"),
        ("replicaCount: two\n", "/replicaCount"),
        ("database:\n  type: mysql\n", "/database/type"),
        ("config:\n  auth: off-please\n", "/config/auth"),
        ("job:\n  multiNode:\n    nodes: 1\n", "/job/multiNode/nodes"),
        ("metrics:\n  serviceMonitor:\n    interval: soon\n", "/metrics/serviceMonitor/interval"),
    ],
)
def test_values_file_violating_the_schema_fails(chart_dir, chart, tmp_path, values_yaml, named):
    """A values file the schema rejects fails lint and install, and the error names the key."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(values_yaml)
    values = helm.values_from_yaml(values_file.read_text())
    problems = lint_problems(chart_dir, values)
    assert problems and any(named in p["error"] for p in problems), problems
    with pytest.raises(helm.HelmValuesError, match=re.escape(named)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_defaults_satisfy_the_schema(chart):
    """values.yaml itself validates (so `helm install` with no values works)."""
    chart.validate_schema(chart.values)
    assert chart.schema["additionalProperties"] is False
    assert set(chart.schema["properties"]) - {"global"} == set(chart.values)


# ------------------------------------------------------------------------------------- rendering fails


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "replicaCount=2 needs database.type=postgres: SQLite on one volume serves a single replica"),
        ({"database": {"type": "postgres"}}, "database.type=postgres needs database.postgres.secretName"),
        ({"auth": {"tokensSecret": ""}}, "config.auth=enabled needs auth.tokensSecret"),
        ({"job": {"multiNode": {"enabled": True}}}, "multi-node training is not implemented yet"),
    ],
)
def test_impossible_combinations_fail_rendering(chart, values, message):
    """Values that cannot work stop the install with a message that says what to change."""
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ------------------------------------------------------------------------------------- the objects


def test_default_install_objects(chart):
    """A default install: the plane, its config, storage, identity, RBAC and the dashboard."""
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render(chart))
    assert kinds == [
        ("ConfigMap", "ci-sftops"),
        ("ConfigMap", "ci-sftops-dashboard"),
        ("Deployment", "ci-sftops"),
        ("PersistentVolumeClaim", "ci-sftops-data"),
        ("Role", "ci-sftops"),
        ("RoleBinding", "ci-sftops"),
        ("Service", "ci-sftops"),
        ("ServiceAccount", "ci-sftops"),
        ("ServiceAccount", "ci-sftops-job"),
    ]


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "everything-on"])
def test_objects_parse_into_kubernetes_models(chart, values):
    """Each built-in object deserializes into its client model and back without losing a field."""
    client = ApiClient()
    seen = set()
    for obj in render(chart, values):
        if obj["kind"] not in MODELS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["kind"]
            continue
        model = client._ApiClient__deserialize(obj, MODELS[obj["kind"]])
        # A misspelled or misplaced field is dropped by the model: the round trip exposes it.
        assert client.sanitize_for_serialization(model) == obj, f"{obj['kind']} {obj['metadata']['name']}"
        seen.add(obj["kind"])
    expected = set(MODELS) - ({"PersistentVolumeClaim"} if values else {"Ingress", "NetworkPolicy", "PodDisruptionBudget"})
    assert seen == expected


def test_everything_on_adds_the_optional_objects(chart):
    """Ingress, NetworkPolicy, PDB and the monitoring objects appear; PostgreSQL replaces the PVC."""
    kinds = {o["kind"] for o in render(chart, ALL_ON)}
    assert {"Ingress", "NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"} <= kinds
    assert "PersistentVolumeClaim" not in kinds


def plane_container(deployment: dict) -> dict:
    """The control-plane container of the Deployment."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_runs_gunicorn_hardened(chart):
    """Non-root, read-only root fs, no capabilities, RuntimeDefault seccomp; probes on /healthz and /readyz."""
    deployment = find(render(chart), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = plane_container(deployment)
    assert container["command"] == ["gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_deployment_writable_paths_are_volumes(chart):
    """With a read-only root fs, /tmp, the Prometheus multiprocess dir and /data are volumes."""
    deployment = find(render(chart), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = plane_container(deployment)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes), "every mount needs a volume"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # gunicorn.conf.py deletes and recreates the directory at start: it must sit below a mount point.
    metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    assert str(metrics_dir) not in mounts
    assert "emptyDir" in volumes[mounts[str(metrics_dir.parent)]]
    assert volumes[mounts["/data"]]["persistentVolumeClaim"] == {"claimName": "ci-sftops-data"}


def test_sqlite_is_one_pod_on_a_kept_volume(chart):
    """SQLite: a Recreate rollout (never two pods on the file) and a PVC that survives uninstall."""
    objects = render(chart)
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pvc = find(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "SFTOPS_DATABASE_URL" not in find(objects, "ConfigMap", "ci-sftops")["data"]


def test_postgres_url_comes_from_a_secret(chart):
    """Several replicas: the database URL is read from the named Secret, never put in the ConfigMap."""
    objects = render(chart, ALL_ON)
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in plane_container(deployment)["env"]}
    assert env["SFTOPS_DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "sftops-postgres", "key": "url"}}
    assert env["SFTOPS_CALLBACK_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": "sftops-callbacks", "key": "callback-secret"}
    }
    assert env["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "debug"}
    data = find(objects, "ConfigMap", "ci-sftops")["data"]
    assert not any("postgres" in value for value in data.values())
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]


def test_tokens_file_is_mounted_from_its_secret(chart):
    """SFTOPS_TOKENS_FILE points into the read-only mount of the tokens Secret."""
    objects = render(chart, {"auth": {"tokensSecret": "ci-tokens", "tokensKey": "tokens.json"}})
    deployment = find(objects, "Deployment")
    config = find(objects, "ConfigMap", "ci-sftops")["data"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in plane_container(deployment)["volumeMounts"] if m["name"] == "tokens")
    assert mount["readOnly"] is True
    assert volumes["tokens"]["secret"]["secretName"] == "ci-tokens"
    (item,) = volumes["tokens"]["secret"]["items"]
    assert config["SFTOPS_TOKENS_FILE"] == f"{mount['mountPath']}/{item['path']}"
    assert item == {"key": "tokens.json", "path": "tokens.json"}
    assert config["SFTOPS_AUTH"] == "enabled"


def test_auth_disabled_mounts_no_tokens(chart):
    """config.auth=disabled: no tokens volume and no tokens file setting."""
    objects = render(chart, {"config": {"auth": "disabled"}})
    deployment = find(objects, "Deployment")
    assert "tokens" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config = find(objects, "ConfigMap", "ci-sftops")["data"]
    assert config["SFTOPS_AUTH"] == "disabled" and "SFTOPS_TOKENS_FILE" not in config


def test_config_change_rolls_the_pods(chart):
    """The pod template carries a checksum of the ConfigMap, so `helm upgrade` restarts the plane."""
    before = find(render(chart), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = find(render(chart, {"config": {"maxConcurrentJobs": 9}}), "Deployment")
    assert after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before


def test_configmap_holds_the_settings_as_strings(chart):
    """Settings are SFTOPS_* strings; numbers keep their digits; JSON settings parse; the launcher is kubernetes."""
    data = find(render(chart, ALL_ON), "ConfigMap", "ci-sftops")["data"]
    assert all(k.startswith("SFTOPS_") and isinstance(v, str) for k, v in data.items())
    assert data["SFTOPS_LAUNCHER"] == "kubernetes"
    assert data["SFTOPS_MAX_BODY_BYTES"] == "1048576"  # not 1.048576e+06
    assert data["SFTOPS_MAX_CONCURRENT_JOBS"] == "4"
    assert data["SFTOPS_K8S_NAMESPACE"] == JOBS_NAMESPACE
    assert data["SFTOPS_K8S_IMAGE"] == "sftops/job:0.1.0"
    assert data["SFTOPS_K8S_SERVICE_ACCOUNT"] == "ci-sftops-job"
    assert data["SFTOPS_K8S_S3_SECRET_NAME"] == "sftops-s3"
    assert data["SFTOPS_K8S_CACHE_PVC"] == "model-cache"
    assert data["SFTOPS_K8S_IMAGE_PULL_SECRETS"] == "registry-cred"
    assert json.loads(data["SFTOPS_K8S_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    assert json.loads(data["SFTOPS_K8S_TOLERATIONS"]) == ALL_ON["job"]["tolerations"]
    assert json.loads(data["SFTOPS_K8S_AFFINITY"]) == {}
    plane_url = "http://ci-sftops.sftops.svc.cluster.local:8000"
    assert data["SFTOPS_PUBLIC_URL"] == data["SFTOPS_K8S_PLANE_URL"] == plane_url


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "everything-on"])
def test_settings_are_the_ones_the_plane_and_launcher_read(chart, tmp_path, monkeypatch, values):
    """The ConfigMap, read the way create_app and create_launcher read the environment, configures both."""
    from flask import Config

    from service.config import SETTINGS, normalize
    from service.launchers.k8s_manifest import KubernetesSettings

    data = find(render(chart, values), "ConfigMap", "ci-sftops")["data"]
    for name in [n for n in os.environ if n.startswith("SFTOPS_")]:
        monkeypatch.delenv(name)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    config = Config(str(tmp_path))
    config.from_prefixed_env("SFTOPS")
    normalize(config)  # raises on a value the plane cannot use

    gunicorn_reads = set(re.findall(r"SFTOPS_[A-Z_]+", (ROOT / "service" / "gunicorn.conf.py").read_text()))
    known = {s.env for s in SETTINGS if not s.key.endswith("*")} | gunicorn_reads
    assert {n for n in data if not n.startswith("SFTOPS_K8S_")} <= known
    # Exactly what create_launcher passes on; unknown SFTOPS_K8S_* names are refused there.
    k8s = KubernetesSettings.from_env({k: v for k, v in config.items() if k.startswith("K8S_")}, prefix="K8S_")
    job = (values or {}).get("job", {})
    assert k8s.namespace == job.get("namespace", NAMESPACE)
    assert k8s.image == "sftops/job:0.1.0"
    assert k8s.service_account == "ci-sftops-job"
    assert k8s.s3_secret_name == "sftops-s3"
    assert k8s.plane_url == config["PUBLIC_URL"] == "http://ci-sftops.sftops.svc.cluster.local:8000"
    assert k8s.node_selector == job.get("nodeSelector", {})
    assert k8s.tolerations == job.get("tolerations", [])
    if values:
        assert k8s.cache_pvc == "model-cache"
    else:
        assert (k8s.cache_pvc, k8s.cache_size) == (None, "100Gi")
    assert k8s.image_pull_secrets == (values or {}).get("imagePullSecrets", [])
    assert (k8s.backoff_limit, k8s.ttl_seconds_after_finished, k8s.shm_size) == (3, 86400, "8Gi")
    assert config["LAUNCHER"] == "kubernetes" and config["MAX_BODY_BYTES"] == 1048576


def test_extra_settings_pass_through(chart):
    """config.extra adds any other SFTOPS_* setting, upper-cased and stringified."""
    data = find(render(chart, {"config": {"extra": {"REPORT_GRACE_SECONDS": 30}}}), "ConfigMap", "ci-sftops")["data"]
    assert data["SFTOPS_REPORT_GRACE_SECONDS"] == "30"


def test_role_is_least_privilege_in_the_jobs_namespace(chart):
    """The plane may run Jobs, read pods and logs, and manage Secrets: nothing else, only where jobs run."""
    objects = render(chart, ALL_ON)
    role = find(objects, "Role")
    assert role["metadata"]["namespace"] == JOBS_NAMESPACE
    rules = {(g, r): sorted(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {
        ("batch", "jobs"): ["create", "delete", "get", "list", "watch"],
        ("", "pods"): ["get", "list", "watch"],
        ("", "pods/log"): ["get", "list", "watch"],
        ("", "secrets"): ["create", "delete", "get", "patch"],
    }
    binding = find(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == JOBS_NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    plane_account = find(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": plane_account, "namespace": NAMESPACE}]
    job_account = find(objects, "ServiceAccount", "ci-sftops-job")
    assert job_account["metadata"]["namespace"] == JOBS_NAMESPACE
    assert job_account["automountServiceAccountToken"] is False


def test_service_monitor_scrapes_the_service(chart):
    """The ServiceMonitor's selector matches the Service and names its port and /metrics."""
    objects = render(chart, ALL_ON)
    service, monitor = find(objects, "Service"), find(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_is_the_alerts_file(chart, chart_dir):
    """The PrometheusRule's groups are files/alerts.yaml's groups, unchanged."""
    rule = find(render(chart, ALL_ON), "PrometheusRule")
    alerts = yaml.safe_load((chart_dir / "files" / "alerts.yaml").read_text())
    assert alerts["groups"], "files/alerts.yaml has no groups"
    assert rule["spec"]["groups"] == alerts["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_rendered_rules_pass_promtool(chart, tmp_path):
    """The rules as the PrometheusRule carries them (re-serialized by Helm) still load in Prometheus."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool not found: `make system-deps` installs Debian's prometheus package")
    rule = find(render(chart, ALL_ON), "PrometheusRule")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("dashboard", "label", "namespace"),
    [
        ({}, ("grafana_dashboard", "1"), NAMESPACE),
        ({"labelKey": "dashboards", "labelValue": "sftops", "namespace": "grafana"}, ("dashboards", "sftops"), "grafana"),
    ],
)
def test_dashboard_configmap_is_the_dashboard_file(chart, chart_dir, dashboard, label, namespace):
    """The ConfigMap holds files/dashboard.json unchanged, labelled for the Grafana sidecar."""
    configmap = find(render(chart, {"metrics": {"dashboard": dashboard}}), "ConfigMap", "ci-sftops-dashboard")
    assert configmap["metadata"]["labels"][label[0]] == label[1]
    assert configmap["metadata"]["namespace"] == namespace
    (text,) = configmap["data"].values()
    assert json.loads(text) == json.loads((chart_dir / "files" / "dashboard.json").read_text())


@pytest.mark.parametrize("part", ["serviceMonitor", "prometheusRule", "dashboard"])
def test_each_monitoring_part_switches_off(chart, part):
    """Each monitoring object can be turned off on its own."""
    values = copy.deepcopy(ALL_ON)
    values["metrics"][part]["enabled"] = False
    names = {(o["kind"], o["metadata"]["name"]) for o in render(chart, values)}
    gone = {"serviceMonitor": ("ServiceMonitor", "ci-sftops"), "prometheusRule": ("PrometheusRule", "ci-sftops"),
            "dashboard": ("ConfigMap", "ci-sftops-dashboard")}
    assert gone[part] not in names
    assert set(gone.values()) - {gone[part]} <= names


def test_network_policy_admits_job_pods_and_named_peers(chart):
    """Only the jobs (to report) and the configured peers reach port 8000; egress keeps DNS."""
    objects = render(chart, ALL_ON)
    policy = find(objects, "NetworkPolicy")
    deployment = find(objects, "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    jobs, nginx = rule["from"]
    assert jobs["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": JOBS_NAMESPACE}}
    from service.launchers.k8s_manifest import job_labels

    # The launcher's labels on every job pod, whatever the job's own labels are.
    assert jobs["podSelector"]["matchLabels"].items() <= job_labels("abc1", {"labels": {"team": "nlp"}}).items()
    assert nginx == ALL_ON["networkPolicy"]["ingressFrom"][0]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    dns, postgres = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert postgres == ALL_ON["networkPolicy"]["egress"][0]


def test_pdb_and_ingress_point_at_the_plane(chart):
    """The PDB selects the plane's pods; the Ingress routes to the Service's http port with TLS."""
    objects = render(chart, ALL_ON)
    pdb, ingress, service = find(objects, "PodDisruptionBudget"), find(objects, "Ingress"), find(objects, "Service")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": service["spec"]["selector"]}}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["sftops.ci.example.com"], "secretName": "sftops-tls"}]
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}


def test_packaged_chart_renders_the_same(chart_dir, chart, tmp_path):
    """`helm package` keeps the alerts and dashboard (not promtool's tests) and renders identically."""
    archive = helm.package(chart_dir, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        names = {f["name"] for f in packaged.files}
        assert {"files/alerts.yaml", "files/dashboard.json"} <= names
        assert "files/alerts_test.yaml" not in names
        assert render(packaged, ALL_ON) == render(chart, ALL_ON)


# ------------------------------------------------------------------------------------- docs


def test_notes_explain_a_first_job(chart):
    """NOTES.txt shows port-forward, the tokens Secret, `sftops submit` and curl."""
    notes = chart.render(None, name=RELEASE, namespace=NAMESPACE)["sftops/templates/NOTES.txt"]
    assert "kubectl -n sftops port-forward svc/ci-sftops 8000:8000" in notes
    assert "create secret generic sftops-tokens" in notes
    assert "sftops submit job.yaml" in notes
    assert 'curl -fsS -X POST "$SFTOPS_URL/v1/jobs"' in notes
    with_ingress = chart.render(ALL_ON, name=RELEASE, namespace=NAMESPACE)["sftops/templates/NOTES.txt"]
    assert "export SFTOPS_URL=https://sftops.ci.example.com" in with_ingress
    assert "port-forward" not in with_ingress


def test_every_value_is_documented(chart_dir):
    """Each key in values.yaml has a comment right above it.

    A `# --` comment documents the key's whole value (its children are data, like `resources`);
    a plain comment heads a section whose keys are documented one by one, down to the schema's leaves.
    """
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    lines = (chart_dir / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, dict]] = [(-1, schema)]
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else {}
        props = parent.get("properties", {}) if parent.get("additionalProperties") is False else {}
        if key in props:
            comment = lines[i - 1].strip()
            if not comment.startswith("#"):
                undocumented.append(f"values.yaml:{i + 1}: {key}")
            stack.append((indent, {} if comment.startswith("# --") else props[key]))
        else:
            stack.append((indent, {}))
    assert undocumented == []


def test_multi_node_is_sketched_but_refused(chart_dir):
    """job.multiNode documents the Indexed Job + torchrun plan and says it is not implemented yet."""
    text = (chart_dir / "values.yaml").read_text()
    sketch = text[text.index("# Multi-node training") : text.index("multiNode:")]
    assert "NOT IMPLEMENTED YET" in sketch
    for idea in ("Indexed Job", "torchrun", "--rdzv-backend=c10d", "TrainJob"):
        assert idea in sketch
