"""The one job spec: what a CI pipeline posts, what the job runs, what openapi.yaml describes.

Fields are grouped by concern; each has a description and its default stated once here.
The service imports this module, so it must stay free of torch and other heavy imports.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from job.errors import InputError

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MODEL_SCHEMES = ("s3://", "hf://", "file://")
DATA_SCHEMES = ("s3://", "file://")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


class _Section(BaseModel):
    """Base for every spec section: unknown fields are rejected, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class SplitSpec(_Section):
    """How valid rows are divided; a row's split depends only on its content and the seed."""

    train: float = Field(0.85, gt=0, lt=1, description="Share of rows used for training.")
    test: float = Field(0.10, gt=0, lt=1, description="Share of rows used for eval loss during training.")
    verification: float = Field(
        0.05, gt=0, lt=1, description="Share of rows used for base-vs-tuned inference after training."
    )
    seed: int = Field(42, ge=0, description="Seed of the content hash that assigns rows to splits.")

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> SplitSpec:
        """Reject ratios that do not add up to 1."""
        total = self.train + self.test + self.verification
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"ratios must sum to 1.0, got {total:.4g} (train + test + verification)")
        return self


class LoraSpec(_Section):
    """The peft LoRA adapter."""

    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description='Modules to adapt: "all-linear" or a list of module names.'
    )


class TrainingSpec(_Section):
    """Optimisation and evaluation schedule for trl's SFTTrainer."""

    epochs: float = Field(1.0, gt=0, description="Passes over the train split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps; overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps used for linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Rows per device per step.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_length: int = Field(1024, ge=16, description="Tokens per row; longer rows are truncated.")
    packing: bool = Field(False, description="Pack rows padding-free into sequences of max_length.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on large models.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp32."
    )
    logging_every: int = Field(1, ge=1, description="Log train loss every N steps.")
    eval_every: int = Field(50, ge=1, description="Compute eval loss on the test split every N steps.")
    checkpoint_every: int = Field(100, ge=1, description="Save a resumable checkpoint every N steps.")
    seed: int = Field(42, ge=0, description="Seed for weight init, shuffling and dropout.")


class HealthSpec(_Section):
    """What a healthy loss curve means for this job."""

    target_band: tuple[float, float] = Field(
        (0.3, 0.5), description="Final train loss a healthy run ends in: [low, high]."
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Overrides of job.health's named thresholds, by name."
    )

    @field_validator("target_band")
    @classmethod
    def _band_ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        """Reject an empty or negative band."""
        low, high = band
        if not (0 <= low < high):
            raise ValueError(f"must be [low, high] with 0 <= low < high, got [{low}, {high}]")
        return band

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, values: dict[str, float]) -> dict[str, float]:
        """Reject threshold names and values job.health does not accept."""
        from job.health import DEFAULT_THRESHOLDS, resolve_thresholds

        unknown = sorted(set(values) - set(DEFAULT_THRESHOLDS))
        if unknown:
            raise ValueError(f"unknown threshold(s) {unknown}; known: {sorted(DEFAULT_THRESHOLDS)}")
        resolve_thresholds(values)  # bad values fail at submit, not later inside the job or the plane
        return values


class VerifySpec(_Section):
    """Greedy inference on the verification split, base model against tuned."""

    enabled: bool = Field(True, description="Run verification inference after training.")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Generation limit per row.")
    batch_size: int = Field(8, ge=1, description="Rows generated per batch.")


class ExportSpec(_Section):
    """What the job writes to the output prefix."""

    adapter: bool = Field(True, description="Write the peft adapter under adapter/.")
    merged: bool = Field(True, description="Write merged full weights (safetensors) under merged/.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the merged weights; auto keeps the base model's dtype."
    )
    overwrite: bool = Field(False, description="Replace a completed output (one with manifest.json).")


class ResourcesSpec(_Section):
    """What the Kubernetes Job asks for; the local launcher ignores these."""

    gpus: int = Field(1, ge=0, le=16, description="nvidia.com/gpu per pod; >1 trains data-parallel with torchrun.")
    cpu: str | None = Field(None, description='CPU request and limit, e.g. "8".')
    memory: str | None = Field(None, description='Memory request and limit, e.g. "64Gi".')
    node_selector: dict[str, str] = Field(default_factory=dict, description="Merged over the plane's defaults.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Kubernetes tolerations, appended to the plane's defaults."
    )
    affinity: dict[str, Any] | None = Field(None, description="Kubernetes affinity; replaces the default.")
    deadline_seconds: int | None = Field(
        None, ge=60, description="Hard limit on the job's run time (activeDeadlineSeconds)."
    )


class JobSpec(_Section):
    """A LoRA SFT job: where the model and data are, how to train, where results go."""

    name: str = Field(..., description="Job name: lowercase letters, digits and '-', at most 63 characters.")
    base_model: str = Field(
        ..., description="s3://bucket/prefix/ of a Hugging Face model directory, a local path, or hf://org/name."
    )
    dataset: str = Field(..., description="s3://bucket/key or a local path: JSONL, JSON, CSV or Parquet, maybe .gz.")
    output: str = Field(..., description="s3://bucket/prefix/ or a local directory for all artifacts.")
    format: Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion"] = Field(
        "auto", description="Dataset row format; auto detects it from the first valid row."
    )
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train / test / verification shares.")
    min_rows: int = Field(100, ge=3, description="Fewer valid rows than this fails the job.")
    on_invalid: Literal["fail", "skip"] = Field("fail", description="fail: stop on bad rows; skip: drop and count.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter settings.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training schedule.")
    health: HealthSpec = Field(default_factory=HealthSpec, description="Loss-curve health targets.")
    verify: VerifySpec = Field(default_factory=VerifySpec, description="Verification inference.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Artifacts to write.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Kubernetes resources.")
    callback_url: str | None = Field(
        None, description="http(s) URL the plane POSTs the job to on a terminal status (HMAC-signed)."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form key=value labels for filtering.")

    @field_validator("name")
    @classmethod
    def _dns_name(cls, name: str) -> str:
        """Names become Kubernetes object names, so they must be DNS labels."""
        if not NAME_RE.match(name):
            raise ValueError(
                f"{name!r} is not a valid name: use lowercase letters, digits and '-', "
                "start and end with a letter or digit, at most 63 characters"
            )
        return name

    @field_validator("base_model")
    @classmethod
    def _model_uri(cls, uri: str) -> str:
        """Accept s3://, hf://, file:// or a plain path."""
        return _check_uri(uri, MODEL_SCHEMES, "an s3://bucket/prefix/, hf://org/name, or a local path")

    @field_validator("dataset", "output")
    @classmethod
    def _data_uri(cls, uri: str) -> str:
        """Accept s3://bucket/key, file:// or a plain path."""
        return _check_uri(uri, DATA_SCHEMES, "an s3://bucket/key URI or a local path")

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        """Only http(s) callbacks can be delivered."""
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
        return url

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str]) -> dict[str, str]:
        """Label keys must survive as Kubernetes label keys and in key=value filters."""
        for key, value in labels.items():
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f"label key {key!r} must be letters, digits, '-', '_' or '.', at most 63 characters")
            if len(value) > 253 or "\n" in value:
                raise ValueError(f"label {key!r}: value must be one line of at most 253 characters")
        return labels


def _check_uri(uri: str, schemes: tuple[str, ...], what: str) -> str:
    """Validate a storage URI's shape without touching the network."""
    if not uri or uri.strip() != uri:
        raise ValueError(f"must be {what}, got {uri!r}")
    if "://" in uri:
        scheme = uri.split("://", 1)[0] + "://"
        if scheme not in schemes:
            raise ValueError(f"unsupported scheme {scheme!r}: must be {what}")
        rest = uri[len(scheme) :]
        if scheme in ("s3://", "hf://") and (not rest or rest.startswith("/")):
            raise ValueError(f"{uri!r} has no bucket or repository: must be {what}")
    return uri


def validation_details(err: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as a list of {field, message}, field being the dotted path (for JSON APIs)."""
    details = []
    for e in err.errors():
        # repr() keeps a key with a newline (a client can send any key) on one line
        path = ".".join(p if p.isprintable() else repr(p) for p in map(str, e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the spec reference in README.md)"
        elif e["type"] == "missing":
            msg = "field required"
        details.append({"field": path or "(root)", "message": msg})
    return details


def format_validation_error(err: ValidationError, source: str = "spec") -> str:
    """Render pydantic errors as one line per field: `source: field.path: message`."""
    return "\n".join(f"{source}: {d['field']}: {d['message']}" for d in validation_details(err))


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Validate a parsed mapping as a JobSpec; raises InputError naming each bad field."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: the spec must be a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise InputError(format_validation_error(e, source)) from None


def parse_spec_text(text: str, source: str = "spec") -> JobSpec:
    """Parse YAML or JSON text (JSON is YAML) into a JobSpec; raises InputError with the line of a syntax error."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{source}{where}: not valid YAML or JSON: {problem}") from None
    return parse_spec(data, source)


def load_spec(uri: str) -> JobSpec:
    """Load a spec from a local path, file:// or s3:// URI; raises InputError or StorageError."""
    from job import storage

    if uri.startswith("s3://"):
        text = storage.read_text(uri)
    else:
        path = Path(uri.removeprefix("file://"))
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise InputError(f"{uri}: spec file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{uri}: cannot read spec: {e}") from None
    return parse_spec_text(text, uri)


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec (every default filled in) as stable, indented JSON."""
    return json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


SpecDict = Annotated[dict[str, Any], "a JobSpec as JSON"]
