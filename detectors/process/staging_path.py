"""Executables run from world-writable staging directories or odd hidden directories: a weak signal alone."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import odd_hidden_dir, process_fields, staging_dir
from gpusentry.contract import Dataset, event_time

# Tooling that legitimately builds and runs executables under /tmp: pip build isolation, Ray runtime
# environments, PyInstaller one-file bundles, `go run`, Bazel, pytest's tmp_path, Nix builds.
BENIGN_STAGING_PREFIXES = ("/tmp/pip-build-env-", "/tmp/pip-install-", "/tmp/pip-req-build-", "/tmp/ray/session_",
                           "/tmp/_MEI", "/tmp/go-build", "/tmp/bazel", "/tmp/pytest-of-", "/tmp/nix-build-",
                           "/tmp/cargo-install", "/tmp/uv-", "/tmp/.mount_")


class StagingPath(Detector):
    id = "process.staging_path"
    title = "Executable run from a staging or hidden directory"
    description = ("A process started from /tmp, /var/tmp, /dev/shm or a hidden directory that ordinary "
                   "tooling does not use (~/.x/, /var/.cache-x/): where droppers put miners. Alone it is a "
                   "weak signal (low); /dev/shm (memory only, nothing on disk) is medium.")
    severity = "low"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1074/001/",)
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.SUSPICIOUS_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("binary in /tmp", True, [proc("/tmp/.x/kthread -B")]),
        Example("binary in /dev/shm", True, [proc("/dev/shm/update --quiet")]),
        Example("odd hidden directory in home", True, [proc("/home/ml/.sysd/agent")]),
        Example("python running a script in /tmp", False, [proc("/usr/bin/python3 /tmp/run.py")]),
        Example("pip build isolation", False,
                [proc("/tmp/pip-build-env-abc123/overlay/bin/cmake --build .")]),
        Example("ray runtime env python", False,
                [proc("/tmp/ray/session_2026-11-29_10-00-00_1/runtime_resources/conda/x/bin/python worker.py")]),
        Example("virtualenv python", False, [proc("/home/ml/.venv/bin/python train.py")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        exe = event["process"].get("executable")
        if not exe or exe.startswith(BENIGN_STAGING_PREFIXES):
            return ()
        where = staging_dir(exe)
        hidden = odd_hidden_dir(exe)
        if not where and not hidden:
            return ()
        place = where or f"hidden directory {hidden}"
        severity = "medium" if where in ("/dev/shm", "/run/shm") else "low"
        return [self.finding(event, f"{exe} runs from {place} (pid {event['process']['pid']})",
                             timestamp=event_time(event), severity=severity, score=0.4,
                             fields=process_fields(event))]
