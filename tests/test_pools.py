"""Pool intelligence: list parsing and matching, `gpusentry pools refresh|show`, the detector using the list."""

from __future__ import annotations

import copy
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detectors.examples import dns, flow
from detectors.network._poollist import load_pool_list, parse_pool_list
from detectors.network.mining_pool import MiningPool
from gpusentry import contract as c
from gpusentry.cli import app
from gpusentry.pools import safe_source
from gpusentry.settings.detection import DetectionSettings
from gpusentry.settings.pools import PoolSettings


def test_names_match_on_whole_labels_and_addresses_by_network():
    pools, errors = parse_pool_list("nanopool.org\n*.2miners.com.\n0.0.0.0 hosts-style.example\n"
                                    "10.40.0.7\n192.0.2.0/24\nstratum+tcp://proxy.corp.example:3333\n")
    assert not errors
    assert pools.match_domain("xmr-eu1.nanopool.org.") == "nanopool.org"
    assert pools.match_domain("NANOPOOL.ORG") == "nanopool.org"
    assert pools.match_domain("notnanopool.org") is None
    assert pools.match_domain("nanopool.org.evil.example") is None
    assert pools.match_domain("rvn.2miners.com") == "2miners.com"
    assert pools.match_domain("hosts-style.example") == "hosts-style.example"
    assert pools.match_domain("proxy.corp.example") == "proxy.corp.example"
    assert pools.match_ip("10.40.0.7") == "10.40.0.7"  # private addresses are not exempt
    assert pools.match_ip("192.0.2.77") == "192.0.2.0/24"
    assert pools.match_ip("192.0.3.1") is None and pools.match_ip("not an ip") is None


def test_bad_lines_are_reported_with_their_numbers():
    _, errors = parse_pool_list("ok.example\ncom\nco.uk\n10.0.0.0/8\nhas space here\nexa mple\n_bad_.-\n")
    assert [e.line for e in errors] == [2, 3, 4, 5, 6, 7]
    assert "top-level" in errors[0].reason and "public" in errors[1].reason and "/16" in errors[2].reason


def test_bundled_list_covers_the_well_known_pools():
    pools = load_pool_list(PoolSettings(file="/nonexistent/pools.txt"))
    for name in ("xmr-eu1.nanopool.org", "rvn.2miners.com", "eth.f2pool.com", "us1.ethermine.org", "hiveon.net",
                 "rx.unmineable.com", "pool.supportxmr.com", "gulf.moneroocean.stream", "pool.minexmr.com",
                 "auto.c3pool.org", "kryptex.network", "pool.woolypooly.com", "eth.flexpool.io", "k1pool.com",
                 "btc.viabtc.io", "ss.antpool.com", "btc.poolin.com", "mine.zpool.ca", "zergpool.com",
                 "mining-dutch.nl", "de.herominers.com", "daggerhashimoto.auto.nicehash.com"):
        assert pools.match_domain(name), name
    for name in ("huggingface.co", "pypi.org", "github.com", "download.pytorch.org", "nvidia.com", "btc.com"):
        assert pools.match_domain(name) is None, name


def test_ignore_list_and_turning_the_bundled_list_off(tmp_path):
    installed = tmp_path / "pools.txt"
    installed.write_text("inhouse-pool.corp.example\n")
    both = load_pool_list(PoolSettings(file=str(installed), ignore=["supportxmr.com"]))
    assert both.match_domain("pool.inhouse-pool.corp.example") and both.match_domain("nanopool.org")
    assert both.match_domain("pool.supportxmr.com") is None
    only = load_pool_list(PoolSettings(file=str(installed), include_bundled=False))
    assert only.match_domain("nanopool.org") is None and only.match_domain("inhouse-pool.corp.example")


def test_detector_reports_a_pool_once_per_repeat_window_and_learns_its_addresses():
    det = MiningPool(DetectionSettings())
    state = det.new_state()
    hits = []
    for t in range(0, 600, 10):  # the miner re-resolves its pool every 10 s
        ev = c.validate_or_raise(copy.deepcopy(dns("xmr.nanopool.org", ["10.9.0.1"], t=t)))
        hits += list(det.process(ev, state))
    assert len(hits) == 2  # at 0 s and again after repeat_after_s (300 s)
    later = c.validate_or_raise(copy.deepcopy(flow(None, dst="10.9.0.1", dport=14444, t=700)))
    found = list(det.process(later, state))
    assert found and found[0].fields["destination.domain"] == "xmr.nanopool.org"
    expired = c.validate_or_raise(copy.deepcopy(flow(None, dst="10.9.0.1", dport=14444, sport=1, t=700 + 90_000)))
    assert not list(det.process(expired, state))


def test_detector_state_stays_bounded():
    det = MiningPool(DetectionSettings())
    state = det.new_state()
    for i in range(6000):
        det.process(c.validate_or_raise(dns(f"h{i}.nanopool.org", [f"10.{i // 250}.{i % 250}.1"], t=i * 400)),
                    state)
    assert len(state.resolved) <= 4096 and len(state.reported) <= 1024


# ---------------------------------------------------------------------------- the command


@pytest.fixture
def list_server(tmp_path) -> Iterator[str]:
    (tmp_path / "good.txt").write_text("# feed\nnew-pool.example\n203.0.113.0/24\n")
    (tmp_path / "bad.txt").write_text("new-pool.example\ncom\n")
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: handler(*a, directory=str(tmp_path)))  # type: ignore[misc]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run(args: list[str], installed: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env={"GPUSENTRY_DETECTION__POOLS__FILE": str(installed)})
    return result.exit_code, result.output


def test_refresh_from_url_installs_and_show_reports_it(tmp_path, list_server):
    installed = tmp_path / "state" / "pools.txt"
    code, out = run(["pools", "refresh", "--from", f"{list_server}/good.txt?token=s3cret"], installed)
    assert code == 0, out
    assert "1 domains, 0 addresses, 1 networks" in out and "s3cret" not in out
    assert "s3cret" not in installed.read_text()
    code, out = run(["pools", "show"], installed)
    assert code == 0 and "present" in out
    pools = load_pool_list(PoolSettings(file=str(installed)))
    assert pools.match_domain("a.new-pool.example") and pools.match_ip("203.0.113.9")
    assert pools.match_domain("nanopool.org"), "the bundled list is still used"


def test_refresh_refuses_a_bad_list_and_keeps_the_old_one(tmp_path, list_server):
    installed = tmp_path / "pools.txt"
    installed.write_text("old-pool.example\n")
    code, out = run(["pools", "refresh", "--from", f"{list_server}/bad.txt"], installed)
    assert code == 1 and "line 2" in out and "--skip-invalid" in out
    assert installed.read_text() == "old-pool.example\n"
    code, out = run(["pools", "refresh", "--from", f"{list_server}/bad.txt", "--skip-invalid"], installed)
    assert code == 0 and "1 bad lines skipped" in out
    assert "new-pool.example" in installed.read_text()


def test_refresh_names_unreachable_sources(tmp_path, list_server):
    installed = tmp_path / "pools.txt"
    code, out = run(["pools", "refresh", "--from", f"{list_server}/missing.txt"], installed)
    assert code == 1 and "HTTP 404" in out
    code, out = run(["pools", "refresh", "--from", str(tmp_path / "nope.txt")], installed)
    assert code == 1 and "cannot read" in out
    assert not installed.exists()


def test_safe_source_drops_credentials_and_queries():
    assert safe_source("https://user:pw@feed.example:8443/p.txt?key=1") == "https://feed.example:8443/p.txt"
    assert safe_source("/etc/pools.txt") == "/etc/pools.txt"
