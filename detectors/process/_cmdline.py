"""Reading process events the way a shell would: argument vectors, shell scripts, paths.

Shared by the process detectors.  Nothing here raises on odd input: a command line that
``shlex`` cannot split (unbalanced quotes, truncated by the agent) falls back to whitespace.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ash", "ksh", "busybox", "fish", "tcsh", "csh"})
DOWNLOADERS = frozenset({"curl", "wget", "fetch", "aria2c", "tftp", "ftp", "scp", "rsync", "nc", "ncat",
                         "netcat", "socat", "busybox-wget"})
# Programs that only read, search, edit or fetch text: their arguments *mention* miners, they do not run them.
TEXT_TOOLS = frozenset({
    "grep", "egrep", "fgrep", "rg", "ag", "ack", "zgrep", "less", "more", "cat", "bat", "tail", "head", "vi",
    "vim", "nvim", "nano", "emacs", "code", "ed", "sed", "awk", "gawk", "find", "locate", "ls", "file", "stat",
    "echo", "printf", "man", "strings", "wc", "sort", "uniq", "diff", "journalctl", "pip", "pip3", "apt",
    "apt-get", "apt-cache", "dpkg", "yum", "dnf", "rpm", "git", "docker", "kubectl", "jq", "yq", "tar", "unzip",
    "zip", "gzip", "md5sum", "sha256sum", "clamscan", "yara", "rm", "mv", "cp", "chmod", "chown", "pgrep",
    "pkill", "kill", "killall", "ps", "top", "htop", "lsof", "strace", "which", "whereis", "type", "test",
})
_SPLIT_OPERATORS = {"|", "||", "&&", ";", "&", "(", ")", "\n"}

STAGING_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/", "/run/shm/", "/dev/mqueue/")
# Hidden directories that ordinary tooling installs executables into; the rest are odd places to run from.
COMMON_HIDDEN_DIRS = frozenset({
    ".local", ".venv", ".conda", ".pyenv", ".cargo", ".rustup", ".nvm", ".npm", ".yarn", ".bun", ".deno",
    ".vscode-server", ".cursor-server", ".vscode", ".sdkman", ".virtualenvs", ".poetry", ".pixi", ".rye",
    ".jupyter", ".ipython", ".cache", ".config", ".mamba", ".micromamba", ".juliaup", ".julia", ".go",
    ".pulumi", ".docker", ".kube", ".krew", ".linuxbrew", ".git", ".tox", ".nox", ".uv", ".asdf", ".volta",
    ".dotnet", ".gradle", ".m2", ".sbt", ".ivy2", ".modular", ".triton", ".nv",
})
_SYSTEM_DIRS = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/", "/snap/", "/nix/store/",
                "/var/lib/", "/etc/")


def basename(path: str | None) -> str:
    return path.rsplit("/", 1)[-1] if path else ""


def split(command_line: str) -> list[str]:
    try:
        return shlex.split(command_line, posix=True)
    except ValueError:
        return command_line.split()


def argv(process: Mapping[str, Any]) -> list[str]:
    """The argument vector: ``process.args`` when the agent sent it, else the split command line."""
    args = process.get("args")
    if isinstance(args, list) and args and all(isinstance(a, str) for a in args):
        return list(args)
    line = process.get("command_line")
    if isinstance(line, str) and line:
        return split(line)
    name = process.get("executable") or process.get("name")
    return [name] if isinstance(name, str) else []


def _script_of(args: list[str]) -> str | None:
    """The script of ``sh -c SCRIPT`` (also ``bash -lc``, ``busybox sh -c``), else None."""
    if not args or basename(args[0]) not in SHELLS:
        return None
    for i, a in enumerate(args[1:], 1):
        if a.startswith("-") and not a.startswith("--") and "c" in a[1:] and i + 1 < len(args):
            return args[i + 1]
    return None


def script_of(args: list[str]) -> str | None:
    """The script of ``sh -c SCRIPT`` (also ``bash -lc``), else None."""
    return _script_of(args)


# Programs that run another program given on their command line (nohup CMD, timeout 10 CMD, screen -dmS s CMD):
# option -> takes a value.  The first argument that is neither an option nor a value starts the command; some
# wrappers take one positional argument before it (timeout's duration, taskset's mask, chrt's priority).
_WRAPPERS: dict[str, tuple[frozenset[str], int]] = {
    "nohup": (frozenset(), 0), "exec": (frozenset(), 0), "command": (frozenset(), 0), "builtin": (frozenset(), 0),
    "setsid": (frozenset(), 0), "stdbuf": (frozenset({"-i", "-o", "-e"}), 0),
    "sudo": (frozenset({"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T", "--user", "--group"}), 0),
    "doas": (frozenset({"-u", "-C"}), 0), "nice": (frozenset({"-n", "--adjustment"}), 0),
    "ionice": (frozenset({"-c", "-n", "--class", "--classdata"}), 0),
    "timeout": (frozenset({"-s", "-k", "--signal", "--kill-after"}), 1),
    "taskset": (frozenset(), 1), "chrt": (frozenset({"-T", "-P", "-D"}), 1),
    "env": (frozenset({"-u", "--unset", "-C", "--chdir"}), 0),
    "systemd-run": (frozenset({"-u", "--unit", "-p", "--property", "--description", "--slice", "-E", "--setenv",
                               "--uid", "--gid", "--working-directory", "-M", "--machine", "-H", "--host",
                               "--on-active", "--on-boot", "--on-startup", "--on-unit-active", "--on-unit-inactive",
                               "--on-calendar", "--timer-property", "--path-property", "--socket-property",
                               "--service-type", "--nice", "--send-sighup", "--expand-environment"}), 0),
    "screen": (frozenset({"-S", "-c", "-e", "-h", "-p", "-T", "-t", "-Logfile", "-L"}), 0),
}
# Wrappers whose options mean "not a launch" (taskset -p PID changes a running process).
_NOT_A_LAUNCH = {"taskset": ("-p", "--pid"), "ionice": ("-p", "--pid"), "chrt": ("-p", "--pid"),
                 "screen": ("-X", "-ls", "-list", "-r", "-x", "-R", "-wipe")}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def unwrap(args: list[str]) -> list[str]:
    """The command a wrapper runs: ``nohup``, ``setsid``, ``sudo``, ``env X=1``, ``nice``, ``ionice``, ``timeout``,
    ``taskset``, ``chrt``, ``stdbuf``, ``systemd-run``, ``screen -dmS NAME``, ``tmux new -d``; nested ones too.
    A tmux command given as one string comes back as ``sh -c STRING``.  Anything else comes back as it is."""
    for _ in range(8):
        while args and _ASSIGNMENT.match(args[0]):  # VAR=value CMD
            args = args[1:]
        if not args:
            return args
        name = basename(args[0])
        if name == "tmux":
            inner = _tmux_command(args[1:])
            if inner is None:
                return args
            args = inner
            continue
        spec = _WRAPPERS.get(name)
        if spec is None:
            return args
        takes_value, positional = spec
        if any(a in _NOT_A_LAUNCH.get(name, ()) or a.startswith(tuple(f"{o}=" for o in _NOT_A_LAUNCH.get(name, ())))
               for a in args[1:]):
            return args
        i = 1
        while i < len(args):
            a = args[i]
            if a == "--":
                i += 1
                break
            if name == "env" and _ASSIGNMENT.match(a):
                i += 1
                continue
            if name == "env" and a in ("-S", "--split-string") and i + 1 < len(args):
                args = [args[0], *split(args[i + 1]), *args[i + 2:]]  # env -S "cmd args": split like a shell
                continue
            if a.startswith("-") and len(a) > 1:
                takes = "=" not in a and (a in takes_value or _attached_value(name, a, takes_value))
                i += 2 if takes else 1
                continue
            break
        rest = args[i:]
        rest = rest[positional:] if len(rest) > positional else []
        if not rest:
            return args
        args = rest
    return args


def _attached_value(name: str, opt: str, takes_value: frozenset[str]) -> bool:
    """``-dmS name``: screen's combined flags end in one that takes a value."""
    return name == "screen" and not opt.startswith("--") and f"-{opt[-1]}" in takes_value and len(opt) > 2


_TMUX_NEW = frozenset({"new-session", "new", "new-window", "neww", "split-window", "splitw", "respawn-pane",
                       "respawnp", "respawn-window", "respawnw"})
_TMUX_VALUE = frozenset({"-s", "-n", "-c", "-x", "-y", "-e", "-F", "-t", "-l", "-f", "-L", "-S"})


def _tmux_command(args: list[str]) -> list[str] | None:
    """The shell command of ``tmux [-L x] new-session -d -s NAME 'CMD'`` (or ``send-keys -t T 'CMD' Enter``)."""
    i = 0
    while i < len(args) and args[i].startswith("-"):  # tmux's own options (-L socket, -f file, -2, -u)
        i += 2 if args[i] in ("-L", "-S", "-f", "-T") else 1
    if i >= len(args):
        return None
    sub, rest = args[i], args[i + 1:]
    if sub in ("send-keys", "send"):
        keys, j = [], 0
        while j < len(rest):
            if rest[j] in ("-t", "-N"):
                j += 2
                continue
            if rest[j].startswith("-"):
                j += 1
                continue
            if rest[j] not in ("Enter", "C-m", "KPEnter"):
                keys.append(rest[j])
            j += 1
        return ["sh", "-c", " ".join(keys)] if keys else None
    if sub not in _TMUX_NEW:
        return None
    j = 0
    while j < len(rest) and rest[j].startswith("-") and rest[j] != "--":
        j += 2 if rest[j] in _TMUX_VALUE else 1
    if j < len(rest) and rest[j] == "--":
        j += 1
    command = rest[j:]
    if not command:
        return None
    return ["sh", "-c", command[0]] if len(command) == 1 else command


def segments(args: list[str], depth: int = 0) -> list[list[str]]:
    """Simple commands this process runs: itself (inside any wrapper), or each command of its ``-c`` script."""
    args = unwrap(args)
    script = _script_of(args)
    if script is None or depth > 3:
        return [args] if args else []
    try:
        lex = shlex.shlex(script, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
    except ValueError:
        tokens = script.split()
    out: list[list[str]] = []
    current: list[str] = []
    for tok in tokens:
        if tok in _SPLIT_OPERATORS or set(tok) <= set("|&;()"):
            if current:
                out.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        out.append(current)
    nested: list[list[str]] = []
    for seg in out:
        if seg:
            nested.extend(segments(seg, depth + 1))  # wrappers inside the script are unwrapped there
    return nested


# Container CLIs read logs and inspect with most subcommands, but these start programs with the given args.
CONTAINER_CLIS = frozenset({"docker", "podman", "nerdctl", "kubectl", "crictl", "ctr"})
_CONTAINER_RUN = frozenset({"run", "exec", "create", "debug", "container", "task"})


def is_text_tool(args: list[str]) -> bool:
    """True for programs whose arguments only mention things (grep xmrig, docker logs miner)."""
    if not args:
        return False
    exe = args[0]
    if "/" in exe and (not exe.startswith("/") or staging_dir(exe)):
        # ./test, bin/grep, /tmp/ls: a file someone put there under a tool's name (GMiner renamed `test` was
        # published so), not the tool; a tool is run from PATH or an absolute install path.
        return False
    name = basename(exe).lower()
    if name in CONTAINER_CLIS:
        sub = next((a for a in args[1:] if not a.startswith("-")), "")
        return sub not in _CONTAINER_RUN
    return name in TEXT_TOOLS


def staging_dir(path: str | None) -> str | None:
    """The world-writable staging directory ``path`` lives in (/tmp, /dev/shm, ...), if any."""
    if not path:
        return None
    for prefix in STAGING_DIRS:
        if path.startswith(prefix):
            return prefix.rstrip("/")
    return None


def odd_hidden_dir(path: str | None) -> str | None:
    """The first hidden directory in ``path`` that ordinary tooling does not use, if any."""
    if not path:
        return None
    for part in path.split("/")[:-1]:
        if part.startswith(".") and part not in (".", "..") and part not in COMMON_HIDDEN_DIRS:
            return part
    return None


def in_system_dir(path: str | None) -> bool:
    return bool(path) and path.startswith(_SYSTEM_DIRS)  # type: ignore[union-attr]


# Secrets on command lines: option values (-p PASS, --password=..., --token ...), URL credentials
# (stratum+tcp://user:pass@host), and NAME=value assignments whose name says secret.
_SECRET_OPTION = re.compile(r"(?i)(?<!\S)(-p|--pass|--password|--passwd|--api-key|--apikey|--token|--secret|"
                            r"--access-token|--auth)(=|\s+)(\S+)")
_URL_CREDENTIALS = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+):[^/\s@]+@")
_SECRET_ASSIGNMENT = re.compile(r"(?i)\b([A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_KEY)[A-Z0-9_]*=)\S+")


def redact(command_line: str | None) -> str | None:
    """The command line with passwords, tokens and URL credentials replaced by ``***``."""
    if not command_line:
        return command_line
    text = _SECRET_OPTION.sub(lambda m: f"{m.group(1)}{m.group(2)}***", command_line)
    text = _URL_CREDENTIALS.sub(r"\1:***@", text)
    return _SECRET_ASSIGNMENT.sub(r"\1***", text)


def process_fields(event: Mapping[str, Any]) -> dict[str, Any]:
    """ECS fields an incident should carry about the process of a process event (secrets redacted)."""
    p = event.get("process") or {}
    parent = p.get("parent") or {}
    return {"process.pid": p.get("pid"), "process.name": p.get("name"), "process.executable": p.get("executable"),
            "process.command_line": redact(p.get("command_line")), "process.parent.pid": parent.get("pid"),
            "process.parent.name": parent.get("name"), "user.name": (event.get("user") or {}).get("name"),
            "container.id": (event.get("container") or {}).get("id"),
            **{f"orchestrator.{k}": v for k, v in _owner(event).items()}}


def _owner(event: Mapping[str, Any]) -> dict[str, Any]:
    """The process's scheduler owner (``orchestrator.*``), flattened: the incident carries who to charge."""
    o = event.get("orchestrator")
    if not isinstance(o, dict):
        return {}
    res = o["resource"] if isinstance(o.get("resource"), dict) else {}
    out = {k: o.get(k) for k in ("type", "namespace") if isinstance(o.get(k), str)}
    out.update({f"resource.{k}": res.get(k) for k in ("type", "name", "id") if isinstance(res.get(k), str)})
    return out
