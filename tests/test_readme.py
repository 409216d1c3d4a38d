"""README.md stays true: generated sections equal their generators, and set-up is exactly two commands.

Regenerate the generated sections with `python tests/test_readme.py --update`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def generated_sections() -> dict[str, str]:
    """Marker name -> the text that belongs between its markers."""
    from service.cli import spec_reference
    from service.config import settings_table

    return {"spec-reference": spec_reference().rstrip("\n"), "settings": settings_table().rstrip("\n")}


def section(text: str, name: str) -> str:
    """The text between `<!-- name:start -->` and `<!-- name:end -->` (exactly one pair must exist)."""
    found = re.findall(rf"<!-- {name}:start -->\n(.*?)\n?<!-- {name}:end -->", text, re.S)
    if len(found) != 1:
        raise ValueError(f"README.md must hold exactly one {name} section, found {len(found)}")
    return found[0]


def render(text: str) -> str:
    """README text with every generated section replaced by its generator's output."""
    for name, body in generated_sections().items():
        section(text, name)  # raises when the markers are missing
        text = re.sub(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)",
                      lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text, flags=re.S)
    return text


def test_spec_reference_matches_the_model():
    assert section(README.read_text(), "spec-reference") == generated_sections()["spec-reference"], (
        "README.md's spec reference is stale: run `python tests/test_readme.py --update`")


def test_settings_table_matches_the_config():
    assert section(README.read_text(), "settings") == generated_sections()["settings"], (
        "README.md's settings table is stale: run `python tests/test_readme.py --update`")


def test_spec_reference_lists_every_field_of_every_section():
    from pydantic import BaseModel

    from job.spec import JobSpec

    reference = generated_sections()["spec-reference"]
    expected = []
    for name, f in JobSpec.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            expected += [f"{name}.{sub}" for sub in f.annotation.model_fields]
        else:
            expected.append(name)
    listed = re.findall(r"^\| `([a-z_.]+)` \|", reference, re.M)
    assert sorted(listed) == sorted(expected) and len(set(listed)) == len(listed)


def test_full_example_sets_every_field():
    from pydantic import BaseModel

    from job.spec import JobSpec, load_spec

    data = yaml.safe_load((ROOT / "examples" / "full.yaml").read_text())
    load_spec(str(ROOT / "examples" / "full.yaml"))
    for name, f in JobSpec.model_fields.items():
        assert name in data, f"examples/full.yaml lacks {name}"
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            assert set(data[name]) == set(f.annotation.model_fields), f"examples/full.yaml: {name}"


def test_every_example_spec_is_valid():
    from job.spec import load_spec

    specs = sorted((ROOT / "examples").glob("*.yaml"))
    assert {p.name for p in specs} >= {"minimal.yaml", "full.yaml", "multiturn.yaml", "alpaca.yaml", "demo.yaml"}
    for path in specs:
        load_spec(str(path))


def test_setup_is_exactly_make_demo_and_make_test():
    text = README.read_text()
    assert section(text, "setup") == "```sh\nmake demo\nmake test\n```"
    # no other set-up command anywhere: `make demo` and `make test` are the only make targets a reader is told to run
    assert set(re.findall(r"\bmake [a-z-]+", text)) <= {"make demo", "make test", "make bench"}


def test_readme_mentions_every_metric_and_alert():
    from service import metrics

    text = README.read_text()
    names = {v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str) and v.startswith("sftops_")}
    assert names and not [n for n in names if f"`{n}" not in text]
    alerts = yaml.safe_load((ROOT / "charts" / "sftops" / "files" / "alerts.yaml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in text


def test_readme_lists_every_verdict():
    from job.health import VERDICTS

    text = README.read_text()
    assert [v for v in VERDICTS if f"| `{v}` |" not in text] == []


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_readme.py --update")
    sys.path.insert(0, str(ROOT))
    README.write_text(render(README.read_text()))
    print("README.md updated")


def test_demo_dataset_is_what_the_generator_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dataset", ROOT / "examples" / "make_dataset.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--out", str(tmp_path / "d.jsonl")]) == 0
    committed = ROOT / "examples" / "data" / "support_tickets.jsonl"
    assert (tmp_path / "d.jsonl").read_bytes() == committed.read_bytes()
    import json

    from job.formats import detect

    rows = [json.loads(line) for line in committed.read_text().splitlines()]
    assert len(rows) == 1000 and len({json.dumps(r) for r in rows}) == 1000
    assert {detect(r) for r in rows} == {"messages"}
    reply = json.loads(rows[0]["messages"][-1]["content"])
    assert set(reply) == {"category", "priority", "summary"}
