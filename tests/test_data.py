"""The data stage end to end on real files: every file type, gzip, BOM/CRLF, bad rows with FILE:LINE, dedup, split."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from job.data import prepare
from job.errors import InputError, StorageError
from job.spec import SplitSpec

FIX = "fix or remove them, or set on_invalid: skip (--on-invalid skip) to drop them"


def chat(i: int) -> dict:
    """A valid messages row, distinct per i."""
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def alpaca(i: int) -> dict:
    """A valid Alpaca row, distinct per i."""
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}"}


def jsonl(rows: list, *, bom: bool = False, crlf: bool = False) -> bytes:
    """Rows as JSON Lines bytes."""
    nl = "\r\n" if crlf else "\n"
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + nl for r in rows)
    return ("\ufeff" if bom else "").encode() + text.encode()


def csv_bytes(rows: list[dict], *, bom: bool = False, crlf: bool = True) -> bytes:
    """Rows as CSV bytes with a header row (the csv module's default line end is CRLF)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\r\n" if crlf else "\n")
    writer.writeheader()
    writer.writerows(rows)
    return ("\ufeff" if bom else "").encode() + buf.getvalue().encode()


def parquet_bytes(rows: list[dict]) -> bytes:
    """Rows as a Parquet file."""
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    """Write (optionally gzip) bytes and return the path."""
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def read_split(out: Path, name: str) -> list[dict]:
    """One output split as a list of rows."""
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]


def expected_messages(i: int) -> dict:
    """The normalized form of chat(i) / alpaca(i)."""
    return chat(i)


N = 40


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "name, make",
    [
        ("data.jsonl", lambda: jsonl([chat(i) for i in range(N)])),
        ("data.jsonl", lambda: jsonl([alpaca(i) for i in range(N)])),
        ("data.json", lambda: json.dumps([chat(i) for i in range(N)], indent=1).encode()),
        ("data.csv", lambda: csv_bytes([alpaca(i) for i in range(N)])),
        ("data.csv", lambda: csv_bytes([{"messages": json.dumps(chat(i)["messages"])} for i in range(N)])),
        ("data.parquet", lambda: parquet_bytes([chat(i) for i in range(N)])),
        ("data.parquet", lambda: parquet_bytes([alpaca(i) for i in range(N)])),
    ],
    ids=["jsonl-messages", "jsonl-alpaca", "json-array", "csv-alpaca", "csv-messages", "parquet-messages",
         "parquet-alpaca"],
)
def test_reads_every_file_type(tmp_path, name, make, gz):
    """JSONL, JSON arrays, CSV and Parquet, plain or gzip (by extension), all give the same normalized rows."""
    path = write(tmp_path / (name + (".gz" if gz else "")), make(), gz)
    out = tmp_path / "out"
    report = prepare(str(path), out, min_rows=10)
    assert report["rows_read"] == N and report["rows_valid"] == N and report["rows_invalid"] == 0
    assert report["splits"] == {"train": 34, "test": 4, "verification": 2}
    assert report["gzip"] is gz
    rows = [r for s in ("train", "test", "verification") for r in read_split(out, s)]
    assert sorted(rows, key=json.dumps) == sorted((expected_messages(i) for i in range(N)), key=json.dumps)


def test_gzip_is_found_by_magic_bytes(tmp_path):
    """A gzip file without .gz in its name is still decompressed."""
    path = write(tmp_path / "data.jsonl", jsonl([chat(i) for i in range(N)]), gz=True)
    report = prepare(str(path), tmp_path / "out", min_rows=10)
    assert report["gzip"] is True and report["rows_valid"] == N


def test_bom_and_crlf_change_nothing(tmp_path):
    """A UTF-8 BOM and CRLF line ends give byte-identical splits to the plain file, for JSONL and CSV."""
    plain = prepare(str(write(tmp_path / "a.jsonl", jsonl([chat(i) for i in range(N)]))), tmp_path / "a", min_rows=10)
    odd = write(tmp_path / "b.jsonl", jsonl([chat(i) for i in range(N)], bom=True, crlf=True))
    assert prepare(str(odd), tmp_path / "b", min_rows=10)["sha256"] == plain["sha256"]
    csv_odd = write(tmp_path / "c.csv", csv_bytes([alpaca(i) for i in range(N)], bom=True, crlf=True))
    assert prepare(str(csv_odd), tmp_path / "c", min_rows=10)["sha256"] == plain["sha256"]
    assert (tmp_path / "b" / "train.jsonl").read_bytes() == (tmp_path / "a" / "train.jsonl").read_bytes()


def bad_error(tmp_path, name: str, data: bytes) -> str:
    """The InputError text prepare raises for a file with bad rows."""
    with pytest.raises(InputError) as err:
        prepare(str(write(tmp_path / name, data)), tmp_path / "out", min_rows=3)
    assert not (tmp_path / "out" / "data_report.json").exists()
    return str(err.value)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
         "messages[1].content is empty (assistant turn)"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]},
         "messages[1].role 'tool' is not one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": "q"}]},
         "the conversation must end with an assistant turn, but messages[0] is a user turn"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "r"}]},
         "the conversation has no user turn"),
        ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "r"}]},
         "messages[0].content is missing (user turn)"),
        ('{"messages": [', "invalid JSON: unexpected end of data at column 15"),
        ("[1, 2]", "expected a JSON object, got a JSON array"),
        ({"text": "hello"},
         "missing field 'messages' (fields ['text'])"),
        ({"instruction": "q", "output": "r"},
         "missing field 'messages' (fields ['instruction', 'output']) (the file's format is messages, detected at "
         "{path}:1; use one format per file)"),
    ],
    ids=["empty-assistant", "unknown-role", "ends-with-user", "no-user", "null-content", "bad-json", "not-object",
         "unrecognized", "mixed-formats"],
)
def test_bad_jsonl_row_is_reported_with_file_and_line(tmp_path, bad, reason):
    """The stage stops and names FILE:LINE: reason for the bad row (line 4: blank line 3 still counts)."""
    rows = [chat(0), chat(1), "", bad, chat(2)]
    path = tmp_path / "data.jsonl"
    message = bad_error(tmp_path, "data.jsonl", jsonl(rows))
    assert message == (
        f"{path}: 1 of 4 rows are invalid (listed below); {FIX}\n{path}:4: {reason.format(path=path)}"
    )


def test_unrecognized_first_row(tmp_path):
    """Before any format is known, a row with unknown fields says which fields are expected."""
    path = tmp_path / "data.jsonl"
    message = bad_error(tmp_path, "data.jsonl", jsonl([{"text": "hi"}, chat(1)]))
    assert message.splitlines()[1] == (
        f"{path}:1: unrecognized row: expected a 'messages' list, a 'conversations' list, 'instruction' + 'output', "
        "or 'prompt' + 'completion', got fields ['text']"
    )


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    """A CSV row is named by the physical line it starts on, even after cells spanning several lines."""
    rows = [
        {"instruction": "line one\nline two\nline three", "input": "", "output": "ok"},  # lines 2-4
        {"instruction": "fine", "input": "", "output": "multi\r\nline"},  # lines 5-6
        {"instruction": "bad", "input": "", "output": ""},  # line 7
        {"instruction": "", "input": "x\ny", "output": "r"},  # lines 8-9
    ]
    path = tmp_path / "data.csv"
    message = bad_error(tmp_path, "data.csv", csv_bytes(rows))
    assert message.splitlines()[1:] == [f"{path}:7: 'output' is empty", f"{path}:8: 'instruction' is empty"]


def test_csv_row_with_wrong_field_count(tmp_path):
    """A CSV record with more cells than the header is named by line."""
    data = b"instruction,input,output\nq,,r\nq2,,r2,extra\n"
    path = tmp_path / "data.csv"
    assert bad_error(tmp_path, "data.csv", data).splitlines()[1] == f"{path}:3: has 4 fields, but the header has 3"


def test_json_array_and_parquet_name_the_row(tmp_path):
    """JSON arrays and Parquet have no useful line numbers, so errors name the row (counted from 1)."""
    rows = [chat(0), chat(1), {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}]
    path = tmp_path / "data.json"
    assert bad_error(tmp_path, "data.json", json.dumps(rows, indent=2).encode()).splitlines()[1] == (
        f"{path}:row 3: messages[1].content is empty (assistant turn)"
    )
    path = tmp_path / "data.parquet"
    assert bad_error(tmp_path, "data.parquet", parquet_bytes(rows)).splitlines()[1] == (
        f"{path}:row 3: messages[1].content is empty (assistant turn)"
    )


def test_fail_lists_the_first_ten_problems(tmp_path):
    """With many bad rows, the error counts them all and lists the first ten."""
    rows = [chat(i) if i % 2 else {"messages": []} for i in range(30)]
    path = tmp_path / "data.jsonl"
    lines = bad_error(tmp_path, "data.jsonl", jsonl(rows)).splitlines()
    assert lines[0] == f"{path}: 15 of 30 rows are invalid (first 10 below); {FIX}"
    assert lines[1:] == [f"{path}:{n}: 'messages' is empty" for n in range(1, 20, 2)]


def test_skip_drops_and_counts(tmp_path):
    """on_invalid=skip drops bad rows, counts them and keeps a few examples in the report."""
    rows = [chat(i) for i in range(20)] + [{"messages": [{"role": "user", "content": "q"}]}] * 3
    path = write(tmp_path / "data.jsonl", jsonl(rows))
    report = prepare(str(path), tmp_path / "out", min_rows=10, on_invalid="skip")
    assert (report["rows_read"], report["rows_valid"], report["rows_invalid"]) == (23, 20, 3)
    assert sum(report["splits"].values()) == 20
    assert report["invalid_examples"] == [
        f"{path}:{n}: the conversation must end with an assistant turn, but messages[0] is a user turn"
        for n in (21, 22, 23)
    ]
    assert report["warnings"][0] == "skipped 3 invalid rows of 23 (on_invalid: skip)"


def test_duplicates_are_removed_after_normalization(tmp_path):
    """Rows equal after normalization (key order, extra fields) count once."""
    same = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
        {"messages": [{"content": "q", "role": "user"}, {"role": "assistant", "content": "r", "weight": 1}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}], "id": 7},
    ]
    path = write(tmp_path / "data.jsonl", jsonl([chat(i) for i in range(20)] + same + [chat(3)]))
    report = prepare(str(path), tmp_path / "out", min_rows=10)
    assert report["duplicates_removed"] == 3
    assert report["rows_valid"] == 24
    assert sum(report["splits"].values()) == 21
    assert "removed 3 duplicate rows (identical after normalization)" in report["warnings"]


def test_too_few_rows(tmp_path):
    """Fewer valid rows than min_rows fails with the count found and the count needed."""
    rows = [chat(i) for i in range(60)] + [chat(1)] * 5 + [{"messages": []}] * 2
    path = write(tmp_path / "data.jsonl", jsonl(rows))
    with pytest.raises(InputError) as err:
        prepare(str(path), tmp_path / "out", on_invalid="skip")
    assert str(err.value) == (
        f"{path}: found 60 valid rows (after dropping 2 invalid and 5 duplicate rows), but at least 100 are needed; "
        "add more rows (1000+ recommended)"
    )
    with pytest.raises(InputError, match=r"found 0 valid rows, but at least 100 are needed"):
        prepare(str(write(tmp_path / "empty.jsonl", b"")), tmp_path / "out")


@pytest.mark.parametrize("rows, warned", [(100, True), (999, True), (1000, False)])
def test_fewer_than_1000_rows_warns(tmp_path, rows, warned):
    """Below 1000 valid rows the report carries a warning that 1000+ is better."""
    path = write(tmp_path / "data.jsonl", jsonl([chat(i) for i in range(rows)]))
    report = prepare(str(path), tmp_path / "out")
    warning = f"only {rows} valid rows; 1000 or more give a more reliable fine-tune and eval loss"
    assert (warning in report["warnings"]) is warned
    assert sum(report["splits"].values()) == rows


def test_shuffled_input_gives_identical_splits(tmp_path):
    """The split depends on content and seed only: a shuffled file yields byte-identical split files."""
    rows = [chat(i) for i in range(500)]
    first = prepare(str(write(tmp_path / "a.jsonl", jsonl(rows))), tmp_path / "a")
    random.Random(3).shuffle(rows)
    second = prepare(str(write(tmp_path / "b.jsonl", jsonl(rows))), tmp_path / "b")
    assert first["splits"] == second["splits"] == {"train": 425, "test": 50, "verification": 25}
    for name in ("train", "test", "verification"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert first["sha256"] == second["sha256"]
    other_seed = prepare(str(tmp_path / "a.jsonl"), tmp_path / "c", split=SplitSpec(seed=7))
    assert other_seed["sha256"]["test"] != first["sha256"]["test"]


@pytest.mark.parametrize(
    "total, ratios, counts",
    [(100, (0.85, 0.10, 0.05), (85, 10, 5)), (101, (0.8, 0.1, 0.1), (81, 10, 10)), (333, (0.7, 0.2, 0.1), (233, 67, 33))],
)
def test_exact_split_counts_and_report(tmp_path, total, ratios, counts):
    """Split files hold exactly the rounded shares; the report's sha256 are those of the files."""
    path = write(tmp_path / "data.jsonl", jsonl([chat(i) for i in range(total)]))
    out = tmp_path / "out"
    spec = SplitSpec(train=ratios[0], test=ratios[1], verification=ratios[2])
    report = prepare(str(path), out, split=spec)
    names = ("train", "test", "verification")
    assert tuple(report["splits"][n] for n in names) == counts
    for name, count in zip(names, counts, strict=True):
        data = (out / f"{name}.jsonl").read_bytes()
        assert data.count(b"\n") == count
        assert report["sha256"][name] == hashlib.sha256(data).hexdigest()
    on_disk = json.loads((out / "data_report.json").read_text())
    assert on_disk == report
    assert set(report) >= {"format", "rows_read", "rows_valid", "rows_invalid", "duplicates_removed", "splits",
                           "sha256", "warnings", "invalid_examples"}
    assert sorted(p.name for p in out.iterdir()) == ["data_report.json", "test.jsonl", "train.jsonl",
                                                      "verification.jsonl"]


def test_explicit_format_rejects_other_rows(tmp_path):
    """--format alpaca on a messages file names the missing field."""
    path = write(tmp_path / "data.jsonl", jsonl([chat(i) for i in range(5)]))
    with pytest.raises(InputError) as err:
        prepare(str(path), tmp_path / "out", fmt="alpaca", min_rows=3)
    assert err.value.args[0].splitlines()[1] == f"{path}:1: 'instruction' is missing"


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("data.txt", b"hello world", "{path}: cannot tell the file type; name it .jsonl, .json, .csv or .parquet (optionally .gz)"),
        ("data.jsonl.gz", b"\x1f\x8b\x08\x00garbage", "{path}: not a readable gzip file"),
        ("data.json", b"[{]", "{path}: not valid JSON: "),
        ("data.json", b'{"a": [1,', "{path}:1: invalid JSON"),
        ("data.parquet", b"PAR1 not really", "{path}: not a readable Parquet file"),
        ("data.csv", b"instruction,output\n\xff\xfe,x\n", "{path}:2: not UTF-8 text (invalid start byte at byte 19); save the file as UTF-8"),
    ],
)
def test_unreadable_files(tmp_path, name, data, message):
    """Files that cannot be read at all fail with one message naming the file."""
    path = write(tmp_path / name, data)
    with pytest.raises(InputError) as err:
        prepare(str(path), tmp_path / "out", min_rows=3)
    assert message.format(path=path) in str(err.value)


def test_missing_local_file(tmp_path):
    """A dataset path that does not exist is an input error naming it."""
    with pytest.raises(InputError, match=r"nope\.jsonl: dataset file not found"):
        prepare(str(tmp_path / "nope.jsonl"), tmp_path / "out")


def test_reads_from_s3(tmp_path, s3):
    """An s3:// dataset is downloaded through the real S3 API and named by its URI in errors."""
    uri = s3.put("datasets/chat.jsonl.gz", gzip.compress(jsonl([chat(i) for i in range(120)])))
    report = prepare(uri, tmp_path / "out")
    assert report["source"] == uri and report["rows_valid"] == 120 and report["gzip"] is True
    bad = s3.put("datasets/bad.jsonl", jsonl([chat(1), {"messages": []}]))
    with pytest.raises(InputError) as err:
        prepare(bad, tmp_path / "out2")
    assert err.value.args[0].splitlines()[1] == f"{bad}:2: 'messages' is empty"
    with pytest.raises(StorageError, match=r"datasets/missing\.jsonl: no such object"):
        prepare(s3.uri("datasets/missing.jsonl"), tmp_path / "out3")
