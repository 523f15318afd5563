"""The systemd units in deploy/systemd verify with systemd's own checker and are hardened as documented."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.deploy

UNITS = sorted((Path(__file__).resolve().parent.parent / "deploy" / "systemd").glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")


def service_section(unit: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser["Service"]


@pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze (Debian's systemd)")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit, tmp_path):
    # systemd-analyze checks that ExecStart exists: point it at a stand-in with the same arguments.
    exe = tmp_path / "gpusentry"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = unit.read_text().replace("/opt/gpusentry/venv/bin/gpusentry", str(exe))
    copy = tmp_path / unit.name
    copy.write_text(text)
    r = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line or "Unknown" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_is_hardened(unit):
    s = service_section(unit)
    assert s.get("NoNewPrivileges") == "yes" and s.get("ProtectSystem") == "strict"
    assert s.get("KillSignal") == "SIGTERM" and s.get("Restart") == "always"
    assert "IGNORE_PROCESS_TREE" not in unit.read_text(), "a monitored host's agent hides no process tree"
    if "agent" in unit.name:
        assert set(s["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE",
                                                            "CAP_DAC_READ_SEARCH"}, "the four capabilities, no others"
    else:
        assert s.get("DynamicUser") == "yes" and s.get("CapabilityBoundingSet") == "", "no privilege at all"
        assert s.get("PrivateDevices") == "yes"


def test_every_long_running_command_has_a_unit():
    assert {u.stem for u in UNITS} == {"gpusentry-agent", "gpusentry-worker", "gpusentry-forwarder"}


def test_compose_forwarder_runs_only_with_outputs_and_the_external_listener_is_configurable():
    import yaml

    compose = yaml.safe_load((UNITS[0].parent.parent / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["forwarder"]["profiles"] == ["outputs"], "no restart loop when no output is enabled"
    assert "profiles" not in services["worker"] and "profiles" not in services["kafka"]
    listeners = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert "EXTERNAL://${KAFKA_EXTERNAL_HOST:-localhost}:9094" in listeners
    assert services["worker"]["command"] == ["worker", "--create-topics"]
