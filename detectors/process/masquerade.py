"""A process that calls itself a kernel thread or a system daemon but runs from somewhere else."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

from detectors.base import Detector, Example, Finding, Signal
from detectors.examples import proc
from detectors.process._cmdline import basename, in_system_dir, odd_hidden_dir, process_fields, staging_dir
from gpusentry.contract import Dataset, event_time

# Kernel threads have no executable at all: a "kworker" with a path on disk is never the kernel's.
KERNEL_THREAD = re.compile(
    r"^\[?(kworker|kthreadd|ksoftirqd|kswapd\d*|migration|rcu_\w+|watchdog|kdevtmpfs|khugepaged|kcompactd\d*|"
    r"jbd2|kauditd|kblockd|kintegrityd|khungtaskd|oom_reaper|writeback|kthrotld|irq|cpuhp|idle_inject|"
    r"ksmd|netns|kstrp|xfsaild|scsi_eh_\d+|nvidia-modeset|ecryptfs-kthrea)(?:[/:\]]|$)")
# Daemons of the operating system: their real binaries come with the distribution, never from /usr/local.
OS_DAEMONS = frozenset({
    "systemd", "systemd-journald", "systemd-logind", "systemd-resolved", "systemd-networkd", "systemd-udevd",
    "systemd-timesyncd", "sshd", "cron", "crond", "atd", "dbus-daemon", "rsyslogd", "syslogd", "polkitd", "agetty",
    "udevd", "irqbalance", "chronyd", "ntpd", "auditd", "accounts-daemon", "networkmanager", "wpa_supplicant",
    "udisksd", "multipathd", "init", "upstart", "getty", "master", "postfix",
})
# Infrastructure daemons that are often installed by hand (/usr/local/bin, /opt) or run from container paths.
INFRA_DAEMONS = frozenset({"containerd", "containerd-shim", "dockerd", "kubelet", "kube-proxy", "nvidia-persistenced",
                           "nv-hostengine", "dcgm-exporter", "snapd"})
DAEMONS = OS_DAEMONS | INFRA_DAEMONS
_INFRA_PLACES = ("/usr/local/", "/run/containerd/", "/var/lib/", "/opt/", "/snap/")


class Masquerade(Detector):
    id = "process.masquerade"
    title = "Process masquerading as a kernel thread or system daemon"
    description = ("A process named like a kernel thread (kworker, kthreadd, ksoftirqd, ...) that has an "
                   "executable on disk, or named like a system daemon (systemd-journald, sshd, containerd, ...) "
                   "running from a user, staging or hidden directory. Miners rename themselves this way to hide "
                   "in process lists.")
    severity = "medium"
    technique = "T1496"
    references = ("https://attack.mitre.org/techniques/T1036/004/", "https://attack.mitre.org/techniques/T1496/")
    datasets = frozenset({Dataset.PROCESS})
    signal = Signal.SUSPICIOUS_PROCESS

    examples: ClassVar[list[Example]] = [
        Example("kworker from /dev/shm", True, [proc("/dev/shm/.k/kworker -c conf.json", name="kworker/0:2")]),
        Example("journald from a home directory", True,
                [proc("/home/ml/bin/systemd-journald --quiet")]),
        Example("bracketed kthreadd name with a path", True,
                [proc("/var/tmp/x --bg", name="[kthreadd]")]),
        Example("real journald", False, [proc("/usr/lib/systemd/systemd-journald")]),
        Example("real sshd", False, [proc("/usr/sbin/sshd -D", parent="systemd", parent_pid=1, user="root")]),
        Example("kubelet in /usr/local/bin", False, [proc("/usr/local/bin/kubelet --config=/var/lib/kubelet/c.yaml")]),
        Example("udevd in /usr/local/bin", True, [proc("/usr/local/bin/systemd-udevd -c /etc/udev/u.json")]),
        Example("worker script named like a word", False, [proc("/home/ml/bin/watchdog.py --every 60")]),
    ]

    def process(self, event: dict[str, Any], state: Any) -> Iterable[Finding]:
        if event["event"]["type"] != ["start"]:
            return ()
        p = event["process"]
        exe = p.get("executable")
        if not exe:
            return ()
        name = p["name"]
        exe_name = basename(exe)
        odd_place = staging_dir(exe) or odd_hidden_dir(exe)
        what = None
        if KERNEL_THREAD.match(name) or KERNEL_THREAD.match(exe_name):
            what = f"kernel-thread name {name!r} with an executable {exe}"
        elif (name.lower() in OS_DAEMONS or exe_name.lower() in OS_DAEMONS) and (
                not in_system_dir(exe) or exe.startswith(("/usr/local/", "/opt/", "/var/lib/"))):
            what = f"system daemon name {name!r} run from {exe}"
        elif (name.lower() in INFRA_DAEMONS or exe_name.lower() in INFRA_DAEMONS) and not in_system_dir(exe) \
                and not exe.startswith(_INFRA_PLACES):
            what = f"daemon name {name!r} run from {exe}"
        if what is None:
            return ()
        severity = "high" if odd_place else "medium"
        return [self.finding(event, f"masquerading process pid {p['pid']}: {what}", timestamp=event_time(event),
                             severity=severity, score=0.7, fields=process_fields(event))]
