"""Syslog CEF into a real rsyslogd (Debian's rsyslog + rsyslog-gnutls), over TCP, TLS and UDP.

The fixture starts rsyslogd in the foreground on free loopback ports with its own config, pid file
and work directory, a throwaway CA and server certificate made with the openssl CLI, and a file
action that writes each received message (``%rawmsg%``) on its own line.  The tests read that file
back and parse the RFC 5424 header and the CEF message field for field, including values holding
``|``, ``=``, ``\\`` and line breaks.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gpusentry.broker import free_port, wait_for_port
from gpusentry.settings.outputs import SyslogOutputSettings
from outputs.cef import parse_cef
from outputs.dispatcher import Dispatcher, MemoryDeadLetterSink
from outputs.leef import parse_leef
from outputs.syslog import SyslogOutput
from tests.outputs_helpers import alert, with_network

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None)
GTLS = any(Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so",
                                      "/usr/lib/aarch64-linux-gnu/rsyslog/lmnsd_gtls.so",
                                      "/usr/lib/rsyslog/lmnsd_gtls.so"))
pytestmark = pytest.mark.skipif(RSYSLOGD is None or shutil.which("openssl") is None,
                                reason="rsyslogd or openssl not installed: apt-get install rsyslog rsyslog-gnutls "
                                       "openssl (listed in tests/debian-packages.txt)")

TRICKY_MESSAGE = "pipe | equals = backslash \\ end\nsecond line\r\nthird = x\\=y |"
TRICKY_COMMAND = "/tmp/.x/xmrig --pass=w0rk|er -o C:\\pools\\a=b"
TRICKY_RULE_NAME = "GPU|hijack \\ incident"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=gpusentry test {name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", f"{name}-server.key",
             "-out", f"{name}-server.csr", cwd=d)
    (d / f"{name}-ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", f"{name}-server.csr", "-CA", f"{name}.pem", "-CAkey", f"{name}.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}-ext.cnf", "-out", f"{name}-server.pem", cwd=d)
    return d / f"{name}.pem", d / f"{name}-server.pem", d / f"{name}-server.key"


class Rsyslog:
    def __init__(self, d: Path, pki: tuple[Path, Path, Path]) -> None:
        self.dir = d
        self.tcp_port, self.tls_port, self.udp_port = free_port(), free_port(), free_port()
        self.out = d / "received.log"
        self.ca, cert, key = pki
        work = d / "work"
        work.mkdir()
        tls_input = (f'input(type="imtcp" port="{self.tls_port}" address="127.0.0.1" ruleset="remote" '
                     f'streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon" '
                     f'streamDriver.CAFile="{self.ca}" streamDriver.CertFile="{cert}" '
                     f'streamDriver.KeyFile="{key}")') if GTLS else ""
        self.conf = d / "rsyslog.conf"
        self.conf.write_text(f"""
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp" maxSessions="50")
module(load="imudp")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="remote") {{
  action(type="omfile" file="{self.out}" template="raw")
}}
input(type="imtcp" port="{self.tcp_port}" address="127.0.0.1" ruleset="remote")
input(type="imudp" port="{self.udp_port}" address="127.0.0.1" ruleset="remote")
{tls_input}
""")
        self.pidfile = d / "rsyslogd.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        assert RSYSLOGD is not None
        self.log = open(self.dir / "rsyslogd.stderr", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ports = [self.tcp_port] + ([self.tls_port] if GTLS else [])
        if not all(wait_for_port("127.0.0.1", p, 15) for p in ports):
            self.stop()
            raise RuntimeError("rsyslogd did not start: " + (self.dir / "rsyslogd.stderr").read_text()[-2000:])
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.log.close()

    def lines(self, expected: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            text = self.out.read_text(encoding="utf-8") if self.out.exists() else ""
            lines = [ln for ln in text.splitlines() if ln]
            if len(lines) >= expected or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def rsyslog(tmp_path, pki):
    server = Rsyslog(tmp_path, pki).start()
    yield server
    server.stop()


def tricky_alert(i: int) -> dict:
    a = with_network(alert(i, message=TRICKY_MESSAGE, process__command_line=TRICKY_COMMAND, rule__name=TRICKY_RULE_NAME,
                           user__name="CORP\\svc=ml|ops"))
    return a


def parse_rfc5424(line: str) -> tuple[dict[str, str], str]:
    pri_version, ts, host, app, procid, msgid, sd, msg = line.split(" ", 7)
    assert pri_version.startswith("<") and pri_version.endswith(">1")
    return {"pri": pri_version[1:-2], "timestamp": ts, "hostname": host, "app": app, "procid": procid,
            "msgid": msgid, "sd": sd}, msg


async def send(settings: SyslogOutputSettings, alerts: list[dict]) -> tuple[SyslogOutput, list]:
    out = SyslogOutput(settings)
    sink = MemoryDeadLetterSink()
    d = await Dispatcher([out], sink, strict=True).start()
    try:
        outcomes = [o for a in alerts for o in await d.deliver(a)]
    finally:
        await d.close()
    return out, outcomes


def check_cef_line(line: str, a: dict) -> None:
    header, msg = parse_rfc5424(line)
    assert header["pri"] == str(13 * 8 + 2), "facility 13 (log audit), severity 2 (critical)"
    assert header["app"] == "gpusentry" and header["msgid"] == "incident" and header["sd"] == "-"
    assert header["procid"] == str(os.getpid())
    cef_header, ext = parse_cef(msg)
    assert cef_header == ["CEF:0", "gpusentry", "gpusentry", cef_header[3], a["rule"]["id"], TRICKY_RULE_NAME, "10"]
    assert ext["msg"] == TRICKY_MESSAGE
    assert ext["suser"] == "CORP\\svc=ml|ops"
    assert ext["cs3Label"] == "commandLine" and ext["cs3"] == TRICKY_COMMAND
    assert ext["cs1Label"] == "dedupKey" and ext["cs1"] == a["gpusentry"]["alert"]["dedup_key"]
    assert (ext["src"], ext["dst"], ext["dpt"], ext["spt"]) == ("10.0.0.7", "203.0.113.9", "3333", "50512")
    assert ext["shost"] == "gpu-node-7" and ext["act"] == "open" and ext["rt"] == "1790000000000"
    # The escapes as they travel, not only as our parser reads them:
    assert "GPU\\|hijack \\\\ incident|10|" in msg
    assert "msg=pipe | equals \\= backslash \\\\ end\\nsecond line\\r\\nthird \\= x\\\\\\=y |" in msg


def test_cef_over_tcp_octet_counting_one_persistent_connection(rsyslog):
    alerts = [tricky_alert(i) for i in range(5)]
    settings = SyslogOutputSettings(enabled=True, port=rsyslog.tcp_port, transport="tcp", format="cef")
    out, outcomes = asyncio.run(send(settings, alerts))
    assert all(o.delivered for o in outcomes)
    lines = rsyslog.lines(5)
    assert len(lines) == 5, "a line break inside a value must not split a message (octet counting)"
    for line, a in zip(lines, alerts, strict=True):
        check_cef_line(line, a)
    assert out.connects == 1


@pytest.mark.skipif(not GTLS, reason="rsyslog TLS module missing: apt-get install rsyslog-gnutls")
def test_cef_over_tls(rsyslog):
    alerts = [tricky_alert(i) for i in range(3)]
    settings = SyslogOutputSettings(enabled=True, port=rsyslog.tls_port, transport="tls", format="cef",
                                    tls_ca_file=rsyslog.ca)
    out, outcomes = asyncio.run(send(settings, alerts))
    assert all(o.delivered for o in outcomes) and out.connects == 1
    lines = rsyslog.lines(3)
    assert len(lines) == 3
    for line, a in zip(lines, alerts, strict=True):
        check_cef_line(line, a)


@pytest.mark.skipif(not GTLS, reason="rsyslog TLS module missing: apt-get install rsyslog-gnutls")
def test_tls_with_an_unknown_ca_fails_fast(rsyslog, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    wrong_ca, _, _ = make_pki(other, "other")
    settings = SyslogOutputSettings(enabled=True, port=rsyslog.tls_port, transport="tls", tls_ca_file=wrong_ca)
    _, outcomes = asyncio.run(send(settings, [alert(1)]))
    assert not outcomes[0].delivered and outcomes[0].attempts == 1
    assert "tls_ca_file" in (outcomes[0].reason or "")


def test_reconnects_after_the_receiver_restarts(rsyslog):
    settings = SyslogOutputSettings(enabled=True, port=rsyslog.tcp_port, transport="tcp", format="cef",
                                    backoff_initial_s=0.05)

    async def main() -> SyslogOutput:
        out = SyslogOutput(settings)
        d = await Dispatcher([out], MemoryDeadLetterSink(), strict=True).start()
        for i in range(2):
            assert (await d.deliver(tricky_alert(i)))[0].delivered
        assert len(await asyncio.to_thread(rsyslog.lines, 2)) == 2
        await asyncio.to_thread(rsyslog.stop)
        await asyncio.to_thread(rsyslog.start)
        await asyncio.sleep(0.2)  # the old connection's close reaches our reader
        for i in range(2, 4):
            assert (await d.deliver(tricky_alert(i)))[0].delivered
        await d.close()
        return out

    out = asyncio.run(main())
    lines = rsyslog.lines(4)
    assert len(lines) == 4 and out.connects == 2


def test_leef_and_json_over_udp(rsyslog):
    a = tricky_alert(1)
    leef = SyslogOutputSettings(enabled=True, port=rsyslog.udp_port, transport="udp", format="leef")
    json_ = SyslogOutputSettings(enabled=True, port=rsyslog.udp_port, transport="udp", format="json")
    asyncio.run(send(leef, [a]))
    asyncio.run(send(json_, [a]))
    lines = rsyslog.lines(2)
    assert len(lines) == 2
    _, leef_msg = parse_rfc5424(next(ln for ln in lines if "LEEF:2.0" in ln))
    header, attrs = parse_leef(leef_msg)
    assert header[5] == "^" and "^" not in "".join(attrs.values()).replace("^", "")
    assert attrs["msg"] == TRICKY_MESSAGE and attrs["commandLine"] == TRICKY_COMMAND
    assert attrs["usrName"] == "CORP\\svc=ml|ops" and attrs["dstPort"] == "3333"
    import orjson

    _, json_msg = parse_rfc5424(next(ln for ln in lines if "LEEF:2.0" not in ln))
    assert orjson.loads(json_msg.encode()) == a
