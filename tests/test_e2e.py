"""The whole path, every part real: CLI -> gunicorn plane -> local launcher -> `python -m job run` -> S3 on loopback.

A tiny random-weight model and a small generated dataset keep it to a minute or two on 2 cores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest
import requests
import yaml

from service import cli
from tests.plugins.plane import ROOT


def make_dataset_module():
    """examples/make_dataset.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_dataset", ROOT / "examples" / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_submit_train_and_publish_through_the_plane(s3, tiny_model, plane_factory, tmp_path, monkeypatch, capsys):
    # inputs in S3, as a user would put them there
    for path in sorted(tiny_model.iterdir()):
        if path.is_file():
            s3.put(f"models/tiny/{path.name}", path.read_bytes())
    gen = make_dataset_module()
    rows = gen.generate(160, seed=3)
    s3.put("data/tickets.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "e2e-tickets",
        "base_model": s3.uri("models/tiny/"),
        "dataset": s3.uri("data/tickets.jsonl"),
        "output": s3.uri("runs/e2e/"),
        "training": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3, "max_length": 96},
        "verify": {"max_new_tokens": 8, "batch_size": 8},
        "resources": {"gpus": 0},
        "labels": {"suite": "e2e"},
    }
    spec_path = tmp_path / "e2e.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    # the plane's environment (and so the job's) carries the S3 endpoint and credentials set by the s3 fixture
    plane = plane_factory(LAUNCHER="local", RECONCILE_INTERVAL=0.5, MODEL_CACHE=str(tmp_path / "cache"))
    monkeypatch.setenv("SFTOPS_URL", plane.url)
    monkeypatch.setenv("SFTOPS_TOKEN", plane.tokens["admin"])

    started = time.monotonic()
    code = cli.main(["submit", str(spec_path), "--wait", "--timeout", "12m", "--interval", "0.5"])
    out, err = capsys.readouterr()
    job_id = out.splitlines()[0]
    log = plane.data_dir / "jobs" / job_id / "job.log"
    assert code == 0, f"{err}\n{out}\n--- job.log ---\n{log.read_text()[-4000:] if log.exists() else ''}"
    assert "\r" not in out
    assert "[running]" in out, out  # 6 tiny steps may all fall between two polls: no step count asserted
    assert f"job {job_id} (e2e-tickets): succeeded" in out
    print(f"e2e job took {time.monotonic() - started:.0f}s")

    # artifacts in S3 with a complete manifest: every listed file is there with its size, the manifest is last
    keys = s3.keys("runs/e2e/")
    for expected in ("manifest.json", "report.json", "report.md", "loss.png", "spec.json", "metrics.jsonl",
                     "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
                     "merged/model.safetensors", "splits/train.jsonl"):
        assert f"runs/e2e/{expected}" in keys, (expected, keys)
    assert not [k for k in keys if k.startswith("runs/e2e/checkpoints/")]  # dropped once the output is complete
    manifest = json.loads(s3.get("runs/e2e/manifest.json"))
    assert manifest["status"] == "succeeded" and manifest["job"]["id"] == job_id
    sizes = {o["Key"]: o["Size"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="runs/e2e/")["Contents"]}
    listed = {f"runs/e2e/{f['path']}" for f in manifest["files"]}
    assert listed == set(keys) - {"runs/e2e/manifest.json"}
    for f in manifest["files"]:
        assert sizes[f"runs/e2e/{f['path']}"] == f["size"]
    report_entry = next(f for f in manifest["files"] if f["path"] == "report.json")
    assert hashlib.sha256(s3.get("runs/e2e/report.json")).hexdigest() == report_entry["sha256"]
    report = json.loads(s3.get("runs/e2e/report.json"))
    splits = report["data"]["splits"]
    assert sum(splits.values()) == 160 and splits["train"] == 136
    assert report["verification"]["tuned"]["token_f1"] is not None

    # the job in the API: succeeded, metrics and verdict stored, artifacts pointing at S3
    headers = plane.headers("jobs:read")
    job = requests.get(f"{plane.url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
    assert job["status"] == "succeeded" and job["error"] is None
    assert job["artifacts"]["merged"] == s3.uri("runs/e2e/merged/")
    assert job["artifacts"]["manifest"] == s3.uri("runs/e2e/manifest.json")
    assert job["progress"]["step"] == 6 and job["progress"]["total_steps"] == 6
    assert job["health"]["verdict"] == report["health"]["verdict"]
    metrics = requests.get(f"{plane.url}/v1/jobs/{job_id}/metrics", headers=headers, timeout=10).json()
    assert [p["step"] for p in metrics["train"]] == [1, 2, 3, 4, 5, 6]
    assert [p["step"] for p in metrics["eval"]] == [3, 6]
    scrape = requests.get(f"{plane.url}/metrics", timeout=10).text
    assert re.search(rf'sftops_job_step\{{[^}}]*job_id="{job_id}"[^}}]*\}} 6(\.0)?$', scrape, re.M)

    # what a user reads next
    assert cli.main(["artifacts", job_id]) == 0
    assert s3.uri("runs/e2e/adapter/") in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end_and_cleans_up(tiny_model, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    # the demo as `make demo` runs it, with the tiny model standing in for SmolLM2 and a shorter schedule
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model, cache / "models" / "SmolLM2-135M-Instruct")
    spec = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    spec["training"].update({"max_steps": 6, "eval_every": 3, "checkpoint_every": 3})
    spec["verify"].update({"max_new_tokens": 8, "batch_size": 20})
    spec_path = tmp_path / "demo.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SFTOPS_", "AWS_")) and k not in ("S3_ENDPOINT_URL", "PROMETHEUS_MULTIPROC_DIR")}
    env["SFTOPS_MODEL_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "-m", "service.demo", "--spec", str(spec_path),
                           "--output-dir", str(tmp_path / "demo-output")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{out[-3000:]}"
    for heading in ("== data", "== loss and health", "== verification", "== artifacts"):
        assert heading in out
    assert re.search(r"split train 900 / test 60 / verification 40", out)
    assert re.search(r"health: \w+", out) and re.search(r"\[(pass|FAIL|n/a )\] 5\. ", out)
    assert re.search(r"^base\s+\d\.\d{3}\s+\d\.\d{3}$", out, re.M) and re.search(r"^tuned\s+\d\.\d{3}", out, re.M)
    assert "s3://sftops-demo/runs/demo-support-triage/merged/" in out
    assert "s3://sftops-demo/runs/demo-support-triage/adapter/" in out
    assert {p.name for p in (tmp_path / "demo-output").iterdir()} == {"report.md", "loss.png", "report.json"}
    assert (tmp_path / "demo-output" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # everything it started is gone: no gunicorn or job process left with its data dir
    data_dir = re.search(r"SQLite in (\S+)\)", out).group(1)
    assert not Path(data_dir).exists()
    leftovers = subprocess.run(["pgrep", "-f", data_dir], capture_output=True, text=True).stdout.split()
    assert leftovers == []
