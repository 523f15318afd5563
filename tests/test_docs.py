"""Generated and hand-written references stay in step with the code."""

from __future__ import annotations

from pathlib import Path

from gpusentry import contract as c

ROOT = Path(__file__).resolve().parent.parent


def test_every_contract_field_is_documented():
    text = (ROOT / "docs" / "events.md").read_text()
    specs = list(c.COMMON_FIELDS) + [s for group in c.DATASET_FIELDS.values() for s in group]
    missing = [s.path for s in specs if f"`{s.path}`" not in text]
    assert not missing, f"docs/events.md does not describe: {missing}"
    for code in c.RejectCode:
        assert f"`{code.value}`" in text, f"reject code {code.value} is undocumented"


def test_readme_states_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make run" in text and "make test" in text
