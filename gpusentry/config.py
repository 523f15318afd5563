"""Configuration: one TOML file plus ``GPUSENTRY_*`` environment overrides.

Lookup: ``--config PATH``, else ``$GPUSENTRY_CONFIG``, else ``./gpusentry.toml`` when present, else
defaults.  An environment variable ``GPUSENTRY_<SECTION>__<KEY>`` (double underscore between
levels, any case) overrides ``[section] key``; values are TOML literals (``5``, ``true``,
``["a", "b"]``) or plain strings.  Unknown keys and bad values stop start-up with a message that
names the key, where it came from and how to fix it.  ``docs/config.md`` is generated from these
models (``gpusentry config docs``) and a test keeps it current.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError
from pydantic_core import ErrorDetails

from gpusentry.settings.agent import AgentSettings
from gpusentry.settings.base import Section
from gpusentry.settings.core import ContractSettings, LoggingSettings
from gpusentry.settings.detection import DetectionSettings
from gpusentry.settings.feedback import FeedbackSettings
from gpusentry.settings.kafka import KafkaSettings, TopicSettings
from gpusentry.settings.outputs import OutputSettings
from gpusentry.settings.worker import WorkerSettings

ENV_PREFIX = "GPUSENTRY_"
CONFIG_ENV = "GPUSENTRY_CONFIG"
DEFAULT_FILE = "gpusentry.toml"
# Variables that configure the program itself rather than a config key.
_NOT_OVERRIDES = {CONFIG_ENV, "GPUSENTRY_TANSU_BIN"}


class Config(Section):
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka connection and security.")
    topics: TopicSettings = Field(default_factory=TopicSettings, description="Topic names.")
    contract: ContractSettings = Field(default_factory=ContractSettings, description="Input limits.")
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")
    agent: AgentSettings = Field(default_factory=AgentSettings, description="Host agent.")
    worker: WorkerSettings = Field(default_factory=WorkerSettings, description="Stream worker.")
    detection: DetectionSettings = Field(default_factory=DetectionSettings, description="Detection engine.")
    outputs: OutputSettings = Field(default_factory=OutputSettings, description="Alert delivery.")
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings,
                                       description="Analyst verdicts: trusted signing keys.")


class ConfigError(ValueError):
    """Bad configuration; the message lists every problem with its fix."""


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Nested overrides from ``GPUSENTRY_*`` variables, and which variable set each key."""
    tree: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for name, raw in sorted(environ.items()):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in _NOT_OVERRIDES:
            continue
        path = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__") if p)
        if not path:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is a value, not a section")
        node[path[-1]] = _parse_env_value(raw)
        origin[path] = name
    return tree, origin


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _submodel(model.model_fields[part].annotation)
    return model


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation) if get_origin(annotation) else ():
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _explain(errors: Iterable[ErrorDetails], source: str, origin: dict[tuple[str, ...], str]) -> str:
    return "invalid configuration:\n" + _problems(errors, source, origin)


def _problems(errors: Iterable[ErrorDetails], source: str, origin: dict[tuple[str, ...], str]) -> str:
    """One line per problem, naming the key, where it came from and the fix."""
    lines = []
    for err in errors:
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        where = origin.get(loc) or source
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(known)}"
            lines.append(f"- unknown key {key!r} (from {where}): {hint}")
        else:
            shown = "" if "password" in key or "token" in key or "secret" in key else f" (got {err.get('input')!r})"
            lines.append(f"- {key} (from {where}): {err['msg']}{shown}; see docs/config.md for allowed values")
    return "\n".join(lines)


def find_config_file(explicit: str | Path | None, environ: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    default = Path(DEFAULT_FILE)
    return default if default.is_file() else None


def _read(path: str | Path | None, environ: Mapping[str, str] | None
          ) -> tuple[dict[str, Any], str, dict[tuple[str, ...], str]]:
    """The merged settings (file, then environment), where they came from, and which variable set each key."""
    environ = os.environ if environ is None else environ
    file = find_config_file(path, environ)
    data: dict[str, Any] = {}
    source = "defaults"
    if file is not None:
        source = str(file)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist; create it or drop --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {file} cannot be read: {exc}") from None
    overrides, origin = env_overrides(environ)
    return _merge(data, overrides), source, origin


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load, merge and validate every section; raise :class:`ConfigError` with every problem at once."""
    data, source, origin = _read(path, environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc.errors(), source, origin)) from None


class UnusedInvalidSection:
    """Stands in for a section whose settings are invalid, in a command that does not use it (the worker and
    ``[outputs]``, say): the command runs, and anything that reads the section after all fails with the error a
    command that uses it gives at start-up."""

    __slots__ = ("name", "problems")

    def __init__(self, name: str, problems: str) -> None:
        self.name = name
        self.problems = problems

    def __getattr__(self, attr: str) -> NoReturn:
        if attr.startswith("__"):  # copy, pickle and friends ask for optional hooks: those are simply absent
            raise AttributeError(attr)
        raise ConfigError(f"[{self.name}] is used by this command after all, and it is {self.problems}")

    def __repr__(self) -> str:
        return f"UnusedInvalidSection({self.name!r})"


def load_config_for(uses: Collection[str] | None, path: str | Path | None = None,
                    environ: Mapping[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """Load the settings a command uses (``uses``: section names; None for all of them).

    A problem in a section the command uses, or an unknown section, raises :class:`ConfigError` with every such
    problem. A section it does not use may be invalid: it is replaced by an :class:`UnusedInvalidSection`, and
    its problems are returned by section name, for the command to warn about once it logs.
    """
    data, source, origin = _read(path, environ)
    try:
        return Config.model_validate(data), {}
    except ValidationError as exc:
        errors = exc.errors()
    if uses is not None:
        unknown = sorted(set(uses) - set(Config.model_fields))
        if unknown:
            raise ValueError(f"not config sections: {unknown}")
    by_section: dict[str, list[ErrorDetails]] = {}
    fatal: list[ErrorDetails] = []
    for err in errors:
        section = str(err["loc"][0]) if err["loc"] else ""
        used = uses is None or section in uses or section not in Config.model_fields
        (fatal if used else by_section.setdefault(section, [])).append(err)
    if fatal:
        raise ConfigError(_explain(fatal, source, origin))
    valid = Config.model_validate({k: v for k, v in data.items() if k not in by_section})
    unused = {name: _problems(errs, source, origin) for name, errs in by_section.items()}
    fields = {name: getattr(valid, name) for name in Config.model_fields if name not in unused}
    fields.update({name: UnusedInvalidSection(name, "invalid:\n" + problems) for name, problems in unused.items()})
    return Config.model_construct(**fields), unused


def _type_text(annotation: Any) -> str:
    text = repr(annotation) if get_origin(annotation) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace("pydantic.types.", "")


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return ""
        if field.default_factory.__module__ in ("socket", "_socket"):  # socket.gethostname is _socket's
            return "this machine's hostname"
        return repr(value)
    return "" if field.default is None else repr(field.default)


def config_docs() -> str:
    """Markdown reference of every option, generated from the models."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `gpusentry config docs` from the option definitions; a test fails when this file is stale.",
        "",
        "Options live in one TOML file (`--config PATH`, `$GPUSENTRY_CONFIG`, or `./gpusentry.toml`).",
        "Every option can be overridden by an environment variable `GPUSENTRY_<SECTION>__<KEY>`",
        "(for example `GPUSENTRY_KAFKA__BOOTSTRAP_SERVERS=kafka:9092`); values are TOML literals or plain",
        "strings. Secrets (passwords, tokens, webhook URLs) belong in environment variables or files, not in",
        "the config file. Unknown keys and bad values stop the program with a message naming the key.",
        "",
    ]

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        rows = []
        for name, field in model.model_fields.items():
            sub = _submodel(field.annotation)
            if sub is not None and field.default_factory is not None and get_origin(field.annotation) is None:
                walk(sub, (*prefix, name))
                continue
            env = ENV_PREFIX + "__".join((*prefix, name)).upper()
            rows.append(f"| `{name}` | `{_type_text(field.annotation)}` | `{_default_text(field)}` | "
                        f"{field.description or ''} | `{env}` |")
        if rows:
            title = ".".join(prefix)
            doc = (model.__doc__ or "").strip().splitlines()
            out.extend([f"## `[{title}]`", ""])
            if doc and not doc[0].startswith("Base of every"):
                out.extend([doc[0], ""])
            out.extend(["| key | type | default | meaning | environment |", "|---|---|---|---|---|", *rows, ""])

    walk(Config, ())
    return "\n".join(out)
