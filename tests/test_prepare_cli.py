"""`python -m job prepare` as a real subprocess: exit codes, one-line errors, local and S3 input/output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train.jsonl", "test.jsonl", "verification.jsonl")


def chat(i: int) -> str:
    """A valid messages row as a JSON line."""
    return json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})


def dataset(n: int, bad: list[str] | None = None) -> bytes:
    """n valid JSONL rows followed by some bad lines."""
    return ("\n".join([chat(i) for i in range(n)] + (bad or [])) + "\n").encode()


def prepare(*args: str) -> subprocess.CompletedProcess:
    """Run the prepare command and capture its output."""
    return subprocess.run([sys.executable, "-m", "job", "prepare", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    """Exit 2 with exactly one stderr line, `error: <text>`, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: {text}"]
    assert proc.stdout == ""


def test_local_success(tmp_path):
    """A clean dataset: exit 0, a summary on stdout, nothing on stderr, the three splits and the report."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(dataset(1000))
    out = tmp_path / "out"
    proc = prepare("--data", str(data), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == (
        f"prepared {data} (messages): 1000 rows read, 0 invalid, 0 duplicates removed -> "
        f"train 850, test 100, verification 50 in {out}\n"
    )
    report = json.loads((out / "data_report.json").read_text())
    assert report["splits"] == {"train": 850, "test": 100, "verification": 50}
    assert [len((out / f).read_text().splitlines()) for f in SPLITS] == [850, 100, 50]


def test_options(tmp_path):
    """--ratios, --seed, --min-rows, --format and --on-invalid reach the stage; warnings go to stderr."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(dataset(50, bad=['{"messages": []}']))
    out = tmp_path / "out"
    proc = prepare("--data", str(data), "--out", f"file://{out}", "--ratios", "0.6,0.2,0.2", "--seed", "7",
                   "--min-rows", "10", "--format", "messages", "--on-invalid", "skip")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["splits"] == {"train": 30, "test": 10, "verification": 10}
    assert report["seed"] == 7 and report["rows_invalid"] == 1
    assert "skipped 1 invalid rows of 51 (on_invalid: skip)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_s3_in_and_out(s3):
    """Input from and output to S3 through the real S3 API; the report lists the split hashes."""
    uri = s3.put("in/data.jsonl", dataset(200))
    proc = prepare("--data", uri, "--out", s3.uri("runs/r1/data/"), "--min-rows", "100")
    assert proc.returncode == 0, proc.stderr
    assert s3.keys("runs/r1/") == [f"runs/r1/data/{n}" for n in ("data_report.json", *sorted(SPLITS))]
    report = json.loads(s3.get("runs/r1/data/data_report.json"))
    assert report["source"] == uri and report["splits"] == {"train": 170, "test": 20, "verification": 10}
    import hashlib

    for name in ("train", "test", "verification"):
        assert hashlib.sha256(s3.get(f"runs/r1/data/{name}.jsonl")).hexdigest() == report["sha256"][name]


def test_invalid_rows_exit_2_and_list_lines(tmp_path, s3):
    """Bad rows: exit 2, a header line plus one FILE:LINE line per problem, and nothing written to the output."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(dataset(3, bad=['{"messages": [{"role": "user", "content": "q"}]}', "not json"]))
    proc = prepare("--data", str(data), "--out", s3.uri("out/"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {data}: 2 of 5 rows are invalid (listed below); fix or remove them, or set on_invalid: skip "
        "(--on-invalid skip) to drop them",
        f"{data}:4: the conversation must end with an assistant turn, but messages[0] is a user turn",
        f"{data}:5: invalid JSON: invalid literal, expected 'null' at column 1",
    ]
    assert s3.keys("out/") == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratios", "0.9,0.1,0.05"], "--ratios: ratios must sum to 1.0, got 1.05 (train + test + verification)"),
        (["--ratios", "0.9,0.1"],
         "--ratios: expected three comma-separated numbers train,test,verification (e.g. 0.85,0.10,0.05), got '0.9,0.1'"),
        (["--ratios", "1.2,-0.1,-0.1"], "--ratios: train: Input should be less than 1"),
        (["--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
        (["--seed", "abc"], "--seed: expected a non-negative integer, got 'abc'"),
        (["--min-rows", "2"], "--min-rows: must be at least 3 (one row per split), got 2"),
        (["--format", "chatml"],
         "prepare: argument --format: invalid choice: 'chatml' (choose from 'auto', 'messages', 'alpaca', 'sharegpt', "
         "'prompt_completion') (see python -m job prepare --help)"),
        (["--bogus"], "prepare: unrecognized arguments: --bogus (see python -m job prepare --help)"),
    ],
)
def test_bad_options_name_the_option(tmp_path, args, message):
    """Bad options fail before any work with one line naming the option."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(dataset(5))
    assert_one_line_error(prepare("--data", str(data), "--out", str(tmp_path / "out"), *args), message)


def test_missing_required_option():
    """Leaving out --out is a one-line usage error."""
    assert_one_line_error(
        prepare("--data", "x.jsonl"),
        "prepare: the following arguments are required: --out (see python -m job prepare --help)",
    )


def test_too_few_rows(tmp_path):
    """Fewer valid rows than --min-rows: exit 2, one line with the counts."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(dataset(40))
    assert_one_line_error(
        prepare("--data", str(data), "--out", str(tmp_path / "out")),
        f"{data}: found 40 valid rows, but at least 100 are needed; add more rows (1000+ recommended)",
    )


def test_storage_errors(s3, tmp_path):
    """A missing input key or output bucket: exit 2, one line naming the URI."""
    assert_one_line_error(
        prepare("--data", s3.uri("nope.jsonl"), "--out", str(tmp_path / "out")),
        f"{s3.uri('nope.jsonl')}: no such object",
    )
    data = tmp_path / "data.jsonl"
    data.write_bytes(dataset(200))
    proc = prepare("--data", str(data), "--out", "s3://no-such-bucket-sftops/out/")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: s3://no-such-bucket-sftops/out/.sftops-write-check-")
    assert proc.stderr.rstrip().endswith(
        ": bucket 'no-such-bucket-sftops' does not exist (check the bucket name and the endpoint)"
    )


def test_help():
    """--help prints the options and exits 0."""
    proc = prepare("--help")
    assert proc.returncode == 0
    assert "--on-invalid" in proc.stdout and "--ratios" in proc.stdout


def test_report_is_uploaded_last(s3, tmp_path, monkeypatch):
    """The splits go up before data_report.json, so an output with a report is always complete."""
    from job import prepare as prepare_cmd
    from job import storage

    real_upload, order = storage.upload, []

    def recording_upload(src, uri):
        """Record the order, then really upload."""
        order.append(uri.rsplit("/", 1)[1])
        real_upload(src, uri)

    monkeypatch.setattr(storage, "upload", recording_upload)
    data = tmp_path / "data.jsonl"
    data.write_bytes(dataset(150))
    assert prepare_cmd.main(["--data", str(data), "--out", s3.uri("o/")]) == 0
    assert order == [*SPLITS, "data_report.json"]
    assert s3.keys("o/") == sorted(f"o/{name}" for name in order)
