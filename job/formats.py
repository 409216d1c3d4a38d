"""Dataset row formats: detect a row's format and normalize it to `{"messages": [...]}`.

Pure functions, no I/O. Supported formats:
  messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}  (OpenAI / ChatML)
  alpaca             {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
  sharegpt           {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...], "system": str (optional)}
  prompt_completion  {"prompt": str | [messages], "completion": str | [messages]}
A normalized conversation has known roles and non-empty string contents, an optional system turn first,
then a user turn, and ends with an assistant turn.
"""

from __future__ import annotations

from typing import Any

import orjson

FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion")
ROLES = ("system", "user", "assistant")
# ShareGPT speakers; "user"/"assistant" appear in many ShareGPT-style exports too.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_MESSAGE_ROLES = {role: role for role in ROLES}
FILE_TYPES = ("jsonl", "json", "csv", "parquet")
# Fields that hold lists; CSV cells (and some Parquet exports) carry them as JSON text.
LIST_FIELDS = ("messages", "conversations")


class RowError(ValueError):
    """Why one row is invalid; the caller adds FILE:LINE."""


def detect(row: Any) -> str | None:
    """The format a row is written in, judged by its keys, or None if it matches none."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def describe_keys(row: Any) -> str:
    """A short description of a row's keys for error messages."""
    if not isinstance(row, dict):
        return f"a JSON {type_name(row)}"
    keys = sorted(str(k) for k in row)
    shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
    return f"fields [{shown}]" if keys else "no fields"


def type_name(value: Any) -> str:
    """JSON-ish type name of a Python value."""
    return {
        dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def unrecognized(row: Any) -> RowError:
    """The error for a row whose format cannot be detected."""
    return RowError(
        "unrecognized row: expected a 'messages' list, a 'conversations' list, 'instruction' + 'output', "
        f"or 'prompt' + 'completion', got {describe_keys(row)}"
    )


def normalize(row: Any, fmt: str) -> list[dict[str, str]]:
    """Turn one row of format `fmt` into a validated message list; raises RowError with the reason."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got a JSON {type_name(row)}")
    if fmt == "messages":
        turns = _turns(_list_field(row, "messages"), "messages", "role", "content", _MESSAGE_ROLES)

        def labels():
            """Error-message names of the turns (built only for a bad row)."""
            return [f"messages[{i}]" for i in range(len(turns))]
    elif fmt == "sharegpt":
        turns = _turns(_list_field(row, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
        system = row.get("system")
        added = system is not None and bool(_text(system, "'system'", allow_empty=True).strip())
        added = added and turns[0]["role"] != "system"
        if added:
            turns.insert(0, {"role": "system", "content": system})

        def labels():
            """Error-message names of the turns, the top-level system first if it was added."""
            return ["'system'"] * added + [f"conversations[{i}]" for i in range(len(turns) - added)]
    elif fmt == "alpaca":
        turns, labels = _alpaca(row)
    elif fmt == "prompt_completion":
        turns, labels = _prompt_completion(row)
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    problem = _structure_problem(turns)
    if problem is not None:
        index, template = problem
        raise RowError(template.format(label=labels()[index]))
    return turns


def _list_field(row: dict, name: str) -> list:
    """A list-valued field, parsed from JSON text when it came from a CSV cell; raises RowError."""
    value = row.get(name)
    if type(value) is list and value:
        return value
    if value is None:
        raise RowError(f"missing field '{name}' ({describe_keys(row)})" if name not in row else f"'{name}' is null")
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise RowError(f"'{name}' is text that is not a JSON array") from None
    if not isinstance(value, list):
        raise RowError(f"'{name}' must be an array of turns, got a JSON {type_name(value)}")
    if not value:
        raise RowError(f"'{name}' is empty")
    return value


def _turns(items: list, field: str, role_key: str, text_key: str, role_map: dict[str, str]) -> list[dict[str, str]]:
    """Validate turn objects and map their roles to system/user/assistant; raises RowError naming the turn."""
    turns = []
    append = turns.append
    for item in items:
        # Fast path for a well-formed turn; anything odd is diagnosed by _turn_error.
        try:
            role = role_map[item[role_key]]
            content = item[text_key]
        except (KeyError, TypeError):
            raise _turn_error(item, len(turns), field, role_key, text_key, role_map) from None
        if type(content) is not str or not content or content.isspace():
            raise _turn_error(item, len(turns), field, role_key, text_key, role_map)
        append({"role": role, "content": content})
    return turns


def _turn_error(item: Any, i: int, field: str, role_key: str, text_key: str, role_map: dict[str, str]) -> RowError:
    """Why turn `i` is invalid."""
    where = f"{field}[{i}]"
    if not isinstance(item, dict):
        return RowError(f"{where} must be an object with '{role_key}' and '{text_key}', got a JSON {type_name(item)}")
    raw_role = item.get(role_key)
    role = role_map.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        if raw_role is None:
            return RowError(f"{where}.{role_key} is missing")
        known = ", ".join(ROLES if role_map is _MESSAGE_ROLES else ("system", "human", "gpt"))
        return RowError(f"{where}.{role_key} {raw_role!r} is not one of {known}")
    content = item.get(text_key)
    if content is None:
        return RowError(f"{where}.{text_key} is missing ({role} turn)")
    if type(content) is not str:
        return RowError(f"{where}.{text_key} must be a string, got a JSON {type_name(content)} ({role} turn)")
    return RowError(f"{where}.{text_key} is empty ({role} turn)")


def _text(value: Any, label: str, allow_empty: bool = False) -> str:
    """A string field's value; raises RowError if it is not a (non-empty) string."""
    if type(value) is not str:
        if value is None:
            raise RowError(f"{label} is missing")
        raise RowError(f"{label} must be a string, got a JSON {type_name(value)}")
    if not allow_empty and (not value or value.isspace()):
        raise RowError(f"{label} is empty")
    return value


def _alpaca(row: dict):
    """Alpaca: optional system, user = instruction (+ blank line + input), assistant = output."""
    instruction = _text(row.get("instruction"), "'instruction'")
    extra = row.get("input")
    extra = "" if extra is None else _text(extra, "'input'", allow_empty=True)
    output = _text(row.get("output"), "'output'")
    system = row.get("system")
    system = "" if system is None else _text(system, "'system'", allow_empty=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    labels = ["'instruction'", "'output'"]
    if system.strip():
        turns.insert(0, {"role": "system", "content": system})
        labels.insert(0, "'system'")
    return turns, lambda: labels


def _prompt_completion(row: dict):
    """prompt/completion: each a string (user / assistant) or a list of messages."""
    turns, labels = [], []
    for field, role in (("prompt", "user"), ("completion", "assistant")):
        value = row.get(field)
        if isinstance(value, list):
            if not value:
                raise RowError(f"'{field}' is empty")
            part = _turns(value, field, "role", "content", _MESSAGE_ROLES)
            labels += [f"{field}[{i}]" for i in range(len(part))]
        else:
            part = [{"role": role, "content": _text(value, f"'{field}'")}]
            labels.append(f"'{field}'")
        turns += part
    return turns, lambda: labels


def _structure_problem(turns: list[dict[str, str]]) -> tuple[int, str] | None:
    """None for optional system, user, ..., assistant; else (turn index, message template with {label})."""
    roles = [t["role"] for t in turns]
    start = 1 if roles[0] == "system" else 0
    if roles[-1] == "assistant" and len(roles) > start and roles[start] == "user" and roles.count("system") == start:
        return None
    if "user" not in roles:
        return 0, "the conversation has no user turn"
    if roles[-1] != "assistant":
        return len(roles) - 1, f"the conversation must end with an assistant turn, but {{label}} is a {roles[-1]} turn"
    for i in range(start, len(roles)):
        if roles[i] == "system":
            return i, "{label} is a system turn; a system turn is only allowed first"
    return start, (
        "the conversation must start with a user turn (after an optional system turn), "
        f"but {{label}} is an {roles[start]} turn"
    )


def file_type(name: str, head: bytes) -> str | None:
    """'jsonl', 'json', 'csv' or 'parquet' from a file name (without .gz) and its first (decompressed) bytes."""
    lower = name.lower()
    if head.startswith(b"PAR1") or lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".csv",)):
        return "csv"
    first = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if first == b"[":
        return "json"
    if first == b"{" or lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return None


def strip_gz(name: str) -> str:
    """A file name without its .gz/.gzip suffix."""
    lower = name.lower()
    for suffix in (".gz", ".gzip"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name
