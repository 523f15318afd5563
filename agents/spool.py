"""A bounded, ordered, on-disk spool of Kafka messages that survives restarts.

Layout: a directory of segment files ``<20-digit id>.seg`` holding framed records
(``<length u32><crc32 u32><body>``; body = topic, key, value) and a ``cursor`` file naming the
first record not yet acknowledged by the broker.  The Kafka sink writes every message here first
and moves the cursor only past messages the broker acknowledged, in order, so an outage, a
``BufferError``, a timed-out message or a restart of the agent resends exactly what was not
acknowledged, in the order it was written.

Bounded: when the segment files pass ``max_bytes`` the oldest segment is deleted; the unsent
records it held are counted as dropped (``dropped``) and logged.  A record torn by a crash in
the middle of a write is cut off when the spool is opened again.

Deleted from outside: :meth:`Spool.missing` says when the directory, the open segment or an older one
is gone (someone removed the evidence the agent had not sent yet) and :meth:`Spool.recover` carries on
with what is left and a new segment.  ``created`` says that the spool had no segment when it was opened: the first
start, or a spool deleted, moved or lost with its disk while the agent was stopped.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")  # body length, crc32 of the body
_HALF = struct.Struct("<H")
SEGMENT_SUFFIX = ".seg"
CURSOR_FILE = "cursor"

Position = tuple[int, int]  # (segment id, byte offset in that segment)


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    topic: str
    key: bytes
    value: bytes
    end: Position  # position just past this record: acknowledging it moves the cursor here


def _encode(topic: str, key: bytes, value: bytes) -> bytes:
    t = topic.encode()
    body = _HALF.pack(len(t)) + t + _HALF.pack(len(key)) + key + value
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _decode(body: bytes) -> tuple[str, bytes, bytes]:
    n = _HALF.unpack_from(body, 0)[0]
    topic = body[2:2 + n].decode()
    at = 2 + n
    k = _HALF.unpack_from(body, at)[0]
    key = body[at + 2:at + 2 + k]
    return topic, key, body[at + 2 + k:]


class Spool:
    def __init__(self, directory: str | Path, max_bytes: int, *, segment_bytes: int | None = None) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the spool directory {self.dir} ({exc.strerror}); set agent.spool_dir "
                          "to a writable directory") from exc
        if not os.access(self.dir, os.W_OK):
            raise OSError(f"the spool directory {self.dir} is not writable; set agent.spool_dir to a writable "
                          "directory")
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 * 1024, min(8 * 1024 * 1024, max_bytes // 8))
        self.dropped = 0
        self._sizes: dict[int, int] = {}
        for path in sorted(self.dir.glob(f"*{SEGMENT_SUFFIX}")):
            self._sizes[int(path.stem)] = path.stat().st_size
        self.created = not self._sizes
        if not self._sizes:
            self._sizes[0] = 0
            (self.dir / self._name(0)).touch()
        self._repair_tail()
        self.head = self._load_cursor()
        self._writer: IO[bytes] = open(self.dir / self._name(self._last), "ab")  # noqa: SIM115 - closed in close()
        self.pending = sum(1 for _ in self._scan(self.head))

    # ------------------------------------------------------------------ files

    @staticmethod
    def _name(seg: int) -> str:
        return f"{seg:020d}{SEGMENT_SUFFIX}"

    @property
    def _last(self) -> int:
        return max(self._sizes)

    @property
    def _first(self) -> int:
        return min(self._sizes)

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    def _repair_tail(self) -> None:
        """Cut a record torn by a crash mid-write off the newest segment."""
        seg = self._last
        path = self.dir / self._name(seg)
        good = 0
        with open(path, "rb") as fh:
            data = fh.read()
        while good + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, good)
            body = data[good + _FRAME.size:good + _FRAME.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                break
            good += _FRAME.size + length
        if good != len(data):
            log.warning("spool: cut %d torn byte(s) off %s (the agent stopped mid-write)", len(data) - good, path)
            with open(path, "r+b") as fh:
                fh.truncate(good)
            self._sizes[seg] = good

    def _load_cursor(self) -> Position:
        try:
            seg_text, off_text = (self.dir / CURSOR_FILE).read_text().split()
            pos = (int(seg_text), int(off_text))
        except (OSError, ValueError):
            return (self._first, 0)
        if pos[0] < self._first:
            return (self._first, 0)
        if pos[0] in self._sizes and pos[1] > self._sizes[pos[0]]:
            return (pos[0], self._sizes[pos[0]])
        return pos

    def _save_cursor(self) -> None:
        tmp = self.dir / (CURSOR_FILE + ".tmp")
        tmp.write_text(f"{self.head[0]} {self.head[1]}\n")
        os.replace(tmp, self.dir / CURSOR_FILE)

    # ------------------------------------------------------------------ writing

    def append(self, topic: str, key: bytes, value: bytes) -> None:
        record = _encode(topic, key, value)
        if self._sizes[self._last] and self._sizes[self._last] + len(record) > self.segment_bytes:
            self._rotate()
        self._writer.write(record)
        self._sizes[self._last] += len(record)
        self.pending += 1
        while self.size_bytes > self.max_bytes and len(self._sizes) > 1:
            self._drop_oldest()

    def flush(self, fsync: bool = False) -> None:
        self._writer.flush()
        if fsync:
            os.fsync(self._writer.fileno())

    def _rotate(self) -> None:
        self._writer.close()
        seg = self._last + 1
        self._sizes[seg] = 0
        self._writer = open(self.dir / self._name(seg), "ab")  # noqa: SIM115 - closed in close()

    def _drop_oldest(self) -> None:
        seg = self._first
        if self.head[0] <= seg:
            lost = sum(1 for _ in self._scan(self.head, stop_segment=seg))
            self.dropped += lost
            self.pending -= lost
            self.head = (seg + 1, 0)
            log.warning("spool over its cap (%d bytes): dropped the %d oldest unsent message(s); %d dropped so "
                        "far (raise agent.spool_max_bytes or fix the broker connection)",
                        self.max_bytes, lost, self.dropped)
            self._save_cursor()
        (self.dir / self._name(seg)).unlink(missing_ok=True)
        del self._sizes[seg]

    # ------------------------------------------------------------------ deleted from outside

    def _on_disk(self) -> dict[str, bool] | None:
        """The spool directory's files, each with whether it is the file this spool writes (same inode: our open
        file keeps its inode from reuse, so another inode under its name is another file); None: no directory."""
        try:
            entries = list(os.scandir(self.dir))
        except (FileNotFoundError, NotADirectoryError):
            return None
        ours = os.fstat(self._writer.fileno()).st_ino
        return {entry.name: entry.inode() == ours for entry in entries}

    def missing(self) -> str | None:
        """What of the spool was removed behind the agent's back, or None while it is whole.  One directory listing
        and one ``fstat``: tens of microseconds, cheap enough for every cycle."""
        on_disk = self._on_disk()
        if on_disk is None:
            return f"the spool directory {self.dir} was removed"
        name = self._name(self._last)
        if name not in on_disk:
            return f"the spool segment {name} was removed"
        if not on_disk[name]:
            return f"the spool segment {name} was replaced by another file"
        gone = sum(1 for seg in self._sizes if self._name(seg) not in on_disk)
        if gone:
            return f"{gone} older spool segment(s) were removed"
        return None

    def recover(self) -> int:
        """Carry on after :meth:`missing` found files removed: keep the segments that are still there, start a new
        one when the open one is gone, and return how many unsent records were in the removed files.  Segment ids go
        on from the old ones, so a delivery report for a removed record moves no cursor back."""
        before = self.pending
        self.dir.mkdir(parents=True, exist_ok=True)
        on_disk = self._on_disk() or {}
        last = self._last
        current_intact = on_disk.get(self._name(last), False)
        self._sizes = {s: n for s, n in self._sizes.items()
                       if (current_intact if s == last else self._name(s) in on_disk)}
        if not current_intact:
            self._writer.close()
            (self.dir / self._name(last)).unlink(missing_ok=True)  # a file put in its place is not ours
            self._sizes[last + 1] = 0
            self._writer = open(self.dir / self._name(last + 1), "ab")  # noqa: SIM115 - closed in close()
        if self.head[0] not in self._sizes:
            self.head = (min(s for s in self._sizes if s > self.head[0]), 0)
        self.pending = sum(1 for _ in self._scan(self.head))
        self._save_cursor()
        return max(0, before - self.pending)

    # ------------------------------------------------------------------ reading

    def _scan(self, start: Position, stop_segment: int | None = None) -> Iterator[SpooledMessage]:
        self._writer.flush()
        seg, offset = start
        for s in sorted(self._sizes):
            if s < seg:
                continue
            if stop_segment is not None and s > stop_segment:
                return
            try:
                with open(self.dir / self._name(s), "rb") as fh:
                    fh.seek(offset if s == seg else 0)
                    pos = fh.tell()
                    while True:
                        head = fh.read(_FRAME.size)
                        if len(head) < _FRAME.size:
                            break
                        length, _crc = _FRAME.unpack(head)
                        body = fh.read(length)
                        if len(body) < length:
                            break
                        pos += _FRAME.size + length
                        topic, key, value = _decode(body)
                        yield SpooledMessage(topic, key, value, (s, pos))
            except FileNotFoundError:
                continue  # dropped over the cap while we read

    def read(self, start: Position, limit: int) -> list[SpooledMessage]:
        """Up to ``limit`` records from ``start`` (or from the head, when ``start`` was dropped)."""
        if start < self.head:
            start = self.head
        out = []
        for msg in self._scan(start):
            out.append(msg)
            if len(out) >= limit:
                break
        return out

    def ack(self, end: Position, count: int) -> None:
        """The records up to ``end`` (``count`` of them) reached the broker: move the cursor past them."""
        if end <= self.head:
            return
        self.head = end
        self.pending = max(0, self.pending - count)
        for seg in [s for s in self._sizes if s < end[0]]:
            (self.dir / self._name(seg)).unlink(missing_ok=True)
            del self._sizes[seg]

    def commit(self) -> None:
        """Persist the cursor (once per cycle, and at close)."""
        self._save_cursor()

    def close(self) -> None:
        self._writer.close()
        self._save_cursor()
