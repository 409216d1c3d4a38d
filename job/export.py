"""Export: write the adapter and merged weights, upload every artifact, and write manifest.json last.

An output prefix is complete exactly when it holds manifest.json, so the manifest goes up after every other
file, and a completed output being replaced loses its manifest before anything else changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from job import storage
from job.errors import InputError
from job.spec import ExportSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Sub-prefixes this job owns; stale files there (from a replaced or crashed run) are removed before upload.
OWNED_PREFIXES = ("adapter", "merged", "splits")
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "sftops")
DTYPES = {"float32", "bfloat16", "float16"}


def base_dtype(model_dir: Path) -> str:
    """The dtype the base model's config declares (float32 when it declares none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    declared = config.get("dtype") or config.get("torch_dtype") or "float32"
    return declared if declared in DTYPES else "float32"


def save_model(model: Any, tokenizer: Any, out_dir: Path, export: ExportSpec, model_dir: Path) -> dict[str, Path]:
    """Save `adapter/` (peft) and `merged/` (safetensors, with tokenizer) as asked; returns the dirs written.

    Merging folds the adapter into the base weights in place, so the adapter is saved first and the
    peft model must not be used for anything else afterwards.
    """
    import torch

    written: dict[str, Path] = {}
    if export.adapter:
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        written["adapter"] = adapter_dir
    if export.merged:
        dtype = base_dtype(model_dir) if export.dtype == "auto" else export.dtype
        merged_dir = out_dir / "merged"
        merged = model.merge_and_unload()
        merged = merged.to(getattr(torch, dtype))
        merged.config.use_cache = True  # training may have turned the KV cache off (gradient checkpointing)
        merged.save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
        written["merged"] = merged_dir
        log.info("merged weights saved as %s", dtype)
    return written


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (model shards are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Every file under root as {path (posix, relative), size, sha256}, sorted by path."""
    return [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the artifacts (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(files: list[dict[str, Any]], *, status: str, **fields: Any) -> dict[str, Any]:
    """The manifest document: format, status, creation time, extra fields (job, device, ...) and the file list."""
    return {
        "format": MANIFEST_FORMAT,
        "status": status,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "libraries": library_versions(),
        "files": files,
    }


def publish(out_dir: Path, output: str, *, overwrite: bool, status: str, **manifest_fields: Any) -> dict[str, Any]:
    """Upload out_dir to the output prefix and write manifest.json last; returns the artifact URIs.

    Raises InputError if the output is already complete and `overwrite` is false, StorageError on upload failure.
    """
    manifest_uri = storage.join(output, MANIFEST)
    if storage.exists(manifest_uri):
        if not overwrite:
            raise InputError(
                f"output {output} already holds a completed job (manifest.json): "
                "choose a new output or set export.overwrite: true"
            )
        # First, so that a crash below never leaves the old "complete" marker over mixed files.
        storage.delete(manifest_uri)
        log.info("removed the old manifest of %s (export.overwrite)", output)
    for name in OWNED_PREFIXES:
        storage.delete_prefix(storage.join(output, name) + "/")
    files = file_entries(out_dir)
    for entry in files:
        storage.upload(out_dir / entry["path"], storage.join(output, entry["path"]))
    manifest = build_manifest(files, status=status, **manifest_fields)
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    log.info("uploaded %d files to %s; manifest written", len(files), output)
    names = {e["path"].split("/", 1)[0] for e in files}
    return {
        "output": output,
        "manifest": manifest_uri,
        "adapter": storage.join(output, "adapter") + "/" if "adapter" in names else None,
        "merged": storage.join(output, "merged") + "/" if "merged" in names else None,
        "report": storage.join(output, "report.json"),
        "loss_png": storage.join(output, "loss.png"),
    }


def read_manifest(output: str) -> dict[str, Any] | None:
    """The manifest of a completed output, or None when the output is not complete."""
    uri = storage.join(output, MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))
