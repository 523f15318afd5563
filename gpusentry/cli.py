"""The ``gpusentry`` command.

Exit codes scripts can rely on (also in the README):

* 0  success
* 1  the command ran and failed (broker unreachable, an output refused, ...)
* 2  bad usage or bad configuration (the message names the fix)
* 4  ``replay --strict``: the input held lines that were rejected
* 130 interrupted (Ctrl-C; SIGTERM for ``up``)
* 129 / 141 ``up`` only: its terminal closed / the program reading its output exited
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from gpusentry import __version__
from gpusentry.config import Config, ConfigError, config_docs, load_config_for

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTS, EXIT_INTERRUPTED = 0, 1, 2, 4, 130

app = typer.Typer(
    name="gpusentry",
    help="Streaming detection of GPU and compute hijacking (covert cryptocurrency mining) on GPU fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check, show and document the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

err = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: $GPUSENTRY_CONFIG or ./gpusentry.toml).",
                 show_default=False),
]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    # The message may quote input (paths, keys, values): shown as text, never as markup.
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# The config sections each command reads (logging: all of them). Each command validates only these, so a problem
# in [outputs] stops the forwarder, not the worker; a section used after all is refused when first read.
ALL_SECTIONS = None
USES_KAFKA = ("kafka", "topics")
USES_AGENT = (*USES_KAFKA, "contract", "agent")
USES_WORKER = (*USES_KAFKA, "contract", "worker", "detection", "feedback")
USES_FORWARD = (*USES_KAFKA, "contract", "outputs")
USES_DETECTION = ("detection",)
USES_REPLAY = ("detection", "contract")
USES_REPORT = (*USES_KAFKA, "contract", "detection")
USES_TOPICS = (*USES_KAFKA, "worker")  # worker.app_id names the checkpoint topic
USES_FEEDBACK = (*USES_KAFKA, "feedback")
USES_OUTPUTS = (*USES_KAFKA, "outputs")


def setup(config_path: Path | None, uses: tuple[str, ...] | None) -> Config:
    """Load the configuration sections the command ``uses`` (None: all; exit 2 with the fix on error), configure
    logging, and warn about any other section that is invalid."""
    import logging

    try:
        cfg, unused = load_config_for(None if uses is None else ("logging", *uses), config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    configure_logging(cfg)
    for section, problems in unused.items():
        logging.getLogger("gpusentry.config").warning(
            "[%s] is invalid; this command does not use it and goes on, but one that does will refuse to start:\n%s",
            section, problems)
    if uses is None or "detection" in uses:
        from gpusentry import knowledge

        knowledge.use_directory(cfg.detection.knowledge_dir)  # before any detector reads its file
    return cfg


def configure_logging(cfg: Config) -> None:
    from gpusentry.logs import configure

    command = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "gpusentry"
    configure(cfg.logging.level, cfg.logging.format, f"gpusentry-{command}")


@app.command()
def version() -> None:
    """Print the gpusentry version and the event contract version."""
    from gpusentry.contract import CONTRACT_VERSION, ECS_VERSION

    typer.echo(f"gpusentry {__version__} (event contract v{CONTRACT_VERSION}, ECS {ECS_VERSION})")


@app.command()
def up(config: ConfigOption = None,
       demo: Annotated[bool, typer.Option(help="Also inject a simulated hijack on a simulated host.")] = False,
       scenario: Annotated[str, typer.Option(help="The --demo scenario (`gpusentry simulate --list`), e.g. "
                                             "agent-combined for an agent sandbox's tunnel, probing and GPU miner.")
                           ] = "miner-blatant",
       keep_spool: Annotated[bool, typer.Option(help="Keep the agent's temporary spool (embedded broker only) "
                                                "after stopping; by default it is removed with the run.")] = False,
       ) -> None:
    """Run everything on this machine: embedded broker, worker, local agent, live incident view."""
    cfg = setup(config, ALL_SECTIONS)
    from gpusentry.broker import BrokerUnavailable
    from gpusentry.simulate import SCENARIOS
    from streams.up import UpConsole, run_up

    if scenario not in SCENARIOS:
        fail(f"--scenario {scenario!r} is not a scenario; choose one of: {', '.join(SCENARIOS)}", EXIT_USAGE)
    try:
        code = run_up(cfg, demo=demo, config_path=config, console=UpConsole(), scenario=scenario,
                      keep_spool=keep_spool)
    except BrokerUnavailable as exc:
        fail(str(exc))
    raise typer.Exit(code)


@app.command()
def agent(
    config: ConfigOption = None,
    output: Annotated[list[str] | None, typer.Option(
        "--output", "-o", help="kafka, stdout or jsonl:PATH; repeat for several (default: agent.outputs).",
        show_default=False)] = None,
    host_name: Annotated[str | None, typer.Option(help="host.name of the events (default: agent.host_name).",
                                                  show_default=False)] = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between cycles (default: agent.interval_s).",
                                                   show_default=False)] = None,
    cycles: Annotated[int | None, typer.Option(help="Stop after this many cycles (default: run until stopped).",
                                               show_default=False)] = None,
    once: Annotated[bool, typer.Option("--once", help="One cycle, then exit (same as --cycles 1).")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Publish nothing: print each GPU, who the scheduler "
                                          "says holds it, its processes with their pod/job, and the verdict.")]
        = False,
) -> None:
    """Run the host agent: collect GPU, process, network and DNS events and publish them."""
    cfg = setup(config, USES_AGENT)
    from agents.agent import AgentError, run_agent

    try:
        if host_name:
            cfg.agent.host_name = host_name
        if interval:
            cfg.agent.interval_s = interval
        if output:
            cfg.agent.outputs = output
        if explain:
            from agents.explain import explain as explain_host

            raise typer.Exit(explain_host(cfg, sys.stdout))
        code = run_agent(cfg, cycles=1 if once else cycles)
    except (AgentError, ValueError) as exc:
        fail(str(exc), EXIT_USAGE)
    raise typer.Exit(code)


@app.command()
def worker(config: ConfigOption = None,
           create_topics: Annotated[bool, typer.Option(help="Create missing topics (kafka.partitions each).")] = False
           ) -> None:
    """Run a stream worker: detection on the event topics, incidents to the alerts topic."""
    cfg = setup(config, USES_WORKER)
    from streams.worker import TopicsMissing, run_worker

    try:
        raise typer.Exit(run_worker(cfg, create_topics=create_topics))
    except (TopicsMissing, ValueError) as exc:
        fail(str(exc), EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED)


@app.command()
def simulate(
    scenario: Annotated[list[str] | None, typer.Option("--scenario", "-s", help="Scenario to simulate (repeat "
                                                       "for several; default: all). See --list.")] = None,
    hosts: Annotated[int, typer.Option(help="Hosts per scenario.")] = 1,
    duration: Annotated[float, typer.Option(help="Seconds of event time per host.")] = 1800.0,
    interval: Annotated[float, typer.Option(help="Agent sampling interval in seconds; 0 varies it per host "
                                            "(1-10 s).")] = 5.0,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same events.")] = 42,
    start: Annotated[str, typer.Option(help="Start time: RFC 3339, epoch seconds or 'now'.")] =
        "2026-11-01T00:00:00.000Z",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write events here (JSONL, .gz compresses); "
                                             "default stdout.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Write each host's scenario, label and attack start "
                                                "here (JSON); labels are never in the events.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the scenarios and exit.")] = False,
    config: ConfigOption = None,
) -> None:
    """Write labelled fleet scenarios (benign work and hijacks) as contract events."""
    from gpusentry.simulate.cli import list_scenarios, run_simulate

    setup(config, ())
    if list_:
        list_scenarios(Console(soft_wrap=True))
        return
    try:
        run_simulate(scenario or [], hosts=hosts, duration_s=duration, interval_s=interval, seed=seed, start=start,
                     out=out, labels=labels, progress=err)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)


@app.command()
def replay(
    files: Annotated[list[Path], typer.Argument(help="JSONL or .jsonl.gz event files (one event per line), or "
                                                "pcap/pcapng captures. A file that cannot be read is named and "
                                                "skipped (exit 1); the others are replayed.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write alerts here (JSONL); default stdout.")] = None,
    strict: Annotated[bool, typer.Option(help="Exit 4 when any line was rejected.")] = False,
    host: Annotated[str | None, typer.Option(help="host.name of events made from captures (default: the file "
                                                  "stem).")] = None,
    deliver: Annotated[bool, typer.Option(help="Also send the alerts to the enabled outputs ([outputs.*]); "
                                               "exit 1 if any delivery failed.")] = False,
    config: ConfigOption = None,
) -> None:
    """Run the detectors over event files and captures and print the alerts as JSONL."""
    from gpusentry.replay import run_replay

    cfg = setup(config, (*USES_REPLAY, "outputs") if deliver else USES_REPLAY)
    failed_deliveries = 0
    if deliver:
        from outputs.cli import CommandError, replay_and_deliver

        try:
            summary, failed_deliveries = replay_and_deliver(files, cfg, out=out, console=err, host=host)
        except CommandError as exc:
            fail(str(exc), exc.code)
    else:
        summary = run_replay(files, cfg, out=out, progress_console=err, host=host)
    err.print(summary.describe(), highlight=False)
    if summary.failed_files or failed_deliveries:
        raise typer.Exit(EXIT_FAILED)
    if strict and summary.rejected:
        raise typer.Exit(EXIT_REJECTS)


topics_app = typer.Typer(help="The Kafka topics gpusentry uses: create the missing ones.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@topics_app.command("create")
def topics_create(config: ConfigOption = None) -> None:
    """Create the missing topics (kafka.partitions each; a compacted checkpoint topic, a feedback topic kept for
    ever) and exit: what a deployment's topic job runs before the workers start."""
    cfg = setup(config, USES_TOPICS)
    from streams.worker import TopicsMissing, ensure_topics

    try:
        partitions = ensure_topics(cfg, create=True)
    except TopicsMissing as exc:
        fail(str(exc))
    typer.echo(f"topics ready at {cfg.kafka.bootstrap_servers}: {', '.join(cfg.topics.all())} and the checkpoint "
               f"topic, {partitions} partitions each")


pools_app = typer.Typer(help="The mining-pool list: show it, refresh it from a file or URL.", no_args_is_help=True)
app.add_typer(pools_app, name="pools")


@pools_app.command("refresh")
def pools_refresh(
    source: Annotated[str, typer.Option("--from", help="File path or http(s) URL of the new list (one domain, IP "
                                                        "or CIDR per line).")],
    skip_invalid: Annotated[bool, typer.Option(help="Install the valid entries even when some lines are bad.")
                            ] = False,
    config: ConfigOption = None,
) -> None:
    """Validate a pool list and install it at detection.pools.file (workers read it at start-up)."""
    from gpusentry.pools import PoolRefreshError, refresh, safe_source

    cfg = setup(config, USES_DETECTION)
    try:
        result = refresh(source, cfg.detection.pools, skip_invalid=skip_invalid)
    except PoolRefreshError as exc:
        fail(str(exc))
    for problem in result.skipped[:20]:
        err.print(f"skipped {problem}", highlight=False, markup=False)
    typer.echo(f"installed {result.domains} domains, {result.ips} addresses, {result.networks} networks from "
               f"{safe_source(source)} at {result.path}" + (f" ({len(result.skipped)} bad lines skipped)"
                                                            if result.skipped else ""))


@pools_app.command("show")
def pools_show(
    entries: Annotated[bool, typer.Option("--entries", help="Also print every entry.")] = False,
    config: ConfigOption = None,
) -> None:
    """Print where the pool list comes from and how many entries it has."""
    from gpusentry.pools import describe

    cfg = setup(config, USES_DETECTION)
    typer.echo(describe(cfg.detection.pools, show_entries=entries))


knowledge_app = typer.Typer(help="The knowledge files detectors read: list them, check one, install a new one.",
                             no_args_is_help=True)
app.add_typer(knowledge_app, name="knowledge")


@knowledge_app.command("list")
def knowledge_list(config: ConfigOption = None) -> None:
    """Print each knowledge file gpusentry reads: where from (shipped or installed), its version and entries."""
    import tomllib

    from gpusentry import knowledge

    cfg = setup(config, USES_DETECTION)
    directory = cfg.detection.knowledge_dir
    for name in knowledge.FILES:
        shipped = knowledge.shipped_path(name)
        installed = directory / name if directory is not None and (directory / name).is_file() else None
        path = installed or shipped
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            typer.echo(f"{name:22} {path}: unreadable ({exc}); `gpusentry knowledge check {path}` says why")
            continue
        counts = ", ".join(f"{len(v)} {k}" for k, v in doc.items() if isinstance(v, list))
        typer.echo(f"{name:22} v{doc.get('version')} {counts} ({'installed' if installed else 'shipped'}: {path})")


@knowledge_app.command("check")
def knowledge_check(
    files: Annotated[list[Path], typer.Argument(help="Knowledge files to check (each by its file name, or --as).")],
    as_name: Annotated[str | None, typer.Option("--as", help="Check every file as this knowledge file "
                                                "(e.g. miners.toml).", show_default=False)] = None,
) -> None:
    """Check knowledge files as the detectors will load them; exit 1 naming the entry and key to fix."""
    from gpusentry import knowledge

    bad = 0
    for path in files:
        name = as_name or path.name
        try:
            counts = knowledge.check(name, path)
        except (knowledge.KnowledgeError, OSError) as exc:
            bad += 1
            err.print(Text.assemble(("invalid:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)
            continue
        typer.echo(f"ok: {path} as {name}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if bad:
        raise typer.Exit(EXIT_FAILED)


@knowledge_app.command("refresh")
def knowledge_refresh(
    name: Annotated[str, typer.Argument(help="Which knowledge file (e.g. miners.toml; `gpusentry knowledge list`).")],
    source: Annotated[str, typer.Option("--from", help="File path or http(s) URL of the new file.")],
    config: ConfigOption = None,
) -> None:
    """Check a new version of a knowledge file and install it in detection.knowledge_dir (atomically)."""
    from gpusentry import knowledge
    from gpusentry.pools import PoolRefreshError, fetch, safe_source

    cfg = setup(config, USES_DETECTION)
    if cfg.detection.knowledge_dir is None:
        fail("detection.knowledge_dir is not set; set it (e.g. /var/lib/gpusentry/knowledge) so workers read "
             "installed files from there", EXIT_USAGE)
    try:
        text = fetch(source)
        path, counts = knowledge.install(name, text, cfg.detection.knowledge_dir, source=safe_source(source))
    except (PoolRefreshError, knowledge.KnowledgeError) as exc:
        fail(f"{exc}; nothing installed")
    typer.echo(f"installed {name} from {safe_source(source)} at {path}: "
               + ", ".join(f"{n} {k}" for k, n in counts.items()) + "; restart the workers to use it")


@app.command()
def report(
    files: Annotated[list[Path] | None, typer.Argument(help="Incidents files (the worker's or `up`'s) or alert "
                                                       "JSONL from `replay`; .gz works.", show_default=False)] = None,
    from_kafka: Annotated[bool, typer.Option("--from-kafka", help="Read the alerts topic instead (from the offsets "
                                             "of --since).")] = False,
    by: Annotated[str, typer.Option(help="Group by: incident, host, namespace, team, cost-centre, gpu-model, day "
                                         "or month.")] = "incident",
    fmt: Annotated[str, typer.Option("--format", help="csv, json or html.")] = "csv",
    since: Annotated[str | None, typer.Option(help="Only incidents with evidence from this time on (RFC 3339).",
                                              show_default=False)] = None,
    until: Annotated[str | None, typer.Option(help="Only incidents that began before this time (RFC 3339).",
                                              show_default=False)] = None,
    min_severity: Annotated[str, typer.Option(help="Leave out incidents below this severity (low notes are not "
                                              "paged).")] = "medium",
    verdicts: Annotated[Path | None, typer.Option(help="Analyst verdicts: the output of `gpusentry feedback list "
                                                  "--all --json`.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here (default stdout).")] = None,
    config: ConfigOption = None,
) -> None:
    """What each hijack cost: a ledger per incident, host, namespace, team, cost centre, GPU model, day or month."""
    from gpusentry.report import (
        FORMATS,
        GROUPS,
        SEVERITIES,
        ReportError,
        incident_rows,
        load_files,
        load_topic,
        load_verdicts,
    )
    from gpusentry.report import render as render_report
    from gpusentry.timefmt import parse_timestamp

    cfg = setup(config, USES_REPORT)
    if by not in GROUPS:
        fail(f"--by {by!r}: choose one of {', '.join(GROUPS)}", EXIT_USAGE)
    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}", EXIT_USAGE)
    if min_severity not in SEVERITIES:
        fail(f"--min-severity {min_severity!r}: choose one of {', '.join(SEVERITIES)}", EXIT_USAGE)
    if bool(files) == from_kafka:
        fail("give incidents files, or --from-kafka (not both)", EXIT_USAGE)
    try:
        t_since = parse_timestamp(since) if since else None
        t_until = parse_timestamp(until) if until else None
    except (TypeError, ValueError) as exc:
        fail(f"--since/--until: {exc}; expected RFC 3339, e.g. 2026-11-01T00:00:00Z", EXIT_USAGE)
    try:
        loaded = load_topic(cfg, t_since, t_until) if from_kafka else load_files(files or [])
        rows = incident_rows(loaded, load_verdicts(verdicts) if verdicts else None, t_since, t_until, min_severity)
        source = "alerts topic " + cfg.topics.alerts if from_kafka else ", ".join(str(f) for f in files or [])
        data = render_report(rows, by=by, fmt=fmt, source=source)
    except ReportError as exc:
        fail(str(exc))
    for problem in loaded.skipped[:10]:
        err.print(f"skipped {problem}", highlight=False, markup=False)
    if out is None:
        sys.stdout.buffer.write(data)
    else:
        out.write_bytes(data)
    err.print(f"{len(rows)} incidents ({loaded.updates} updates read, {len(loaded.skipped)} lines skipped), "
              f"{sum(r['total'] for r in rows):,.2f} {rows[0]['currency'] if rows else ''} in all"
              + (f"; written to {out}" if out else ""), highlight=False, markup=False)


@app.command()
def waste(
    files: Annotated[list[Path], typer.Argument(help="Event files with GPU samples (the agent's JSONL, a simulate "
                                                "file, anything replay reads; .gz works).")],
    by: Annotated[str, typer.Option(help="Group by: owner, namespace, user, host, gpu-model or day.")] = "owner",
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here (default stdout).")] = None,
    config: ConfigOption = None,
) -> None:
    """GPU time the scheduler allocated and nobody used, per owner, priced like stolen time (docs/finance.md)."""
    from gpusentry.report import to_csv, to_json
    from gpusentry.waste import GROUPS, WasteError, rows, tally_files

    cfg = setup(config, USES_DETECTION)
    if by not in GROUPS:
        fail(f"--by {by!r}: choose one of {', '.join(GROUPS)}", EXIT_USAGE)
    if fmt not in ("csv", "json"):
        fail(f"--format {fmt!r}: choose csv or json", EXIT_USAGE)
    try:
        t = tally_files(files, cfg.detection)
        records = rows(t, cfg.detection, by)
    except WasteError as exc:
        fail(str(exc))
    for problem in t.skipped[:10]:
        err.print(f"skipped {problem}", highlight=False, markup=False)
    data = to_csv(records) if fmt == "csv" else to_json(records)
    if out is None:
        sys.stdout.buffer.write(data)
    else:
        out.write_bytes(data)
    err.print(f"{len(records)} rows from {t.samples} allocated GPU samples ({len(t.skipped)} lines skipped): "
              f"{sum(r['idle_gpu_hours'] for r in records):,.2f} idle GPU-hours, "
              f"{sum(r['waste'] for r in records):,.2f} {records[0]['currency'] if records else ''}"
              + (f"; written to {out}" if out else ""), highlight=False, markup=False)


deadletters_app = typer.Typer(help="The dead-letter topic: list what is there, deliver an output's alerts again.",
                              no_args_is_help=True)
app.add_typer(deadletters_app, name="deadletters")


def _range(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    from gpusentry.timefmt import parse_timestamp

    try:
        return (parse_timestamp(since) if since else None, parse_timestamp(until) if until else None)
    except (TypeError, ValueError) as exc:
        fail(f"--since/--until: {exc}; expected RFC 3339, e.g. 2026-11-01T00:00:00Z", EXIT_USAGE)


Since = Annotated[str | None, typer.Option(help="Only dead letters written from this time on (RFC 3339).",
                                           show_default=False)]
Until = Annotated[str | None, typer.Option(help="Only dead letters written before this time (RFC 3339).",
                                           show_default=False)]


@deadletters_app.command("list")
def deadletters_list(
    since: Since = None, until: Until = None,
    output: Annotated[str | None, typer.Option(help="Only what this output could not take.", show_default=False)
                      ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per dead letter.")] = False,
    config: ConfigOption = None,
) -> None:
    """What went to the dead-letter topic: refused input and undelivered alerts, with the reason."""
    import orjson
    from rich.table import Table

    from gpusentry.topic_range import TopicReadError
    from outputs.deadletters import read_dead_letters

    cfg = setup(config, USES_OUTPUTS)
    t_since, t_until = _range(since, until)
    try:
        letters, bad = read_dead_letters(cfg, t_since, t_until)
    except TopicReadError as exc:
        fail(str(exc))
    rows = [dl.row() for dl in letters if output is None or dl.output == output]
    if as_json:
        for row in rows:
            typer.echo(orjson.dumps(row).decode())
    else:
        table = Table(title=f"{len(rows)} dead letters" + (f" ({bad} unreadable records)" if bad else ""))
        for col in ("@timestamp", "reason", "output", "host", "dedup_key", "message"):
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*(Text(str(row.get(c) or "")) for c in ("@timestamp", "reason", "output", "host",
                                                                  "dedup_key", "message")))
        Console(soft_wrap=True).print(table)


@deadletters_app.command("redrive")
def deadletters_redrive(
    output: Annotated[str, typer.Option(help="The output whose undelivered alerts to send again (it need not be "
                                        "enabled, but must be configured).")],
    since: Since = None, until: Until = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be sent; send nothing.")] = False,
    config: ConfigOption = None,
) -> None:
    """Deliver again the alerts an output could not take (retried as the forwarder retries); exit 1 if any fail."""
    from gpusentry.topic_range import TopicReadError
    from outputs.deadletters import alerts_of, read_dead_letters, redrive
    from outputs.registry import OutputConfigError

    cfg = setup(config, USES_OUTPUTS)
    t_since, t_until = _range(since, until)
    try:
        letters, _ = read_dead_letters(cfg, t_since, t_until)
        if dry_run:
            alerts, unreadable = alerts_of(letters, output)
            typer.echo(f"would send {len(alerts)} alerts to {output} ({len(unreadable)} unreadable dead letters)")
            return
        result = redrive(cfg, letters, output)
    except (TopicReadError, OutputConfigError) as exc:
        fail(str(exc))
    for problem in result.unreadable[:10]:
        err.print(f"skipped {problem}", highlight=False, markup=False)
    typer.echo(f"redrove {result.selected} alerts to {output}: {result.delivered} delivered, {result.failed} "
               "dead-lettered again")
    if result.failed:
        raise typer.Exit(EXIT_FAILED)


feedback_app = typer.Typer(help="Analyst verdicts: make a signing key, add, list and revoke suppressions.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("keygen")
def feedback_keygen(
    out: Annotated[Path, typer.Option("--out", help="Where to write the new signing key (PEM, mode 0600).")],
) -> None:
    """Make an analyst's Ed25519 signing key and print the public key line for the workers' trusted_keys."""
    import os

    from streams.feedback import generate_key

    if out.exists():
        fail(f"{out} exists; choose another path (an existing key is never overwritten)", EXIT_USAGE)
    pem, public = generate_key()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    typer.echo(f"signing key written to {out} (keep it on your machine; never on a GPU node)")
    typer.echo("add this line under [feedback.trusted_keys] in the workers' configuration:")
    typer.echo(f'"{out.stem}" = "{public}"')


ScopeHost = Annotated[str | None, typer.Option("--host", help="host.name the verdict covers.")]
ScopeExe = Annotated[str | None, typer.Option("--executable", help="process.executable the verdict covers.")]
ScopeRule = Annotated[str | None, typer.Option("--rule", help="rule.id the verdict covers.")]
ScopeKey = Annotated[str | None, typer.Option("--dedup-key", help="The incident (gpusentry.alert.dedup_key).")]


@feedback_app.command("add")
def feedback_add(
    reason: Annotated[str, typer.Option("--reason", help="Why this is benign (kept in the audit record).")],
    host: ScopeHost = None, executable: ScopeExe = None, rule: ScopeRule = None, dedup_key: ScopeKey = None,
    expires: Annotated[str | None, typer.Option(help="RFC 3339 time the verdict ends (default: now + "
                                                "feedback.default_expiry_days).", show_default=False)] = None,
    no_expiry: Annotated[bool, typer.Option("--no-expiry", help="Until revoked.")] = False,
    config: ConfigOption = None,
) -> None:
    """Sign and publish a 'benign' verdict: incident updates matching the whole scope are not published."""
    import time

    from gpusentry.timefmt import format_timestamp, parse_timestamp
    from streams.feedback import FeedbackError
    from streams.feedback_admin import publish, signed_verdict

    cfg = setup(config, USES_FEEDBACK)
    scope = {"host.name": host, "process.executable": executable, "rule.id": rule,
             "gpusentry.feedback.dedup_key": dedup_key}
    if not any(scope.values()):
        fail("give a scope: at least one of --host, --executable, --rule, --dedup-key", EXIT_USAGE)
    if not reason.strip():
        fail("--reason must say why (it is the audit record)", EXIT_USAGE)
    if expires is not None:
        try:
            expires = format_timestamp(parse_timestamp(expires))
        except (ValueError, TypeError) as exc:
            fail(f"--expires: {exc}; expected RFC 3339, e.g. 2026-12-31T00:00:00Z", EXIT_USAGE)
    elif not no_expiry:
        expires = format_timestamp(time.time() + cfg.feedback.default_expiry_days * 86400)
    try:
        doc = signed_verdict(cfg, verdict="benign", scope=scope, reason=reason, expires=expires)
        publish(cfg, doc)
    except FeedbackError as exc:
        fail(str(exc))
    fb = doc["gpusentry"]["feedback"]
    typer.echo(f"verdict {fb['id']} published: benign for {', '.join(f'{k}={v}' for k, v in scope.items() if v)}"
               f" until {expires or 'revoked'}, signed by {fb['signature']['key_id']}")


@feedback_app.command("list")
def feedback_list(
    all_: Annotated[bool, typer.Option("--all", help="Also verdicts that are no longer in force.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per verdict.")] = False,
    config: ConfigOption = None,
) -> None:
    """The audit trail: every verdict on the feedback topic, who made it, why, and what became of it."""
    import time

    import orjson
    from rich.table import Table

    from streams.feedback import FeedbackError, Verifier
    from streams.feedback_admin import audit, read_feedback_topic

    cfg = setup(config, USES_FEEDBACK)
    try:
        rows = audit(read_feedback_topic(cfg), Verifier.from_settings(cfg.feedback), now=time.time())
    except FeedbackError as exc:
        fail(str(exc))
    shown = rows if all_ else [r for r in rows if r.state == "in force"]
    if as_json:
        for r in shown:
            typer.echo(orjson.dumps(r.as_dict()).decode())
        return
    table = Table(title=f"{len(shown)} of {len(rows)} verdicts" + ("" if all_ else " (in force; --all for every one)"))
    for col in ("id", "made (UTC)", "verdict", "by", "key", "scope", "reason", "expires", "state"):
        table.add_column(col, overflow="fold")
    for r in shown:
        table.add_row(*(Text(v) for v in (r.verdict_id[:12], r.timestamp, r.verdict, r.analyst, r.signed_by,
                                          " ".join(f"{k}={v}" for k, v in r.scope.items()), r.reason,
                                          r.expires or "-", r.state)))
    Console(soft_wrap=True).print(table)


@feedback_app.command("revoke")
def feedback_revoke(
    verdict_id: Annotated[str, typer.Argument(help="The verdict's id (or its first 6+ characters), from `list`.")],
    reason: Annotated[str, typer.Option("--reason", help="Why the verdict is lifted (audit record).")],
    config: ConfigOption = None,
) -> None:
    """Sign and publish the revocation of one verdict: its scope is no longer suppressed."""
    import time

    from streams.feedback import FeedbackError, Verifier
    from streams.feedback_admin import audit, find_verdict, publish, read_feedback_topic, signed_verdict

    cfg = setup(config, USES_FEEDBACK)
    try:
        rows = audit(read_feedback_topic(cfg), Verifier.from_settings(cfg.feedback), now=time.time())
        target = find_verdict(rows, verdict_id)
        scope = {("gpusentry.feedback." + k if k == "dedup_key" else k): v for k, v in target.scope.items()}
        doc = signed_verdict(cfg, verdict="revoke", scope=scope, reason=reason, expires=None)
        publish(cfg, doc)
    except FeedbackError as exc:
        fail(str(exc))
    typer.echo(f"verdict {target.verdict_id} revoked (revocation {doc['gpusentry']['feedback']['id']})")


outputs_app = typer.Typer(help="Check the alert outputs (SIEM, Slack, PagerDuty, webhooks).", no_args_is_help=True)
app.add_typer(outputs_app, name="outputs")


@app.command()
def forward(config: ConfigOption = None) -> None:
    """Deliver incidents from the alerts topic to every enabled output, retried; failures to the dead-letter topic."""
    from outputs.cli import CommandError, run_forward

    cfg = setup(config, USES_FORWARD)
    try:
        summary = run_forward(cfg)
    except CommandError as exc:
        fail(str(exc), exc.code)
    err.print(summary.describe(), highlight=False)
    # Ctrl-C is an interruption (130, like every command); SIGTERM is how a service manager stops it (0).
    raise typer.Exit(EXIT_INTERRUPTED if summary.stopped_by == "SIGINT" else EXIT_OK)


@outputs_app.command("test")
def outputs_test(
    config: ConfigOption = None,
    output: Annotated[list[str] | None, typer.Option("--output", "-o", help="Only this output (repeatable); "
                                                     "it need not be enabled.")] = None,
    resolve: Annotated[bool, typer.Option(help="Also send the resolution (closes the PagerDuty test incident).")
                       ] = True,
    attempts: Annotated[int, typer.Option(min=1, max=10, help="Attempts per output.")] = 2,
) -> None:
    """Send a sample incident to every enabled output and report each one's result (exit 1 if any failed)."""
    from outputs.cli import CommandError, test_outputs

    cfg = setup(config, USES_OUTPUTS)
    try:
        results = test_outputs(cfg, only=output, resolve=resolve, attempts=attempts, console=err)
    except CommandError as exc:
        fail(str(exc), exc.code)
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_FAILED)


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration and exit 0, or list every problem and exit 2."""
    setup(config, ALL_SECTIONS)
    typer.echo("configuration is valid")


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration as JSON (secrets masked)."""
    cfg = setup(config, ALL_SECTIONS)
    typer.echo(cfg.model_dump_json(indent=2))


@config_app.command("docs")
def config_docs_cmd(out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None
                    ) -> None:
    """Print the Markdown reference of every option (docs/config.md)."""
    text = config_docs()
    if out:
        out.write_text(text + "\n", encoding="utf-8")
    else:
        typer.echo(text)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except ConfigError as exc:  # a section the command was not expected to use, read after all (setup's note)
        err.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
