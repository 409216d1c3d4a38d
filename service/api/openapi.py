"""Keeps openapi.yaml's JobSpec schemas equal to the pydantic model: `python -m service.api.openapi` rewrites them.

openapi.yaml is written by hand down to a marker line; below it are `components.schemas` entries generated
from `JobSpec.model_json_schema()` with `$defs` references rewritten to `#/components/schemas/...`.
tests/test_contract.py fails when the file is not up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "openapi.yaml"
MARKER = "    # --- generated from job.spec.JobSpec by `python -m service.api.openapi`: do not edit below ---\n"


def jobspec_schemas() -> dict:
    """JobSpec and its sections as OpenAPI component schemas."""
    from job.spec import JobSpec

    schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"JobSpec": schema, **dict(sorted(defs.items()))}


def render(text: str) -> str:
    """The openapi.yaml text with the generated part replaced; raises ValueError without the marker."""
    head, sep, _ = text.partition(MARKER)
    if not sep:
        raise ValueError(f"openapi.yaml lacks the marker line {MARKER.strip()!r}")
    body = yaml.safe_dump(jobspec_schemas(), sort_keys=False, width=100, allow_unicode=True)
    return head + MARKER + "".join(f"    {line}\n" if line else "\n" for line in body.splitlines())


def main(argv: list[str] | None = None) -> int:
    """Rewrite openapi.yaml in place (or check it with --check); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    text = OPENAPI_PATH.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{OPENAPI_PATH} is out of date: run python -m service.api.openapi", file=sys.stderr)
            return 1
        return 0
    OPENAPI_PATH.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
