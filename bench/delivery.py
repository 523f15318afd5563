"""Alert delivery throughput: the dispatcher to a local Splunk HEC receiver, batched vs one request per alert.

Both runs use the same dispatcher, the same HEC output code and the same local receiver (a threaded
HTTP server that checks the token and parses every event); only ``batch_max_events`` differs.
The figure that matters is the ratio, measured in the same run on the same machine.

    python bench/delivery.py [--alerts 5000] [--single-alerts 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpusentry.settings.outputs import HecOutputSettings  # noqa: E402
from outputs.dispatcher import Dispatcher, MemoryDeadLetterSink  # noqa: E402
from outputs.hec import HecOutput  # noqa: E402
from outputs.sample import sample_incident  # noqa: E402

TOKEN = "bench-token-0000"


class HecReceiver:
    """Counts the events it accepted; answers like HEC (token check, JSON objects back to back)."""

    def __init__(self) -> None:
        self.events = 0
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms per request.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                if self.headers.get("Authorization") != f"Splunk {TOKEN}":
                    self._answer(403, b'{"text":"Invalid token","code":4}')
                    return
                decoder, i, n = json.JSONDecoder(), 0, 0
                while i < len(body):
                    while i < len(body) and body[i].isspace():
                        i += 1
                    if i < len(body):
                        _, i = decoder.raw_decode(body, i)
                        n += 1
                with receiver.lock:
                    receiver.events += n
                    receiver.requests += 1
                self._answer(200, b'{"text":"Success","code":0}')

            def _answer(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_alerts(n: int) -> list[dict[str, Any]]:
    template, _ = sample_incident(test_marker=False)
    out = []
    for i in range(n):
        a = copy.deepcopy(template)
        a["event"]["id"] = f"bench{i:027d}"
        a["gpusentry"]["alert"]["dedup_key"] += f"-{i}"
        out.append(a)
    return out


async def run(receiver: HecReceiver, alerts: list[dict[str, Any]], batch: int) -> tuple[float, int]:
    settings = HecOutputSettings(enabled=True, url=receiver.url, token=TOKEN, batch_max_events=batch,
                                 batch_linger_s=0.01, queue_size=len(alerts) + 1, breaker_failures=0)
    before = receiver.requests
    dispatcher = await Dispatcher([HecOutput(settings)], MemoryDeadLetterSink(), strict=True).start()
    start = time.perf_counter()
    tickets = [await dispatcher.submit(a) for a in alerts]
    outcomes = [o for t in tickets for o in await t]
    elapsed = time.perf_counter() - start
    await dispatcher.close()
    if not all(o.delivered for o in outcomes):
        raise SystemExit("bench: some alerts were not delivered")
    return len(alerts) / elapsed, receiver.requests - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alerts", type=int, default=5000, help="alerts sent in the batched run")
    parser.add_argument("--single-alerts", type=int, default=1000, help="alerts sent one request each (baseline)")
    parser.add_argument("--batch", type=int, default=100, help="batch_max_events of the batched run")
    args = parser.parse_args()
    receiver = HecReceiver()
    try:
        asyncio.run(run(receiver, make_alerts(50), 10))  # warm-up: imports, connection pool
        single_rate, single_requests = asyncio.run(run(receiver, make_alerts(args.single_alerts), 1))
        batched_rate, batched_requests = asyncio.run(run(receiver, make_alerts(args.alerts), args.batch))
    finally:
        receiver.close()
    print("alert delivery to a local Splunk HEC receiver (dispatcher + HecOutput + httpx)")
    print(f"  one request per alert : {single_rate:10.0f} alerts/s  ({args.single_alerts} alerts, "
          f"{single_requests} requests)")
    print(f"  batched (≤{args.batch}/request): {batched_rate:10.0f} alerts/s  ({args.alerts} alerts, "
          f"{batched_requests} requests)")
    print(f"  ratio batched / per-alert: {batched_rate / single_rate:.1f}x")


if __name__ == "__main__":
    main()
