"""The job spec: defaults, every kind of rejection with its field path, YAML errors with lines, loading from file and S3."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from job.errors import InputError, StorageError
from job.spec import JobSpec, SplitSpec, dump_spec, load_spec, parse_spec, parse_spec_text, validation_details

BASE = {"name": "demo", "base_model": "s3://models/smol/", "dataset": "s3://data/chat.jsonl", "output": "s3://out/run1/"}


def rejected(data, source: str = "spec") -> str:
    """The InputError text parse_spec raises for `data`."""
    with pytest.raises(InputError) as err:
        parse_spec(data, source)
    return str(err.value)


def test_defaults():
    """A minimal spec gets every documented default."""
    spec = parse_spec(BASE)
    assert (spec.split.train, spec.split.test, spec.split.verification, spec.split.seed) == (0.85, 0.10, 0.05, 42)
    assert (spec.lora.r, spec.lora.alpha, spec.lora.target_modules) == (8, 16, "all-linear")
    assert (spec.format, spec.min_rows, spec.on_invalid) == ("auto", 100, "fail")
    assert spec.health.target_band == (0.3, 0.5)
    assert (spec.training.batch_size, spec.training.lr_scheduler, spec.training.max_steps) == (8, "cosine", None)
    assert spec.verify.enabled and spec.export.adapter and spec.export.merged and not spec.export.overwrite
    assert spec.resources.gpus == 1 and spec.labels == {} and spec.callback_url is None


def test_local_paths_and_file_uris_are_accepted():
    """Plain paths and file:// URIs are valid for model, data and output; hf:// only for the model."""
    spec = parse_spec({**BASE, "base_model": "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
                       "dataset": "/data/chat.jsonl", "output": "file:///tmp/out"})
    assert spec.dataset == "/data/chat.jsonl" and spec.output == "file:///tmp/out"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora": {"rank": 4}}, "spec: lora.rank: unknown field (check the spelling; see the spec reference in README.md)"),
        ({"epochs": 3}, "spec: epochs: unknown field (check the spelling; see the spec reference in README.md)"),
        ({"split": {"train": 0.9, "test": 0.1, "verification": 0.05}},
         "spec: split: ratios must sum to 1.0, got 1.05 (train + test + verification)"),
        ({"split": {"train": 0.5}}, "spec: split: ratios must sum to 1.0, got 0.65 (train + test + verification)"),
        ({"split": {"test": 0}}, "spec: split.test: Input should be greater than 0"),
        ({"dataset": "http://example.com/d.jsonl"},
         "spec: dataset: unsupported scheme 'http://': must be an s3://bucket/key URI or a local path"),
        ({"dataset": "hf://org/data"},
         "spec: dataset: unsupported scheme 'hf://': must be an s3://bucket/key URI or a local path"),
        ({"base_model": "s3:///x"},
         "spec: base_model: 's3:///x' has no bucket or repository: must be an s3://bucket/prefix/, hf://org/name, "
         "or a local path"),
        ({"output": " out"}, "spec: output: must be an s3://bucket/key URI or a local path, got ' out'"),
        ({"output": ""}, "spec: output: must be an s3://bucket/key URI or a local path, got ''"),
        ({"name": "Bad_Name"},
         "spec: name: 'Bad_Name' is not a valid name: use lowercase letters, digits and '-', start and end with a "
         "letter or digit, at most 63 characters"),
        ({"format": "chatml"},
         "spec: format: Input should be 'auto', 'messages', 'alpaca', 'sharegpt' or 'prompt_completion'"),
        ({"on_invalid": "ignore"}, "spec: on_invalid: Input should be 'fail' or 'skip'"),
        ({"min_rows": 2}, "spec: min_rows: Input should be greater than or equal to 3"),
        ({"training": {"epochs": 0, "lr_scheduler": "exp"}},
         "spec: training.epochs: Input should be greater than 0\n"
         "spec: training.lr_scheduler: Input should be 'cosine', 'linear', 'constant' or 'constant_with_warmup'"),
        ({"health": {"target_band": [0.5, 0.3]}},
         "spec: health.target_band: must be [low, high] with 0 <= low < high, got [0.5, 0.3]"),
        ({"callback_url": "ftp://x"}, "spec: callback_url: must be an http:// or https:// URL, got 'ftp://x'"),
        ({"labels": {"bad key": "v"}},
         "spec: labels: label key 'bad key' must be letters, digits, '-', '_' or '.', at most 63 characters"),
        ({"resources": {"gpus": 17}}, "spec: resources.gpus: Input should be less than or equal to 16"),
    ],
)
def test_rejections_name_the_field(change, message):
    """Every invalid value is reported as `source: field.path: message`, all fields at once."""
    assert rejected({**BASE, **change}) == message


def test_unknown_threshold_names_known_ones():
    """Health threshold overrides are checked against job.health's names."""
    from job.health import DEFAULT_THRESHOLDS

    message = rejected({**BASE, "health": {"thresholds": {"bogus": 1.0}}})
    assert message == f"spec: health.thresholds: unknown threshold(s) ['bogus']; known: {sorted(DEFAULT_THRESHOLDS)}"
    name = sorted(DEFAULT_THRESHOLDS)[0]
    assert parse_spec({**BASE, "health": {"thresholds": {name: 0.5}}}).health.thresholds == {name: 0.5}


def test_missing_fields_and_non_mappings():
    """Required fields are named; a non-mapping spec says what it got."""
    assert rejected({"name": "x"}, "job.yaml") == (
        "job.yaml: base_model: field required\njob.yaml: dataset: field required\njob.yaml: output: field required"
    )
    assert rejected([1, 2]) == "spec: the spec must be a mapping of fields, got list"


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: demo\nlora: [\n", "job.yaml:3: not valid YAML or JSON: expected the node content, but found '<stream end>'"),
        ("name: demo\n  bad: indent\n", "job.yaml:2: not valid YAML or JSON: mapping values are not allowed here"),
        ('{"name": "demo",\n "lora": {"r": 8\n', "job.yaml:3: not valid YAML or JSON: expected ',' or '}', but got '<stream end>'"),
        ("- 1\n- 2\n", "job.yaml: the spec must be a mapping of fields, got list"),
    ],
)
def test_yaml_syntax_errors_give_the_line(text, message):
    """YAML (and JSON) syntax errors name the source and line."""
    with pytest.raises(InputError) as err:
        parse_spec_text(text, "job.yaml")
    assert str(err.value) == message


def test_json_is_yaml():
    """A JSON spec parses the same as YAML."""
    assert parse_spec_text(json.dumps(BASE)) == parse_spec(BASE)


def yaml_text() -> str:
    """BASE plus a few overrides, as YAML."""
    return (
        "name: demo\nbase_model: s3://models/smol/\ndataset: s3://data/chat.jsonl\noutput: s3://out/run1/\n"
        "split:\n  seed: 7\nlora:\n  r: 16\n  alpha: 32\n"
    )


def test_load_from_file(tmp_path):
    """load_spec reads plain paths and file:// URIs, with or without a BOM; errors name the file."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text())
    spec = load_spec(str(path))
    assert (spec.split.seed, spec.lora.r, spec.lora.alpha) == (7, 16, 32)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + yaml_text().encode())
    assert load_spec(f"file://{bom}") == spec
    with pytest.raises(InputError, match=r"missing\.yaml: spec file not found"):
        load_spec(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text() + "lora:\n  rank: 3\n")
    with pytest.raises(InputError) as err:
        load_spec(str(bad))
    assert str(err.value) == f"{bad}: lora.rank: unknown field (check the spelling; see the spec reference in README.md)"


def test_load_from_s3(s3):
    """load_spec reads s3:// URIs through the real S3 API; a missing object is a StorageError naming it."""
    uri = s3.put("specs/job.yaml", yaml_text())
    assert load_spec(uri) == parse_spec_text(yaml_text())
    bad = s3.put("specs/bad.yaml", "name: demo\n  oops: x\n")
    with pytest.raises(InputError, match=r"^s3://.*/specs/bad\.yaml:2: not valid YAML or JSON"):
        load_spec(bad)
    with pytest.raises(StorageError) as err:
        load_spec(s3.uri("specs/missing.yaml"))
    assert str(err.value) == f"{s3.uri('specs/missing.yaml')}: no such object"


def test_dump_round_trips():
    """The resolved spec dumps to stable JSON that parses back to the same spec."""
    spec = parse_spec({**BASE, "lora": {"target_modules": ["q_proj", "v_proj"]}, "labels": {"team": "ml"}})
    text = dump_spec(spec)
    assert text == dump_spec(parse_spec(json.loads(text)))
    assert parse_spec(json.loads(text)) == spec
    assert json.loads(text)["split"] == {"train": 0.85, "test": 0.1, "verification": 0.05, "seed": 42}


def test_validation_details_for_apis():
    """The API form of errors is a list of {field, message}."""
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate({**BASE, "lora": {"rank": 4}, "min_rows": 1})
    assert validation_details(err.value) == [
        {"field": "min_rows", "message": "Input should be greater than or equal to 3"},
        {"field": "lora.rank", "message": "unknown field (check the spelling; see the spec reference in README.md)"},
    ]


def test_split_spec_alone():
    """SplitSpec validates on its own (the prepare CLI builds one from --ratios)."""
    assert SplitSpec(train=0.8, test=0.1, verification=0.1).train == 0.8
    with pytest.raises(ValidationError, match="ratios must sum to 1.0, got 0.9"):
        SplitSpec(train=0.7, test=0.1, verification=0.1)
