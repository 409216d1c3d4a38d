"""Find the base model: resolve its URI to a local directory, check it is a causal LM, pick device and dtype.

s3:// prefixes are pulled once into a cache directory named by a hash of the objects' keys, sizes and ETags,
so a second job on the same (unchanged) model downloads nothing; a changed object gives a new cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from job import storage
from job.errors import InputError, StorageError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class DeviceChoice:
    """Where and in which precision training runs."""

    device: str  # "cuda" or "cpu"
    dtype: str  # "bfloat16", "float16" or "float32"
    reason: str


def resolve_model(uri: str, cache_dir: Path) -> Path:
    """A local directory holding the model at `uri` (s3:// prefix, hf://org/name[@rev], file:// or a path).

    Raises StorageError when the model cannot be fetched, InputError when a local path is not a directory.
    """
    if storage.is_s3(uri):
        return _resolve_s3(uri, Path(cache_dir))
    if uri.startswith("hf://"):
        return _resolve_hf(uri, Path(cache_dir))
    path = storage.local_path(uri)
    if not path.is_dir():
        raise InputError(f"base_model {uri}: no such model directory")
    return path


def _cache_key(objects: list[storage.ObjectInfo]) -> str:
    """A digest of what is under the prefix: changes whenever any object is added, removed or rewritten."""
    listing = [[o.key, o.size, o.etag] for o in sorted(objects, key=lambda o: o.key)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:24]


def _resolve_s3(uri: str, cache_dir: Path) -> Path:
    """Pull an s3:// model prefix into the cache unless an entry with the same ETags is already there."""
    prefix = uri if uri.endswith("/") else uri + "/"
    objects = storage.list_objects(prefix)
    if not objects:
        raise StorageError(f"base_model {uri}: no objects under this prefix (expected a Hugging Face model directory)")
    bucket, key = storage.split_s3(prefix)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{bucket}-{key}").strip("-")[:80]
    target = cache_dir / "s3" / f"{slug}-{_cache_key(objects)}"
    if target.is_dir():
        log.info("base model %s: cache hit %s", uri, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename, so a crash never leaves a half-filled entry that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        log.info("base model %s: downloading %d objects into %s", uri, len(objects), target)
        for obj in objects:
            storage.download(obj.uri, tmp / obj.key)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # another process won the race with the same content: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_hf(uri: str, cache_dir: Path) -> Path:
    """Download hf://org/name[@revision] with huggingface_hub (token from HF_TOKEN); never run in tests."""
    repo, _, revision = uri[len("hf://") :].partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = snapshot_download(
            repo_id=repo.strip("/"),
            revision=revision or None,
            cache_dir=str(cache_dir / "hf"),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise InputError(f"base_model {uri}: no such repository or revision on the Hugging Face Hub ({type(e).__name__})") from None
    except (HfHubHTTPError, OSError) as e:
        raise StorageError(f"base_model {uri}: download from the Hugging Face Hub failed: {str(e).splitlines()[0]}") from None
    return Path(path)


def check_model_dir(path: Path, uri: str | None = None) -> None:
    """Cheap check that `path` holds a causal LM with weights and a tokenizer; raises InputError saying what is missing."""
    path = Path(path)
    name = uri or str(path)
    if not (path / "config.json").is_file():
        raise InputError(f"base_model {name}: config.json not found (expected a Hugging Face model directory)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"base_model {name}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the model directory")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise InputError(f"base_model {name}: no weights (*.safetensors or *.bin) in the model directory")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"base_model {name}: config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"base_model {name}: config.json must be a JSON object")
    architectures = config.get("architectures") or []
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    what = ", ".join(architectures) or f"model_type {model_type!r}"
    raise InputError(f"base_model {name}: {what} is not a causal language model (LoRA SFT needs a *ForCausalLM model)")


def choose_device(precision: str = "auto") -> DeviceChoice:
    """CUDA when available (bf16 where supported, else fp32), else CPU fp32; raises InputError for an impossible precision."""
    import torch

    if torch.cuda.is_available():
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "auto":
            dtype = "bfloat16" if bf16_ok else "float32"
        elif precision == "bf16" and not bf16_ok:
            raise InputError("training.precision: bf16 is not supported by this GPU; use fp16, fp32 or auto")
        else:
            dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
        choice = DeviceChoice("cuda", dtype, f"{torch.cuda.get_device_name(0)}, precision={precision}")
    else:
        if precision == "fp16":
            raise InputError("training.precision: fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
        dtype = "bfloat16" if precision == "bf16" else "float32"
        choice = DeviceChoice("cpu", dtype, f"no CUDA device, precision={precision}")
    log.info("training on %s in %s (%s)", choice.device, choice.dtype, choice.reason)
    return choice
