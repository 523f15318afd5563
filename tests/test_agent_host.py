"""Process, network and capture collectors against this machine's real /proc and real sockets."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import dpkt
import pytest

from agents.metrics import AgentMetrics
from agents.network import NetworkCollector
from agents.process import NetlinkUnavailable, ProcessCollector
from agents.procfs import ContainerNames, ExecutableHasher, ProcFS, parse_net_table
from gpusentry import contract as c

HOST = "host-under-test"
PRIVILEGED = os.geteuid() == 0


def valid(events):
    for ev in events:
        checked = c.validate_event(ev)
        assert not isinstance(checked, c.Reject), checked
    return events


def wait_for(collect, predicate, timeout=5.0):
    """Run collection cycles until an event matches (collectors report on their next cycle)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        events = valid(collect(time.time()))
        seen.extend(events)
        hits = [e for e in seen if predicate(e)]
        if hits:
            return hits, seen
        time.sleep(0.05)
    raise AssertionError(f"no matching event in {len(seen)} events")


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "work dir"
    d.mkdir()
    return d


def sleeper(workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", "30", *extra],
                            cwd=workdir)


def check_child_start(ev, child, workdir):
    p = ev["process"]
    assert p["pid"] == child.pid
    assert p["executable"] == os.path.realpath(sys.executable)
    assert p["args"][-2:] == ["30", "--fake-flag"]
    assert p["command_line"].endswith("time.sleep(float(sys.argv[1])) 30 --fake-flag")
    assert p["working_directory"] == str(workdir)
    assert p["parent"]["pid"] == os.getpid()
    assert p["parent"]["name"] == ProcFS().comm(os.getpid())
    assert ev["user"]["name"] == pwd.getpwuid(os.geteuid()).pw_name
    assert c.parse_timestamp(p["start"]) <= time.time() + 1


@pytest.mark.parametrize("source", ["poll", "netlink"])
def test_process_start_and_end_of_a_real_child(workdir, source):
    if source == "netlink" and not PRIVILEGED:
        pytest.skip("the process-events connector needs root (CAP_NET_ADMIN)")
    col = ProcessCollector(HOST, metrics=AgentMetrics(), source=source)
    try:
        col.start()
    except NetlinkUnavailable as exc:
        pytest.skip(f"no process-events connector here: {exc}")
    try:
        first = valid(col.collect(time.time()))
        # The first cycle reports what already runs, e.g. this test process, with its real start time.
        me = [e for e in first if e["process"]["pid"] == os.getpid()]
        assert me and me[0]["event"]["type"] == ["start"]
        child = sleeper(workdir, "--fake-flag")
        hits, _ = wait_for(col.collect, lambda e: e["process"]["pid"] == child.pid)
        assert hits[0]["event"]["type"] == ["start"]
        check_child_start(hits[0], child, workdir)
        child.kill()
        child.wait()
        ends, _ = wait_for(col.collect, lambda e: e["process"]["pid"] == child.pid and e["event"]["type"] == ["end"])
        assert ends[0]["process"]["executable"] == os.path.realpath(sys.executable)
    finally:
        col.close()


@pytest.mark.parametrize("source", ["poll", "netlink"])
def test_the_ignored_process_tree_is_not_reported_and_everything_else_is(workdir, source):
    """`gpusentry up` runs its broker, worker and forwarder under its own pid and has its agent ignore that tree;
    a process outside it, started at the same time, is still reported."""
    import psutil

    if source == "netlink" and not PRIVILEGED:
        pytest.skip("the process-events connector needs root (CAP_NET_ADMIN)")
    # Like `up`: a child running when the agent starts, and a grandchild started later.
    root = subprocess.Popen(["sh", "-c", "sleep 60 & (sleep 1.5; sleep 61; true) & wait"], cwd=workdir)
    col = ProcessCollector(HOST, metrics=AgentMetrics(), source=source, ignore_tree=root.pid)
    outside = None
    try:
        try:
            col.start()
        except NetlinkUnavailable as exc:
            pytest.skip(f"no process-events connector here: {exc}")
        events = valid(col.collect(time.time()))
        outside = sleeper(workdir, "--outside")
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            time.sleep(0.2)
            events += valid(col.collect(time.time()))
        tree = {root.pid} | {c.pid for c in psutil.Process(root.pid).children(recursive=True)}
        assert len(tree) >= 4, "the later grandchild has not started"
        reported = {e["process"]["pid"] for e in events}
        assert not reported & tree, [e["process"]["command_line"] for e in events if e["process"]["pid"] in tree]
        assert outside.pid in reported and os.getpid() in reported
    finally:
        col.close()
        for proc in psutil.Process(root.pid).children(recursive=True):
            proc.kill()
        root.kill()
        root.wait()
        if outside is not None:
            outside.kill()
            outside.wait()


@pytest.fixture
def netlink_collector():
    """A started process collector on the kernel's process-events connector (root only), closed afterwards."""
    if not PRIVILEGED:
        pytest.skip("the process-events connector needs root (CAP_NET_ADMIN)")
    col = ProcessCollector(HOST, metrics=AgentMetrics(), source="netlink")
    try:
        col.start()
    except NetlinkUnavailable as exc:
        pytest.skip(f"no process-events connector here: {exc}")
    try:
        yield col
    finally:
        col.close()


def test_netlink_sees_processes_shorter_than_a_cycle(netlink_collector):
    col = netlink_collector
    col.collect(time.time())
    # Ten processes that live about 10 ms each, all between two cycles.
    pids = []
    for _ in range(10):
        child = subprocess.Popen(["sleep", "0.01"])
        child.wait()
        pids.append(child.pid)
    time.sleep(0.2)
    events = valid(col.collect(time.time()))
    starts = {e["process"]["pid"]: e for e in events if e["event"]["type"] == ["start"]}
    ends = {e["process"]["pid"] for e in events if e["event"]["type"] == ["end"]}
    assert set(pids) <= set(starts), "a short-lived process vanished unseen"
    assert set(pids) <= ends
    # Details are read the moment exec is announced; on a loaded machine a 10 ms process can be gone
    # by then (counted in processes_vanished), so most, not necessarily all, carry their command line.
    detailed = [starts[p] for p in pids if starts[p]["process"]["args"]]
    assert len(detailed) >= 5
    assert all(e["process"]["args"] == ["sleep", "0.01"] for e in detailed)


def test_poll_mode_misses_nothing_that_outlives_a_cycle_and_hashes_executables(workdir):
    col = ProcessCollector(HOST, metrics=AgentMetrics(), source="poll",
                           hasher=ExecutableHasher(max_bytes=1 << 30))
    col.start()
    col.collect(time.time())
    child = sleeper(workdir, "--fake-flag")
    try:
        hits, _ = wait_for(col.collect, lambda e: e["process"]["pid"] == child.pid)
        import hashlib

        expected = hashlib.sha256(Path(os.path.realpath(sys.executable)).read_bytes()).hexdigest()
        assert hits[0]["process"]["hash"]["sha256"] == expected
    finally:
        child.kill()
        child.wait()


def test_container_id_from_cgroup_path(tmp_path):
    cid = "4f1b0c9e" * 8
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{cid}.scope\n")
    (proc / "4243").mkdir()
    (proc / "4243" / "cgroup").write_text(f"12:memory:/docker/{cid}\n")
    (proc / "4244").mkdir()
    (proc / "4244" / "cgroup").write_text("0::/user.slice/user-1000.slice/session-2.scope\n")
    fs = ProcFS(proc)
    assert fs.container_id(4242) == cid
    assert fs.container_id(4243) == cid
    assert fs.container_id(4244) is None


# ------------------------------------------------------------------ network


@pytest.mark.parametrize("net_root", [None, "/proc/net"], ids=["sock_diag", "proc_net"])
def test_loopback_tcp_flow_with_its_owning_process(net_root):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    col = NetworkCollector(HOST, metrics=AgentMetrics(), capture="off", net_root=net_root)
    col.start()
    assert (col.diag is not None) == (net_root is None)
    col.collect(time.time())
    # The client is another process, so the owning pid is not the agent's own (which is filtered out).
    code = ("import socket, sys, time; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
            "print(s.getsockname()[1], flush=True); time.sleep(30)")
    client = subprocess.Popen([sys.executable, "-c", code, str(server.getsockname()[1])], stdout=subprocess.PIPE,
                              text=True)
    try:
        conn, _ = server.accept()
        assert client.stdout is not None
        local_port = int(client.stdout.readline())
        hits, seen = wait_for(col.collect, lambda e: e["source"]["port"] == local_port)
        ev = hits[0]
        assert ev["destination"] == {"ip": "127.0.0.1", "port": server.getsockname()[1]}
        assert ev["network"] == {"transport": "tcp", "direction": "egress"}
        assert ev["process"]["pid"] == client.pid
        assert ev["process"]["executable"] == os.path.realpath(sys.executable)
        # The server's accepted side is inbound and is not reported as a new flow.
        assert not [e for e in seen if e["source"]["port"] == server.getsockname()[1]]
        # A flow is reported once, not every cycle.
        assert not [e for e in valid(col.collect(time.time())) if e["source"]["port"] == local_port]
        conn.close()
    finally:
        client.kill()
        client.wait()
        server.close()
        col.close()


def test_udp_connected_flow_and_ipv6():
    col = NetworkCollector(HOST, metrics=AgentMetrics(), capture="off")
    col.start()
    col.collect(time.time())
    code = ("import socket, sys, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.connect(('127.0.0.1', 3333)); print(s.getsockname()[1], flush=True); time.sleep(30)")
    client = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        port = int(client.stdout.readline())
        hits, _ = wait_for(col.collect, lambda e: e["source"]["port"] == port)
        assert hits[0]["network"]["transport"] == "udp" and hits[0]["destination"]["port"] == 3333
        assert hits[0]["process"]["pid"] == client.pid
    finally:
        client.kill()
        client.wait()


def test_net_table_parser_reads_ipv6_and_mapped_addresses(tmp_path):
    table = tmp_path / "tcp6"
    table.write_text(
        "  sl  local_address                         remote_address                        st tx_queue rx_queue "
        "tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000000000000000000001000000:A5B6 00000000000000000000000001000000:0D05 01 00000000:00000000 "
        "00:00000000 00000000     0        0 12345 1 0000000000000000 20 4 30 10 -1\n"
        "   1: 0000000000000000FFFF00000100007F:A5B7 0000000000000000FFFF0000090000C0:01BB 02 00000000:00000000 "
        "00:00000000 00000000  1000        0 12346 1 0000000000000000 20 4 30 10 -1\n")
    rows = list(parse_net_table(str(table), "tcp"))
    assert (rows[0].local_ip, rows[0].local_port, rows[0].remote_ip, rows[0].remote_port) == ("::1", 42422, "::1", 3333)
    assert (rows[1].local_ip, rows[1].remote_ip, rows[1].remote_port, rows[1].uid) == ("127.0.0.1", "192.0.0.9", 443, 1000)


def client_hello(server_name: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_capture_fills_domain_payload_sni_and_dns_events():
    if not PRIVILEGED:
        pytest.skip("packet capture needs root (CAP_NET_RAW)")
    col = NetworkCollector(HOST, metrics=AgentMetrics(), capture="on", payload_wait_s=2.0)
    col.start()
    assert col.capture is not None
    dns_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server = socket.socket()
    try:
        try:
            dns_server.bind(("127.0.0.53", 53))
        except OSError:
            dns_server.bind(("127.0.0.54", 53))
        server.bind(("127.0.0.1", 0))
        server.listen()
        col.collect(time.time())
        time.sleep(0.1)
        # The host's resolver answers "pool.example.test is 127.0.0.1" to a client (no query leaves the box).
        resolver_client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        resolver_client.bind(("127.0.0.1", 0))
        question = dpkt.dns.DNS.Q(name="pool.example.test", type=dpkt.dns.DNS_A)
        answer = dpkt.dns.DNS(id=7, qr=dpkt.dns.DNS_R, qd=[question], an=[dpkt.dns.DNS.RR(
            name="pool.example.test", type=dpkt.dns.DNS_A, ttl=60, rdata=socket.inet_aton("127.0.0.1"))])
        dns_server.sendto(bytes(answer), resolver_client.getsockname())
        hello = client_hello("pool.example.test")
        code = ("import socket, sys, time; s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); "
                "s.sendall(bytes.fromhex(sys.argv[2])); print(s.getsockname()[1], flush=True); time.sleep(30)")
        client = subprocess.Popen([sys.executable, "-c", code, str(server.getsockname()[1]), hello.hex()],
                                  stdout=subprocess.PIPE, text=True)
        try:
            conn, _ = server.accept()
            assert client.stdout is not None
            port = int(client.stdout.readline())
            hits, seen = wait_for(col.collect, lambda e: e["event"]["dataset"] == "gpusentry.network"
                                  and e["source"]["port"] == port)
            ev = hits[0]
            assert ev["destination"]["domain"] == "pool.example.test"
            assert ev["tls"]["client"]["server_name"] == "pool.example.test"
            import base64

            assert base64.b64decode(ev["gpusentry"]["flow"]["payload_b64"]) == hello[:512]
            assert ev["process"]["pid"] == client.pid
            dns = [e for e in seen if e["event"]["dataset"] == "gpusentry.dns"]
            assert dns and dns[0]["dns"]["question"]["name"] == "pool.example.test"
            assert dns[0]["dns"]["resolved_ip"] == ["127.0.0.1"]
            assert dns[0]["process"]["pid"] == os.getpid()  # the querying socket's owner
            conn.close()
        finally:
            client.kill()
            client.wait()
        resolver_client.close()
    finally:
        dns_server.close()
        server.close()
        col.close()


def test_capture_off_without_privileges_says_so_once(caplog, monkeypatch):
    import agents.network as network

    def refuse(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(network, "PacketCapture", refuse)
    col = NetworkCollector(HOST, metrics=AgentMetrics(), capture="auto")
    with caplog.at_level("WARNING"):
        col.start()
        col.collect(time.time())
        col.collect(time.time())
    assert col.capture is None
    assert sum("packet capture off" in r.getMessage() for r in caplog.records) == 1


def test_sni_parser_on_split_and_non_tls_payloads():
    from agents.capture import tls_server_name

    hello = client_hello("rx.unmineable.example")
    assert tls_server_name(hello) == "rx.unmineable.example"
    assert tls_server_name(hello[:200]) == "rx.unmineable.example"  # the rest in the next segment
    assert tls_server_name(hello[:120]) is None  # cut before the name: unknown, not an error
    assert tls_server_name(b'{"id":1,"method":"login","params":{}}\n') is None
    assert tls_server_name(b"\x16\x03\x01") is None


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs /bin/sh")
def test_vanished_process_is_counted_not_raised():
    col = ProcessCollector(HOST, metrics=AgentMetrics(), source="poll")
    col._on_exec(2**22 + 17)  # a pid that does not exist: it exited before /proc could be read
    events = valid(col._drain())
    assert events[0]["process"]["pid"] == 2**22 + 17
    assert col.metrics.value("gpusentry_agent_processes_vanished_total") == 1


def test_dns_only_capture_when_no_payload_is_wanted():
    if not PRIVILEGED:
        pytest.skip("packet capture needs root (CAP_NET_RAW)")
    from agents.capture import PacketCapture

    cap = PacketCapture(payload_bytes=0)
    dns_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server = socket.socket()
    try:
        try:
            dns_server.bind(("127.0.0.53", 53))
        except OSError:
            dns_server.bind(("127.0.0.54", 53))
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        answer = dpkt.dns.DNS(id=9, qr=dpkt.dns.DNS_R, qd=[dpkt.dns.DNS.Q(name="gpu-pool.example.test")],
                              an=[dpkt.dns.DNS.RR(name="gpu-pool.example.test", type=dpkt.dns.DNS_A, ttl=60,
                                                  rdata=socket.inet_aton("192.0.2.44"))])
        dns_server.sendto(bytes(answer), client.getsockname())
        server.bind(("127.0.0.1", 0))
        server.listen()
        tcp = socket.create_connection(server.getsockname())
        tcp.sendall(client_hello("gpu-pool.example.test"))
        deadline = time.monotonic() + 5
        while cap.name_of("192.0.2.44") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cap.name_of("192.0.2.44") == "gpu-pool.example.test"
        # The kernel filter let no TCP packet through: no SYN was seen, no first bytes kept.
        assert not cap.saw_start((*tcp.getsockname(), *tcp.getpeername()))
        tcp.close()
        client.close()
    finally:
        cap.close()
        dns_server.close()
        server.close()


def test_netlink_reader_failure_falls_back_to_polling(netlink_collector, workdir, caplog):
    col = netlink_collector
    col.collect(time.time())
    connector = col._connector
    assert connector is not None
    with caplog.at_level("ERROR"):
        connector.sock.close()  # the reader's socket breaks under it
        deadline = time.monotonic() + 5
        while not connector.failed and time.monotonic() < deadline:
            time.sleep(0.05)
    assert connector.failed and "falls back to polling" in caplog.text
    child = sleeper(workdir, "--fake-flag")
    try:
        hits, _ = wait_for(col.collect, lambda e: e["process"]["pid"] == child.pid)
        assert col.source == "poll"
        assert col.metrics.value("gpusentry_agent_collector_errors_total",
                                 {"collector": "process", "reason": "netlink_reader_failed"}) == 1
    finally:
        child.kill()
        child.wait()


def test_a_detached_process_keeps_the_parent_it_was_forked_from(netlink_collector, tmp_path):
    """setsid + nohup from a shell that exits at once: the process is re-parented to init (or a subreaper)
    before it is read, but its event names the shell that started it, so its sandbox lineage holds."""
    col = netlink_collector
    col.collect(time.time())
    pidfile = tmp_path / "pid"
    shell = subprocess.Popen(["/bin/sh", "-c", f"setsid nohup sleep 3 >/dev/null 2>&1 & echo $! > {pidfile}"])
    shell.wait()
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    detached = int(pidfile.read_text())
    try:
        hits, _ = wait_for(col.collect, lambda e: e["process"]["pid"] == detached and e["event"]["type"] == ["start"]
                           and (e["process"]["args"] or [""])[0] == "sleep")
        assert hits[-1]["process"]["parent"]["pid"] == shell.pid, hits[-1]["process"]["parent"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(detached, signal.SIGKILL)


def test_container_names_come_from_dockers_state_files(tmp_path):
    cid = "c" * 64
    (tmp_path / "containers" / cid).mkdir(parents=True)
    (tmp_path / "containers" / cid / "config.v2.json").write_text(
        '{"Name": "/sweb.eval.django__django-11099.run1", "Config": {"Image": "swebench/sweb.eval.x86_64.django"}}')
    names = ContainerNames(str(tmp_path))
    assert names.lookup(cid) == ("sweb.eval.django__django-11099.run1", "swebench/sweb.eval.x86_64.django")
    assert names.lookup("d" * 64) == (None, None)  # not Docker's: the id alone
    (tmp_path / "containers" / cid / "config.v2.json").unlink()
    assert names.lookup(cid)[0] == "sweb.eval.django__django-11099.run1", "cached: a container keeps its name"
    assert ContainerNames(None).lookup(cid) == (None, None)
