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


def test_the_detector_guide_shows_the_detector_as_it_is():
    """docs/detectors.md walks through a shipped detector; its code block must be a verbatim excerpt."""
    import re

    text = (ROOT / "docs" / "detectors.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    source = (ROOT / "detectors" / "process" / "gpu_tuning.py").read_text()
    assert block in source, "docs/detectors.md: update the example from detectors/process/gpu_tuning.py"
    from detectors.engine import discover

    assert "process.gpu_tuning" in {cls.id for cls in discover()}


def test_the_detector_catalogue_and_its_runbooks_are_current_and_complete():
    """docs/catalogue.md is written from every detector's metadata and docs/runbooks.toml: a new detector, or a kind
    of evidence without a runbook (what it means, how to confirm, how to contain), makes it stale or unwritable."""
    import subprocess
    import sys
    import tomllib

    from detectors.base import Signal
    from detectors.engine import discover

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "scripts" / "detector_catalogue.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = (root / "docs" / "catalogue.md").read_text()
    assert all(f"| `{d.id}` |" in text for d in discover())
    books = {b["signal"]: b for b in tomllib.loads((root / "docs" / "runbooks.toml").read_text())["runbook"]}
    assert set(books) == {v for k, v in vars(Signal).items() if k.isupper()}
    assert all(b["confirm"] and b["contain"] for b in books.values())


def test_the_readme_pictures_are_current():
    """docs/architecture.svg and docs/up-demo.svg are rendered by scripts/readme_images.py (the second from the
    live view's own code and the demo scenario's incidents): an edit to either makes them stale."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_images.py"), "--check"], capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr


def test_every_relative_link_in_the_docs_resolves():
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_the_sections_each_command_reads_are_documented_as_the_cli_declares_them():
    import re

    from gpusentry import cli

    text = (ROOT / "docs" / "reference.md").read_text()
    table = {m[0]: m[1] for m in re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|$", text, flags=re.M)}
    documented = {}
    for commands, sections in table.items():
        for command in re.findall(r"`([^`]+)`", commands):
            documented[command] = sections.strip()
    declared = {"agent": cli.USES_AGENT, "worker": cli.USES_WORKER, "forward": cli.USES_FORWARD,
                "replay": cli.USES_REPLAY, "report": cli.USES_REPORT, "waste": cli.USES_DETECTION,
                "pools": cli.USES_DETECTION, "knowledge": cli.USES_DETECTION, "topics create": cli.USES_TOPICS,
                "feedback": cli.USES_FEEDBACK, "deadletters": cli.USES_OUTPUTS, "outputs test": cli.USES_OUTPUTS}
    for command, sections in declared.items():
        assert documented[command].split(" (")[0] == ", ".join(sections), command
    assert documented["up"] == documented["config check"] == "all"
