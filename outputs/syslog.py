"""Syslog to a SIEM: RFC 5424 messages over UDP (RFC 5426), TCP (RFC 6587) or TLS (RFC 5425).

* Message: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG``; header fields are printable
  US-ASCII without spaces, cut to the RFC's lengths; MSG is the CEF, LEEF 2.0 or JSON body in UTF-8.
* TCP and TLS frame each message with **octet counting** (``<length> <message>``, RFC 6587 3.4.1 and
  RFC 5425 4.3), so a body may hold any byte, line breaks included, without splitting a message.
* One **persistent connection** per output, reconnected when the receiver closed it or a write fails
  (the dispatcher then retries the batch).  A batch is written as back-to-back frames in one write.

TCP syslog has no acknowledgements: a message written just before the receiver dies can be lost
without an error.  Use the Kafka, HEC or webhook outputs where every alert must be confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Sequence

import orjson

from gpusentry.settings.outputs import SyslogOutputSettings
from gpusentry.timefmt import format_timestamp
from outputs.base import Alert, Clock, DeliveryError, Output, severity, status
from outputs.cef import format_cef
from outputs.leef import format_leef

# Syslog severities (RFC 5424 6.2.1): 2 critical, 3 error, 4 warning, 5 notice, 6 informational.
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5}
RESOLVED_SEVERITY = 6


def _header_field(value: str, limit: int) -> str:
    """PRINTUSASCII (33-126) only, at most ``limit`` characters; empty becomes the NILVALUE ``-``."""
    text = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in value)[:limit]
    return text or "-"


def format_rfc5424(body: str, *, facility: int, severity_code: int, timestamp: float, hostname: str,
                   app_name: str, procid: str, msgid: str, max_bytes: int = 8192) -> bytes:
    """One RFC 5424 message (no framing), cut to ``max_bytes`` on a UTF-8 character boundary."""
    pri = facility * 8 + severity_code
    head = (f"<{pri}>1 {format_timestamp(timestamp)} {_header_field(hostname, 255)} "
            f"{_header_field(app_name, 48)} {_header_field(procid, 128)} {_header_field(msgid, 32)} - ")
    data = head.encode("ascii") + body.encode("utf-8")
    if len(data) > max_bytes:
        data = data[:max_bytes].decode("utf-8", "ignore").encode("utf-8")
    return data


def octet_frame(message: bytes) -> bytes:
    """RFC 6587 octet-counting frame: the message length in ASCII digits, a space, the message."""
    return b"%d %s" % (len(message), message)


def format_body(alert: Alert, fmt: str, leef_delimiter: str = "^") -> str:
    if fmt == "cef":
        return format_cef(alert)
    if fmt == "leef":
        return format_leef(alert, leef_delimiter)
    return orjson.dumps(alert).decode()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.error: Exception | None = None

    def error_received(self, exc: Exception) -> None:
        # An ICMP "port unreachable" for an earlier datagram: reported on the next send.
        self.error = exc


class SyslogOutput(Output):
    kind = "syslog"
    max_batch = 50

    def __init__(self, settings: SyslogOutputSettings, name: str | None = None, *,
                 clock: Clock | None = None) -> None:
        super().__init__(settings, name, clock=clock)
        self.settings = settings
        self.connects = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_protocol: _UdpProtocol | None = None
        self._procid = str(os.getpid())

    def message(self, alert: Alert) -> bytes:
        s = self.settings
        sev = RESOLVED_SEVERITY if status(alert) == "resolved" else SYSLOG_SEVERITY[severity(alert)]
        return format_rfc5424(format_body(alert, s.format, s.leef_delimiter), facility=s.facility,
                              severity_code=sev, timestamp=self.clock.time(), hostname=s.hostname,
                              app_name=s.app_name, procid=self._procid, msgid="incident",
                              max_bytes=s.max_message_bytes)

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        ctx = ssl.create_default_context(cafile=str(s.tls_ca_file) if s.tls_ca_file else None)
        if s.tls_cert_file:
            ctx.load_cert_chain(str(s.tls_cert_file), str(s.tls_key_file) if s.tls_key_file else None)
        return ctx

    async def _stream(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing() and not (
                self._reader is not None and self._reader.at_eof()):
            return self._writer
        await self._close_stream()
        s = self.settings
        tls = self._tls_context() if s.transport == "tls" else None
        server_name = (s.tls_server_name or s.host) if tls else None
        try:
            self._reader, self._writer = await asyncio.open_connection(
                s.host, s.effective_port, ssl=tls, server_hostname=server_name)
        except ssl.SSLCertVerificationError as exc:
            raise DeliveryError(f"TLS certificate of {s.host}:{s.effective_port} rejected: {exc.verify_message}; "
                                "set outputs.syslog.tls_ca_file to the CA that signed it", retryable=False) from None
        self.connects += 1
        return self._writer

    async def send(self, batch: Sequence[Alert]) -> None:
        messages = [self.message(a) for a in batch]
        if self.settings.transport == "udp":
            await self._send_udp(messages)
            return
        writer = await self._stream()
        try:
            writer.write(b"".join(octet_frame(m) for m in messages))
            await writer.drain()
        except (OSError, ConnectionError) as exc:
            await self._close_stream()
            raise DeliveryError(f"syslog connection to {self.settings.host}:{self.settings.effective_port} "
                                f"failed: {exc}", retryable=True) from None

    async def _send_udp(self, messages: list[bytes]) -> None:
        if self._udp is None or self._udp.is_closing():
            loop = asyncio.get_running_loop()
            self._udp, self._udp_protocol = await loop.create_datagram_endpoint(
                _UdpProtocol, remote_addr=(self.settings.host, self.settings.effective_port))
            self.connects += 1
        assert self._udp_protocol is not None
        if self._udp_protocol.error is not None:
            error, self._udp_protocol.error = self._udp_protocol.error, None
            raise DeliveryError(f"syslog receiver {self.settings.host}:{self.settings.effective_port} "
                                f"refused an earlier datagram: {error}", retryable=True)
        for m in messages:
            self._udp.sendto(m)

    async def _close_stream(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            # Already broken: closing is all we wanted.
            with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def close(self) -> None:
        await self._close_stream()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
