"""Row formats: detection, normalization to messages, and the exact reason for every kind of bad row."""

from __future__ import annotations

import pytest

from job.formats import FORMATS, RowError, detect, file_type, normalize, strip_gz


def u(text):
    """A user message."""
    return {"role": "user", "content": text}


def a(text):
    """An assistant message."""
    return {"role": "assistant", "content": text}


def s(text):
    """A system message."""
    return {"role": "system", "content": text}


@pytest.mark.parametrize(
    "row, fmt, expected",
    [
        ({"messages": [u("hi"), a("hello")]}, "messages", [u("hi"), a("hello")]),
        (
            {"messages": [s("be brief"), u("q1"), a("a1"), u("q2"), a("a2")]},
            "messages",
            [s("be brief"), u("q1"), a("a1"), u("q2"), a("a2")],
        ),
        # extra keys on a message (name, weight) are dropped; key order is canonical
        ({"messages": [{"content": "hi", "role": "user", "name": "x"}, a("yo")]}, "messages", [u("hi"), a("yo")]),
        # a CSV cell carries the list as JSON text
        ({"messages": '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]'}, "messages",
         [u("hi"), a("yo")]),
        ({"instruction": "Add 2+2", "input": "", "output": "4"}, "alpaca", [u("Add 2+2"), a("4")]),
        ({"instruction": "Translate", "input": "Hallo", "output": "Hello"}, "alpaca", [u("Translate\n\nHallo"), a("Hello")]),
        ({"instruction": "Sum", "output": "3"}, "alpaca", [u("Sum"), a("3")]),
        (
            {"instruction": "Sum", "input": "1 2", "output": "3", "system": "math tutor"},
            "alpaca",
            [s("math tutor"), u("Sum\n\n1 2"), a("3")],
        ),
        (
            {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "r"}]},
            "sharegpt",
            [s("sys"), u("q"), a("r")],
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}], "system": "top"},
            "sharegpt",
            [s("top"), u("q"), a("r")],
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}], "system": ""},
            "sharegpt",
            [u("q"), a("r")],
        ),
        ({"prompt": "2+2?", "completion": "4"}, "prompt_completion", [u("2+2?"), a("4")]),
        (
            {"prompt": [s("terse"), u("2+2?")], "completion": [a("4")]},
            "prompt_completion",
            [s("terse"), u("2+2?"), a("4")],
        ),
    ],
)
def test_normalizes_every_format(row, fmt, expected):
    """Each supported format becomes the same system/user/assistant message list."""
    assert detect(row) == fmt
    assert normalize(row, fmt) == expected


@pytest.mark.parametrize(
    "row, fmt, reason",
    [
        ({"messages": [u("hi"), a("")]}, "messages", "messages[1].content is empty (assistant turn)"),
        ({"messages": [u("hi"), a("  \n")]}, "messages", "messages[1].content is empty (assistant turn)"),
        ({"messages": [u("hi"), {"role": "tool", "content": "x"}]}, "messages",
         "messages[1].role 'tool' is not one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": 5}, a("x")]}, "messages",
         "messages[0].content must be a string, got a JSON number (user turn)"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, a("x")]}, "messages",
         "messages[0].content must be a string, got a JSON array (user turn)"),
        ({"messages": [{"role": "user"}, a("x")]}, "messages", "messages[0].content is missing (user turn)"),
        ({"messages": [{"content": "hi"}, a("x")]}, "messages", "messages[0].role is missing"),
        ({"messages": [u("hi"), "hello"]}, "messages",
         "messages[1] must be an object with 'role' and 'content', got a JSON string"),
        ({"messages": [u("q"), a("r"), u("q2")]}, "messages",
         "the conversation must end with an assistant turn, but messages[2] is a user turn"),
        ({"messages": [s("sys"), a("r")]}, "messages", "the conversation has no user turn"),
        ({"messages": [u("q"), s("sys"), a("r")]}, "messages",
         "messages[1] is a system turn; a system turn is only allowed first"),
        ({"messages": [a("r0"), u("q"), a("r")]}, "messages",
         "the conversation must start with a user turn (after an optional system turn), "
         "but messages[0] is an assistant turn"),
        ({"messages": []}, "messages", "'messages' is empty"),
        ({"messages": None}, "messages", "'messages' is null"),
        ({"messages": {"role": "user"}}, "messages", "'messages' must be an array of turns, got a JSON object"),
        ({"messages": "not json"}, "messages", "'messages' is text that is not a JSON array"),
        ({"instruction": "x", "output": "y"}, "messages", "missing field 'messages' (fields ['instruction', 'output'])"),
        ([1, 2], "messages", "expected a JSON object, got a JSON array"),
        ({"instruction": "", "output": "y"}, "alpaca", "'instruction' is empty"),
        ({"instruction": "x", "output": " "}, "alpaca", "'output' is empty"),
        ({"instruction": ["x"], "output": "y"}, "alpaca", "'instruction' must be a string, got a JSON array"),
        ({"instruction": "x", "input": 3, "output": "y"}, "alpaca", "'input' must be a string, got a JSON number"),
        ({"instruction": "x"}, "alpaca", "'output' is missing"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "r"}]}, "sharegpt",
         "conversations[1].from 'bot' is not one of system, human, gpt"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}, "sharegpt",
         "conversations[1].value is empty (assistant turn)"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt",
         "the conversation must end with an assistant turn, but conversations[0] is a user turn"),
        ({"conversations": [{"from": "gpt", "value": "r"}], "system": "s"}, "sharegpt",
         "the conversation has no user turn"),
        ({"prompt": "q", "completion": ""}, "prompt_completion", "'completion' is empty"),
        ({"prompt": "q"}, "prompt_completion", "'completion' is missing"),
        ({"prompt": [], "completion": "r"}, "prompt_completion", "'prompt' is empty"),
        ({"prompt": [u("q")], "completion": [u("again")]}, "prompt_completion",
         "the conversation must end with an assistant turn, but completion[0] is a user turn"),
        ({"prompt": [u("q"), {"role": "bot", "content": "x"}], "completion": "r"}, "prompt_completion",
         "prompt[1].role 'bot' is not one of system, user, assistant"),
    ],
)
def test_bad_rows_give_exact_reasons(row, fmt, reason):
    """Every kind of invalid row is rejected with a reason that names the field and the turn."""
    with pytest.raises(RowError) as err:
        normalize(row, fmt)
    assert str(err.value) == reason


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"text": "hello"}, None),
        ({"instruction": "x"}, None),  # alpaca needs an output
        ({"prompt": "x"}, None),
        ("a string", None),
        ({"messages": [], "conversations": []}, "messages"),  # messages wins
        ({"conversations": []}, "sharegpt"),
    ],
)
def test_detect(row, fmt):
    """Detection looks only at which keys a row has."""
    assert detect(row) == fmt


def test_unknown_format_is_a_programming_error():
    """normalize only accepts the known format names."""
    with pytest.raises(ValueError, match="unknown format 'chatml'"):
        normalize({"messages": []}, "chatml")
    assert FORMATS == ("messages", "alpaca", "sharegpt", "prompt_completion")


@pytest.mark.parametrize(
    "name, head, kind",
    [
        ("data.jsonl", b'{"messages": []}\n', "jsonl"),
        ("data.json", b'  [\n {"a": 1}]', "json"),
        ("data.json", b'{"a": 1}\n{"a": 2}\n', "jsonl"),  # JSON Lines behind a .json name
        ("data.jsonl", b"\xef\xbb\xbf[{}]", "json"),  # content beats the name, BOM ignored
        ("data.csv", b"instruction,output\n", "csv"),
        ("data.parquet", b"PAR1....", "parquet"),
        ("blob", b"PAR1....", "parquet"),
        ("blob", b'{"prompt": "x"}', "jsonl"),
        ("blob", b"hello", None),
        ("empty.jsonl", b"", "jsonl"),
    ],
)
def test_file_type(name, head, kind):
    """File type comes from the magic bytes, the first character, then the name."""
    assert file_type(name, head) == kind


def test_strip_gz():
    """Compression suffixes are removed before the type is judged."""
    assert strip_gz("train.jsonl.gz") == "train.jsonl"
    assert strip_gz("train.CSV.GZIP") == "train.CSV"
    assert strip_gz("train.parquet") == "train.parquet"
