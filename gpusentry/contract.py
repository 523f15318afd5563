"""Event contract v1: the wire format between agents, workers, replay and outputs.

Events are JSON objects in nested ECS style.  A Kafka message value holds one event object
or a JSON array of events from one host (agents batch a collection cycle into one message,
because a stream processor pays per message, not per byte); the message key is
``host.name``.  ``docs/events.md`` is the prose version of this module; a test keeps the
two in step.

Everything that reads events from outside (the worker, ``gpusentry replay``) goes through
:func:`decode_message` or :func:`validate_event`, which never raise on bad input: they
return a :class:`Reject` with a machine-readable ``code`` (for metrics) and a ``reason``
that says what is wrong and what was expected.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from gpusentry import __version__
from gpusentry.timefmt import format_timestamp, parse_timestamp

CONTRACT_VERSION = 1
ECS_VERSION = "8.11.0"
AGENT_TYPE = "gpusentry"
DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
MAX_PAYLOAD_BYTES = 512


class Dataset(StrEnum):
    GPU = "gpusentry.gpu"
    PROCESS = "gpusentry.process"
    NETWORK = "gpusentry.network"
    DNS = "gpusentry.dns"
    ALERT = "gpusentry.alert"


# (event.kind, event.category, default event.type) per dataset, following ECS's allowed values.
DATASET_ECS: dict[Dataset, tuple[str, list[str], list[str]]] = {
    Dataset.GPU: ("metric", ["host"], ["info"]),
    Dataset.PROCESS: ("event", ["process"], ["start"]),
    Dataset.NETWORK: ("event", ["network"], ["connection", "start"]),
    Dataset.DNS: ("event", ["network"], ["protocol"]),
    Dataset.ALERT: ("alert", ["intrusion_detection"], ["indicator"]),
}
EVENT_KINDS = frozenset({"metric", "event", "alert"})
ALERT_SEVERITIES = ("low", "medium", "high", "critical")
ALERT_STATUSES = frozenset({"open", "resolved"})


class RejectCode(StrEnum):
    OVERSIZE = "oversize"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_VALUE = "bad_value"
    HOST_MISMATCH = "host_mismatch"
    MISSING_KEY = "missing_key"
    CLOCK_SKEW = "clock_skew"


@dataclass(frozen=True, slots=True)
class Reject:
    """One refused message or event: why, and where in the message it sat."""

    code: RejectCode
    reason: str
    index: int | None = None  # position in a batched message; None for the whole message

    def __str__(self) -> str:
        where = f"event {self.index}: " if self.index is not None else ""
        return f"{where}{self.reason}"


class ContractError(ValueError):
    """Raised by the strict helpers (:func:`validate_or_raise`) with the :class:`Reject`."""

    def __init__(self, reject: Reject) -> None:
        super().__init__(str(reject))
        self.reject = reject


@dataclass(slots=True)
class Decoded:
    events: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


# ---------------------------------------------------------------------------- accessors

_MISSING = object()


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (optional objects of hostile input)."""
    return value if isinstance(value, dict) else {}


def get(event: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """Read a dotted ECS path (``"gpu.utilization.gpu_pct"``) from a nested event."""
    return _get_parts(event, path.split("."), default)


def _get_parts(event: Mapping[str, Any], parts: Iterable[str], default: Any) -> Any:
    node: Any = event
    for part in parts:
        # dict, not Mapping: an ABC isinstance check costs more than the lookup itself.
        if type(node) is not dict and not isinstance(node, Mapping):
            return default
        node = node.get(part, _MISSING)
        if node is _MISSING:
            return default
    return node


def set_path(event: dict[str, Any], path: str, value: Any) -> None:
    """Write ``value`` at a dotted path, creating the intermediate objects."""
    *parents, leaf = path.split(".")
    node = event
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def expand_dotted(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``{"host.name": "a"}`` into ``{"host": {"name": "a"}}``, at any depth.

    ``@timestamp`` has no dot and stays as is.  Objects inside lists are expanded too
    (``gpu.processes[]`` entries use flat keys, which pass through unchanged).
    """
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, Mapping):
            value = expand_dotted(value)
        elif isinstance(value, list):
            value = [expand_dotted(v) if isinstance(v, Mapping) else v for v in value]
        if "." in key:
            existing = get(out, key, _MISSING)
            if isinstance(existing, dict) and isinstance(value, dict):
                existing.update(value)
            else:
                set_path(out, key, value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def _has_dotted_key(obj: Mapping[str, Any]) -> bool:
    # One C-level scan of the joined keys, then recursion into nested objects only.
    if "." in "".join(obj):
        return True
    for value in obj.values():
        if type(value) is dict and _has_dotted_key(value):
            return True
    return False


def event_time(event: Mapping[str, Any]) -> float:
    """Epoch seconds of ``@timestamp``: the clock every window and model runs on."""
    return parse_timestamp(event["@timestamp"])


def dataset_of(event: Mapping[str, Any]) -> Dataset:
    return Dataset(event["event"]["dataset"])


def host_of(event: Mapping[str, Any]) -> str:
    return str(event["host"]["name"])


# ---------------------------------------------------------------------------- schema

_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_LIST = (list,)
_DICT = (dict,)
_BOOL = (bool,)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    path: str
    types: tuple[type, ...]
    required: bool = True  # must be present (it may still be null when nullable)
    nullable: bool = False
    choices: frozenset[str] | None = None
    doc: str = ""
    parts: tuple[str, ...] = ()


def _f(path: str, types: tuple[type, ...], doc: str, *, required: bool = True, nullable: bool = False,
       choices: Iterable[str] | None = None) -> FieldSpec:
    return FieldSpec(path, types, required, nullable, frozenset(choices) if choices else None, doc,
                     (path,) if path == "@timestamp" else tuple(path.split(".")))


COMMON_FIELDS: tuple[FieldSpec, ...] = (
    _f("@timestamp", _STR, "Event time, RFC 3339 UTC with milliseconds and `Z`."),
    _f("ecs.version", _STR, "ECS version the event follows."),
    _f("event.kind", _STR, "`metric`, `event` or `alert`.", choices=EVENT_KINDS),
    _f("event.dataset", _STR, "One of the `gpusentry.*` datasets.", choices=[d.value for d in Dataset]),
    _f("event.id", _STR, "Unique id of this event."),
    _f("event.category", _LIST, "ECS categorisation array."),
    _f("event.type", _LIST, "ECS categorisation array."),
    _f("host.name", _STR, "Host the event is about; also the Kafka message key."),
    _f("agent.type", _STR, "`gpusentry`."),
    _f("agent.version", _STR, "Version of the agent that wrote the event."),
)

def _o(path: str, types: tuple[type, ...], doc: str, *, choices: Iterable[str] | None = None) -> FieldSpec:
    """An optional field that may also be null."""
    return _f(path, types, doc, required=False, nullable=True, choices=choices)


DATASET_FIELDS: dict[Dataset, tuple[FieldSpec, ...]] = {
    Dataset.GPU: (
        _f("gpu.index", _INT, "NVML device index (MIG instances: the parent's index)."),
        _f("gpu.uuid", _STR, "NVML UUID (`GPU-…` or `MIG-…`)."),
        _f("gpu.name", _STR, "Product name, e.g. `NVIDIA H100 80GB HBM3`.", nullable=True),
        _o("gpu.utilization.gpu_pct", _NUM, "Percent of time a kernel was running."),
        _o("gpu.utilization.memory_pct", _NUM, "Percent of time the memory controller was busy."),
        _o("gpu.memory.used_bytes", _NUM, "Framebuffer memory in use."),
        _o("gpu.memory.total_bytes", _NUM, "Framebuffer memory installed."),
        _o("gpu.power.draw_watts", _NUM, "Power draw."),
        _o("gpu.power.limit_watts", _NUM, "Enforced power limit."),
        _o("gpu.temperature_c", _NUM, "Core temperature."),
        _o("gpu.clocks.sm_mhz", _NUM, "SM clock."),
        _o("gpu.clocks.mem_mhz", _NUM, "Memory clock."),
        _o("gpu.pcie.rx_bytes_per_s", _NUM, "PCIe receive throughput."),
        _o("gpu.pcie.tx_bytes_per_s", _NUM, "PCIe transmit throughput."),
        _o("gpu.processes", _LIST, "Processes on the GPU: `pid`, `used_memory_bytes`, `sm_pct`, `name`, "
           "`executable`, `command_line` (all but `pid` may be null), and `owner` where the process's cgroup "
           "names one: `kind` (`kubernetes`, `slurm`, `docker`), `pod_uid`, `namespace`, `pod`, `container_id`, "
           "`job_id`, `step`."),
        _o("gpusentry.allocation.source", _STR, "The scheduler that answered for this GPU (absent: none asked).",
           choices=["kubernetes", "slurm", "docker"]),
        _o("gpusentry.allocation.state", _STR, "`current`; `stale` (the scheduler stopped answering, or part of "
           "its answer is missing); `unmanaged` (a GPU the scheduler does not manage).",
           choices=["current", "stale", "unmanaged"]),
        _o("gpusentry.allocation.age_s", _NUM, "Seconds since the scheduler's answer was read."),
        _o("gpusentry.allocation.judges_host_processes", _BOOL, "Whether a process outside every pod/job is "
           "outside the allocation (Kubernetes, Slurm) or ordinary (Docker)."),
        _o("gpusentry.allocation.owners", _LIST, "Who holds the GPU (empty: nobody): objects with `kind` and, as "
           "the scheduler knows them, `namespace`, `pod`, `pod_uid`, `container`, `container_id`, `job_id`, "
           "`job_name`, `user`, `resource`."),
        _f("gpusentry.gpu.status", _STR, "`lost` when the GPU stopped answering (its metrics are then null); "
           "absent otherwise.", required=False, nullable=True, choices=["lost"]),
    ),
    Dataset.PROCESS: (
        _f("process.pid", _INT, "Process id."),
        _f("process.name", _STR, "Process name (comm)."),
        _o("process.executable", _STR, "Absolute path of the executable."),
        _o("process.command_line", _STR, "Full command line."),
        _o("process.args", _LIST, "Argument vector."),
        _o("process.working_directory", _STR, "Working directory."),
        _o("process.start", _STR, "Process start time (RFC 3339)."),
        _o("process.parent.pid", _INT, "Parent process id."),
        _o("process.parent.name", _STR, "Parent process name."),
        _o("user.name", _STR, "User the process runs as."),
        _o("container.id", _STR, "Container id, from the cgroup path."),
        _o("container.name", _STR, "Container name, where the runtime's state is readable (Docker)."),
        _o("container.image.name", _STR, "Container image, likewise."),
        _o("orchestrator.type", _STR, "Who scheduled the process, from its cgroup: `kubernetes` or `slurm`."),
        _o("orchestrator.namespace", _STR, "Its pod's namespace (from the kubelet's pod log directory)."),
        _o("orchestrator.resource.type", _STR, "`pod` or `job`."),
        _o("orchestrator.resource.name", _STR, "Its pod's name."),
        _o("orchestrator.resource.id", _STR, "Its pod's UID or its Slurm job id (or SLUID)."),
        _o("gpusentry.owner.step", _STR, "Its Slurm step (`0`, `batch`, `extern`, ...)."),
        _o("process.hash.sha256", _STR, "SHA-256 of the executable (optional)."),
        _o("gpusentry.agent.lifecycle", _STR, "On the agent's own process event: `started` when it starts, "
           "`spool_removed` when it found its spool's files removed while it ran (an event of type `start`, like "
           "`started`), `stopping` as its last event when a signal stops it (absent on every other process event).",
           choices=["started", "spool_removed", "stopping"]),
        _o("gpusentry.agent.stop_signal", _STR, "With `stopping`: the signal that stopped it (`SIGTERM`, `SIGINT`)."),
        _o("gpusentry.agent.spool_new", _BOOL, "With `started` from an agent sending to Kafka: its spool had no file "
           "when it started (its first start, or a spool deleted, moved or lost with its disk while it was "
           "stopped)."),
        _o("gpusentry.agent.spool_problem", _STR, "With `spool_removed`: what was removed, in words."),
        _o("gpusentry.agent.spool_removed_messages", _INT, "With `spool_removed`: how many unsent messages were in "
           "the removed files (any already handed to the Kafka client may still arrive)."),
    ),
    Dataset.NETWORK: (
        _f("source.ip", _STR, "Local address."),
        _f("source.port", _INT, "Local port."),
        _f("destination.ip", _STR, "Remote address."),
        _f("destination.port", _INT, "Remote port."),
        _o("destination.domain", _STR, "Remote name, from a DNS answer the host saw."),
        _f("network.transport", _STR, "`tcp` or `udp`.", choices=["tcp", "udp"]),
        _o("network.direction", _STR, "`egress` for outbound flows."),
        _o("process.pid", _INT, "Owning process id."),
        _o("process.name", _STR, "Owning process name."),
        _o("process.executable", _STR, "Owning process executable."),
        _o("tls.client.server_name", _STR, "TLS SNI, when the flow starts with a ClientHello."),
        _o("gpusentry.flow.payload_b64", _STR, "Base64 of the first ≤ 512 bytes the local side sent."),
        _o("gpusentry.flow.state", _STR, "TCP state when the agent first saw the socket: `established`, or "
           "`syn_sent` for a connection attempt not (yet) answered (refused and timed-out attempts end here).",
           choices=["established", "syn_sent"]),
    ),
    Dataset.DNS: (
        _f("dns.question.name", _STR, "Queried name."),
        _f("dns.resolved_ip", _LIST, "Addresses in the answer."),
        _o("process.pid", _INT, "Querying process id."),
        _o("process.name", _STR, "Querying process name."),
    ),
    Dataset.ALERT: (
        _f("rule.id", _STR, "Detector id."),
        _f("rule.name", _STR, "Detector title."),
        _f("event.severity", _INT, "Numeric severity 0–100."),
        _f("gpusentry.alert.severity", _STR, "`low`, `medium`, `high` or `critical`.", choices=ALERT_SEVERITIES),
        _f("gpusentry.alert.dedup_key", _STR, "Stable key of the incident."),
        _f("gpusentry.alert.status", _STR, "`open` or `resolved`.", choices=ALERT_STATUSES),
        _f("message", _STR, "One-line description."),
    ),
}


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "string", int: "integer", float: "number", list: "array", dict: "object"}
    if types == _NUM:
        return "number"
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_field(event: Mapping[str, Any], spec: FieldSpec) -> tuple[RejectCode, str] | None:
    value = _get_parts(event, spec.parts, _MISSING)
    if value is _MISSING:
        if spec.required:
            return RejectCode.MISSING_FIELD, f"required field {spec.path!r} is missing"
        return None
    if value is None:
        if spec.nullable:
            return None
        return RejectCode.WRONG_TYPE, f"field {spec.path!r} is null; expected {_type_name(spec.types)}"
    # bool is an int subclass in Python, never a valid number here.
    if type(value) not in spec.types and (isinstance(value, bool) or not isinstance(value, spec.types)):
        return (RejectCode.WRONG_TYPE,
                f"field {spec.path!r} is {type(value).__name__} {_short(value)}; expected {_type_name(spec.types)}")
    if spec.choices is not None and value not in spec.choices:
        return RejectCode.BAD_VALUE, f"field {spec.path!r} is {value!r}; expected one of {sorted(spec.choices)}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# In JSON text without escapes, a key with a dot is a string holding "." closed by a quote and then a
# colon.  No match (and no backslash, so no \u002e and no escaped quote) proves no key anywhere has a dot,
# without walking the decoded objects.
# Possessive quantifiers (neither class can match what follows it, so the matches are the same): a dot
# that ends no key fails at once instead of backtracking over the text after it.
_DOTTED_KEY_TEXT = re.compile(rb'\.[^"]*+"\s*+:')


def may_have_dotted_keys(raw: bytes | bytearray | memoryview | str) -> bool:
    """False when the JSON text ``raw`` certainly has no dotted key (see :func:`validate_event`)."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw) if isinstance(raw, memoryview) else raw
    return b"\\" in data or _DOTTED_KEY_TEXT.search(data) is not None


def validate_event(obj: Any, *, dotted_keys: bool | None = None) -> dict[str, Any] | Reject:
    """Return the event (nested, dotted keys expanded) or a :class:`Reject` saying why not.

    ``dotted_keys=False`` tells it the JSON text the event came from has no dotted key
    (:func:`may_have_dotted_keys`), which saves walking the objects to find out.
    """
    if not isinstance(obj, dict):
        return Reject(RejectCode.NOT_OBJECT, f"an event must be a JSON object, got {type(obj).__name__}")
    dotted = _has_dotted_key(obj) if dotted_keys is None or dotted_keys else False
    if not dotted and _fast_valid(obj):
        return obj
    return _validate_slow(expand_dotted(obj) if dotted else obj)


def _validate_slow(event: dict[str, Any]) -> dict[str, Any] | Reject:
    """The reference validation: field by field, with the reason of the first problem."""
    for spec in COMMON_FIELDS:
        problem = _check_field(event, spec)
        if problem:
            return Reject(*problem)
    try:
        parse_timestamp(event["@timestamp"])
    except ValueError as exc:
        return Reject(RejectCode.BAD_VALUE, f"field '@timestamp': {exc}")
    if not event["event"]["id"] or not event["host"]["name"]:
        return Reject(RejectCode.BAD_VALUE, "fields 'event.id' and 'host.name' must not be empty")
    dataset = Dataset(event["event"]["dataset"])
    kind = DATASET_ECS[dataset][0]
    if event["event"]["kind"] != kind:
        return Reject(RejectCode.BAD_VALUE,
                      f"event.kind {event['event']['kind']!r} does not fit dataset {dataset.value}; expected {kind!r}")
    for spec in DATASET_FIELDS[dataset]:
        problem = _check_field(event, spec)
        if problem:
            return Reject(*problem)
    extra = _DATASET_CHECKS.get(dataset)
    if extra is not None:
        problem = extra(event)
        if problem:
            return Reject(*problem)
    return event


def _check_gpu(event: Mapping[str, Any]) -> tuple[RejectCode, str] | None:
    for i, proc in enumerate(get(event, "gpu.processes") or ()):
        if not isinstance(proc, dict):
            return RejectCode.WRONG_TYPE, f"gpu.processes[{i}] must be an object"
        pid = proc.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int):
            return RejectCode.WRONG_TYPE, f"gpu.processes[{i}].pid must be an integer"
        owner = proc.get("owner")
        if owner is not None and not isinstance(owner, dict):
            return RejectCode.WRONG_TYPE, f"gpu.processes[{i}].owner must be an object"
    for i, holder in enumerate(get(event, "gpusentry.allocation.owners") or ()):
        if not isinstance(holder, dict):
            return RejectCode.WRONG_TYPE, f"gpusentry.allocation.owners[{i}] must be an object"
    return None


def _check_process(event: Mapping[str, Any]) -> tuple[RejectCode, str] | None:
    if event["event"]["type"] not in (["start"], ["end"]):
        return RejectCode.BAD_VALUE, f"process event.type must be ['start'] or ['end'], got {event['event']['type']!r}"
    return None


def _check_network(event: Mapping[str, Any]) -> tuple[RejectCode, str] | None:
    payload = get(event, "gpusentry.flow.payload_b64")
    # 512 bytes encode to 684 base64 characters.
    if payload is not None and len(payload) > 684:
        return RejectCode.BAD_VALUE, "gpusentry.flow.payload_b64 holds more than 512 bytes"
    return None


def _check_dns(event: Mapping[str, Any]) -> tuple[RejectCode, str] | None:
    if not all(isinstance(ip, str) for ip in event["dns"]["resolved_ip"]):
        return RejectCode.WRONG_TYPE, "dns.resolved_ip must be an array of strings"
    return None


def _check_alert(event: Mapping[str, Any]) -> tuple[RejectCode, str] | None:
    if not 0 <= event["event"]["severity"] <= 100:
        return RejectCode.BAD_VALUE, "event.severity must be between 0 and 100"
    return None


_DATASET_CHECKS = {
    Dataset.GPU: _check_gpu,
    Dataset.PROCESS: _check_process,
    Dataset.NETWORK: _check_network,
    Dataset.DNS: _check_dns,
    Dataset.ALERT: _check_alert,
}


# ---------------------------------------------------------------------------- fast path
#
# Nearly every event is canonical: nested, well typed, valid.  The fast path below checks exactly
# what the reference validation checks, as one straight-line function per dataset generated from the
# same field specs: each parent object looked up once, exact type tests instead of isinstance, no
# loops or per-field calls.  It only ever answers "valid as is";
# on anything unusual (a wrong type, a subclass, a missing parent, a bad value) it answers "not
# sure" and the reference path decides and explains, so behaviour is the reference's by design
# (tests/test_contract_fastpath.py checks the two agree).


def _compile_fast_check(dataset: Dataset) -> Callable[[dict[str, Any]], bool]:
    """Straight-line Python that checks every field of ``dataset`` events, generated from the field specs.

    A missing or odd parent object is bound to an empty dict, so every field costs one ``get`` and
    one type test: a missing value reads as ``None``, whose type fails every type a field allows
    unless the field is optional or nullable (then ``NoneType`` is among the allowed types).
    """
    specs = list(COMMON_FIELDS) + list(DATASET_FIELDS[dataset])
    env: dict[str, Any] = {"M": _MISSING, "E": {}, "parse_timestamp": parse_timestamp,
                           "KIND": DATASET_ECS[dataset][0],
                           "EXTRA": None if dataset is Dataset.GPU else _DATASET_CHECKS.get(dataset)}
    code = ["def check(event):"]
    nodes: dict[tuple[str, ...], str] = {(): "event"}
    for i, spec in enumerate(specs):
        parent = spec.parts[:-1]
        for depth in range(1, len(parent) + 1):  # bind each parent object once, E when absent or odd
            path = parent[:depth]
            if path not in nodes:
                name = nodes[path] = f"n{len(nodes)}"
                code.append(f"    {name} = {nodes[path[:-1]]}.get({path[-1]!r})")
                code.append(f"    if type({name}) is not dict: {name} = E")
        node, key = nodes[parent], spec.parts[-1]
        allowed = spec.types + ((type(None),) if spec.nullable and not spec.required else ())
        env[f"T{i}"], env[f"C{i}"] = allowed, spec.choices
        type_bad = f"type(v) is not {allowed[0].__name__}" if len(allowed) == 1 else f"type(v) not in T{i}"
        if spec.required and spec.nullable:  # present, and null or of its type
            code.append(f"    v = {node}.get({key!r}, M)")
            type_bad = f"v is not None and {type_bad}"
        elif spec.required or spec.nullable:  # missing reads as None: wrong unless NoneType is allowed
            code.append(f"    v = {node}.get({key!r})")
        else:  # optional but never null
            code.append(f"    v = {node}.get({key!r}, M)")
            type_bad = f"v is not M and {type_bad}"
        choice_bad = f" or (v is not None and v is not M and v not in C{i})" if spec.choices is not None else ""
        code.append(f"    if {type_bad}{choice_bad}: return False")
    if dataset is Dataset.GPU:  # _check_gpu, inline: every listed process is an object with an integer pid
        code += [f"    procs = {nodes[('gpu',)]}.get('processes')",
                 "    if procs:",
                 "        for p in procs:",
                 "            if type(p) is not dict or type(p.get('pid')) is not int: return False",
                 "            o = p.get('owner')",
                 "            if o is not None and type(o) is not dict: return False",
                 f"    holders = {nodes[('gpusentry', 'allocation')]}.get('owners')",
                 "    if holders:",
                 "        for h in holders:",
                 "            if type(h) is not dict: return False"]
    code += ["    meta = event['event']",
             "    if not meta['id'] or not event['host']['name'] or meta['kind'] != KIND: return False",
             "    try:", "        parse_timestamp(event['@timestamp'])", "    except ValueError:", "        return False",
             "    return EXTRA is None or EXTRA(event) is None"]
    exec("\n".join(code), env)  # noqa: S102 - our own generated code, from the field specs above
    check: Callable[[dict[str, Any]], bool] = env["check"]
    return check


_FAST_CHECKS = {d.value: _compile_fast_check(d) for d in Dataset}


def _fast_valid(event: dict[str, Any]) -> bool:
    """True only when the reference validation would accept ``event`` unchanged."""
    meta = event.get("event")
    dataset = meta.get("dataset") if type(meta) is dict else None
    check = _FAST_CHECKS.get(dataset) if type(dataset) is str else None
    return check is not None and check(event)


def validate_or_raise(obj: Any) -> dict[str, Any]:
    result = validate_event(obj)
    if isinstance(result, Reject):
        raise ContractError(result)
    return result


def decode_message(value: bytes | bytearray | memoryview | str | None, *, key: str | bytes | None = None,
                   max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Decoded:
    """Decode one Kafka message value (an event or an array of events) and validate each.

    A bad event in a batch is rejected alone; its neighbours are kept.  When ``key`` is
    given, events whose ``host.name`` differs from it are rejected, because they would
    have reached a worker that does not hold their host's state.
    """
    out = Decoded()
    if value is None:
        out.rejects.append(Reject(RejectCode.NOT_JSON, "message has no value (tombstone)"))
        return out
    size = len(value)
    if size > max_bytes:
        out.rejects.append(Reject(RejectCode.OVERSIZE,
                                  f"message is {size} bytes, over the {max_bytes}-byte cap "
                                  "(contract.max_message_bytes)"))
        return out
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        out.rejects.append(Reject(RejectCode.NOT_JSON, f"not valid JSON: {exc}"))
        return out
    items: list[Any]
    if isinstance(doc, list):
        items, batched = doc, True
    elif isinstance(doc, dict):
        items, batched = [doc], False
    else:
        out.rejects.append(Reject(RejectCode.NOT_OBJECT,
                                  f"message must be an event object or an array of events, got {type(doc).__name__}"))
        return out
    expected_host = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    dotted = None if may_have_dotted_keys(value) else False
    for i, item in enumerate(items):
        result = validate_event(item, dotted_keys=dotted)
        index = i if batched else None
        if isinstance(result, Reject):
            out.rejects.append(Reject(result.code, result.reason, index))
        elif expected_host is not None and result["host"]["name"] != expected_host:
            out.rejects.append(Reject(RejectCode.HOST_MISMATCH,
                                      f"host.name {result['host']['name']!r} does not match the message key "
                                      f"{expected_host!r}; key messages by host.name", index))
        else:
            out.events.append(result)
    return out


def encode(events: dict[str, Any] | list[dict[str, Any]]) -> bytes:
    """Serialise an event, or a batch of events from one host, as a message value."""
    return orjson.dumps(events)


# ---------------------------------------------------------------------------- builders


def new_event_id() -> str:
    return uuid.uuid4().hex


def make_event(dataset: Dataset, host_name: str, timestamp: float | str, fields: Mapping[str, Any] | None = None,
               *, event_id: str | None = None, event_type: list[str] | None = None,
               agent_version: str = __version__) -> dict[str, Any]:
    """Build a contract event.  ``fields`` maps dotted ECS paths to values."""
    kind, category, default_type = DATASET_ECS[dataset]
    ts = timestamp if isinstance(timestamp, str) else format_timestamp(timestamp)
    event: dict[str, Any] = {
        "@timestamp": ts,
        "ecs": {"version": ECS_VERSION},
        "event": {
            "kind": kind,
            "dataset": dataset.value,
            "id": event_id or new_event_id(),
            "category": list(category),
            "type": list(event_type or default_type),
        },
        "host": {"name": host_name},
        "agent": {"type": AGENT_TYPE, "version": agent_version},
    }
    for path, value in (fields or {}).items():
        set_path(event, path, value)
    return event


def gpu_event(host_name: str, timestamp: float | str, *, index: int, uuid: str, name: str | None,
              gpu_pct: float | None = None, memory_pct: float | None = None, memory_used_bytes: int | None = None,
              memory_total_bytes: int | None = None, power_draw_watts: float | None = None,
              power_limit_watts: float | None = None, temperature_c: float | None = None,
              sm_clock_mhz: float | None = None, mem_clock_mhz: float | None = None,
              pcie_rx_bytes_per_s: float | None = None, pcie_tx_bytes_per_s: float | None = None,
              processes: list[dict[str, Any]] | None = None, allocation: Mapping[str, Any] | None = None,
              event_id: str | None = None) -> dict[str, Any]:
    """One GPU sample.  ``processes`` entries: pid, used_memory_bytes, sm_pct, name, executable, command_line and
    optionally owner; ``allocation``: the scheduler's answer for this GPU (``gpusentry.allocation.*``)."""
    procs = [gpu_process(**p) for p in processes or ()]
    extra = {f"gpusentry.allocation.{k}": v for k, v in allocation.items()} if allocation else {}
    return make_event(Dataset.GPU, host_name, timestamp, {**extra,
        "gpu.index": index, "gpu.uuid": uuid, "gpu.name": name,
        "gpu.utilization.gpu_pct": gpu_pct, "gpu.utilization.memory_pct": memory_pct,
        "gpu.memory.used_bytes": memory_used_bytes, "gpu.memory.total_bytes": memory_total_bytes,
        "gpu.power.draw_watts": power_draw_watts, "gpu.power.limit_watts": power_limit_watts,
        "gpu.temperature_c": temperature_c, "gpu.clocks.sm_mhz": sm_clock_mhz, "gpu.clocks.mem_mhz": mem_clock_mhz,
        "gpu.pcie.rx_bytes_per_s": pcie_rx_bytes_per_s, "gpu.pcie.tx_bytes_per_s": pcie_tx_bytes_per_s,
        "gpu.processes": procs,
    }, event_id=event_id)


def gpu_process(pid: int, used_memory_bytes: int | None = None, sm_pct: float | None = None,
                name: str | None = None, executable: str | None = None,
                command_line: str | None = None, owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"pid": pid, "used_memory_bytes": used_memory_bytes, "sm_pct": sm_pct, "name": name,
             "executable": executable, "command_line": command_line}
    if owner:
        entry["owner"] = dict(owner)
    return entry


def process_event(host_name: str, timestamp: float | str, *, action: str, pid: int, name: str,
                  executable: str | None = None, command_line: str | None = None, args: list[str] | None = None,
                  working_directory: str | None = None, start: float | str | None = None,
                  parent_pid: int | None = None, parent_name: str | None = None, user_name: str | None = None,
                  container_id: str | None = None, sha256: str | None = None,
                  container_name: str | None = None, container_image: str | None = None,
                  owner: Mapping[str, Any] | None = None,
                  event_id: str | None = None) -> dict[str, Any]:
    """A process ``start`` or ``end`` (``action``)."""
    if action not in ("start", "end"):
        raise ValueError(f"action must be 'start' or 'end', not {action!r}")
    fields: dict[str, Any] = {
        "process.pid": pid, "process.name": name, "process.executable": executable,
        "process.command_line": command_line, "process.args": args, "process.working_directory": working_directory,
        "process.start": format_timestamp(start) if isinstance(start, int | float) else start,
        "process.parent.pid": parent_pid, "process.parent.name": parent_name, "user.name": user_name,
    }
    if container_id is not None:
        fields["container.id"] = container_id
    if container_name is not None:
        fields["container.name"] = container_name
    if container_image is not None:
        fields["container.image.name"] = container_image
    if owner:
        fields.update(owner)
    if sha256 is not None:
        fields["process.hash.sha256"] = sha256
    return make_event(Dataset.PROCESS, host_name, timestamp, fields, event_id=event_id, event_type=[action])


def network_event(host_name: str, timestamp: float | str, *, source_ip: str, source_port: int,
                  destination_ip: str, destination_port: int, transport: str = "tcp",
                  direction: str = "egress", pid: int | None = None, process_name: str | None = None,
                  executable: str | None = None, destination_domain: str | None = None,
                  server_name: str | None = None, payload_b64: str | None = None, state: str | None = None,
                  event_id: str | None = None) -> dict[str, Any]:
    """A new outbound flow.  Optional fields are left out when unknown, as the contract says."""
    fields: dict[str, Any] = {
        "source.ip": source_ip, "source.port": source_port,
        "destination.ip": destination_ip, "destination.port": destination_port,
        "network.transport": transport, "network.direction": direction,
        "process.pid": pid, "process.name": process_name, "process.executable": executable,
    }
    if destination_domain is not None:
        fields["destination.domain"] = destination_domain
    if server_name is not None:
        fields["tls.client.server_name"] = server_name
    if payload_b64 is not None:
        fields["gpusentry.flow.payload_b64"] = payload_b64
    if state is not None:
        fields["gpusentry.flow.state"] = state
    return make_event(Dataset.NETWORK, host_name, timestamp, fields, event_id=event_id)


def dns_event(host_name: str, timestamp: float | str, *, question: str, resolved_ips: list[str],
              pid: int | None = None, process_name: str | None = None,
              event_id: str | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"dns.question.name": question, "dns.resolved_ip": list(resolved_ips)}
    if pid is not None:
        fields["process.pid"] = pid
    if process_name is not None:
        fields["process.name"] = process_name
    return make_event(Dataset.DNS, host_name, timestamp, fields, event_id=event_id)


__all__ = [
    "AGENT_TYPE", "CONTRACT_VERSION", "ECS_VERSION", "Dataset", "Decoded", "ContractError", "Reject", "RejectCode",
    "decode_message", "dns_event", "encode", "event_time", "expand_dotted", "format_timestamp", "get",
    "gpu_event", "make_event", "network_event", "parse_timestamp", "process_event", "set_path",
    "validate_event", "validate_or_raise",
]
